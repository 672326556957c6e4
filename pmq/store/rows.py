"""The rows PMQ stores, as value types, and the shape of the statements that write them.

Each table's row is a frozen dataclass whose fields are the table's columns in order
(``*_COLUMNS``); a batch of rows is cut into INSERT statements small enough for both
engines (:func:`insert_chunks`). No SQL runs here: pmq.store.base does that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

# A write is sent as few statements as possible, but one statement must stay well inside the
# engines' limits: SQLite's 32766 host parameters and MySQL's max_allowed_packet (16 MiB by
# default on MariaDB; a character of UTF-8 takes at most 4 bytes).
MAX_ROWS_PER_INSERT = 1000
MAX_CHARS_PER_INSERT = 1024 * 1024
MSG_COLUMNS = "id, uid, kind, from_uid, body, ts"
CS_MESSAGE_COLUMNS = "id, session_id, from_uid, to_uid, body, ts"
CS_SESSION_COLUMNS = "id, uid, agent, status, opened_at, closed_at, last_msg_id"
# Chat rows per INSERT: a message is at most a few KiB, so this stays under the size limits.
CS_ROWS_PER_INSERT = 200

# A Redis mark: (epoch, generation), compared as a pair (pmq.domain.epochs).
Mark = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class StoredMessage:
    """One unicast message as stored: ``body`` is JSON text, ``ts`` unix milliseconds."""

    id: int
    uid: int
    kind: str
    from_uid: int | None
    body: str
    ts: int


@dataclasses.dataclass(frozen=True)
class StoredBroadcast:
    """One broadcast as stored: ``body`` is JSON text, ``ts`` unix milliseconds."""

    id: int
    group: str
    kind: str
    body: str
    ts: int


@dataclasses.dataclass(frozen=True)
class LastRead:
    """When a user last cleared the unread count of a kind (the seed's REPLACE INTO row)."""

    uid: int
    kind: str
    ts: int


@dataclasses.dataclass(frozen=True)
class ReadRows:
    """What a user read (``pmq_read`` rows: item id and its unix ms) and the kinds read up to
    an id (``pmq_read_mark`` rows, "*" for every kind)."""

    uid: int
    ids: list[tuple[int, int]]
    marks: dict[str, int]


@dataclasses.dataclass(frozen=True)
class StoredCsMessage:
    """One customer-service chat message (``pmq_cs_message``): ``body`` is JSON text."""

    id: int
    session_id: int
    from_uid: int
    to_uid: int
    body: str
    ts: int


@dataclasses.dataclass(frozen=True)
class StoredCsSession:
    """A customer-service session (``pmq_cs_session``), written once it is closed."""

    id: int
    uid: int
    agent: int | None
    status: str
    opened_at: int
    closed_at: int | None
    last_msg_id: int | None


def insert_chunks(rows: list[StoredMessage]) -> Iterator[list[StoredMessage]]:
    """``rows`` cut into runs small enough for one INSERT statement."""
    chunk: list[StoredMessage] = []
    size = 0
    for row in rows:
        if chunk and (len(chunk) >= MAX_ROWS_PER_INSERT or size >= MAX_CHARS_PER_INSERT):
            yield chunk
            chunk, size = [], 0
        chunk.append(row)
        size += len(row.body)
    yield chunk
