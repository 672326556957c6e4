"""The storage contract and the SQL both engines share.

A :class:`Store` is blocking and thread-safe: call it from task workers and thread pools,
never from an event loop. Every method either does all it says or raises
:class:`~pmq.errors.StorageError` with the driver's complaint; writes are idempotent by id,
so the caller's answer to a StorageError is to retry the same call later.

The rows it reads and writes are the value types of pmq.store.rows.
Messages live in ``pmq_msg_{uid % shards}``. The engines (``sqlite.py``, ``mysql.py``) supply
their DDL, their placeholder and their way of holding a connection; the statements below are
written once for both.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import ClassVar

from pmq.errors import StorageError
from pmq.store.chatsql import ChatSql
from pmq.store.feed import FeedSql
from pmq.store.rows import (
    MSG_COLUMNS,
    LastRead,
    Mark,
    StoredBroadcast,
    StoredMessage,
    insert_chunks,
)
from pmq.store.sqlbase import Cursor

__all__ = ["Cursor", "Store"]

# 2: pmq_redis_mark; 3: the time indexes of RETENTION_TABLES; 4: the notification centre
# (``revoked`` columns, pmq_read, pmq_read_mark: pmq.store.feed)
SCHEMA_VERSION = 4

# Retention deletes this many rows per transaction, so no lock is held for long.
DELETE_CHUNK = 5000
# The primary's tables retention empties besides the messages, each by its time column
# (unix ms). init_schema() indexes each column, also in a database an older PMQ made, so a
# retention DELETE reads only the rows it removes.
RETENTION_TABLES = (
    ("pmq_broadcast", "ts"),
    ("pmq_cs_message", "ts"),
    ("pmq_cs_session", "closed_at"),  # a session is stored once it is closed
    ("pmq_read", "ts"),
)
# Ids named in one UPDATE ... IN (...) (and users in one SELECT ... IN).
ACK_CHUNK = 500
CATCH_UP_ROWS = 10_000  # rows one query of unacked_of() returns at most


class Store(ChatSql, FeedSql, abc.ABC):
    """Messages and the other PMQ tables in an SQL database (see the module docstring)."""

    # Filled in by each engine, with engine, placeholder and insert_ignore (pmq.store.sqlbase).
    replace_into: ClassVar[str]  # "INSERT OR REPLACE" or "REPLACE"
    # What follows "INSERT INTO pmq_redis_mark (bucket, epoch, gen) VALUES ..." so that a
    # bucket's row changes only to a higher mark: one statement, so the row is locked once,
    # exclusively (an INSERT IGNORE then UPDATE takes a shared lock and then asks for an
    # exclusive one: two writers of one bucket deadlock on MySQL).
    keep_higher_mark: ClassVar[str]

    def __init__(self, shards: int, owned: Sequence[int] | None = None) -> None:
        """``owned``: the message shards this database holds (default all of them); the
        other tables live only in a store that owns every shard or is the primary of a
        :class:`~pmq.store.sharded.ShardedStore`."""
        self.shards = shards
        self.owned: tuple[int, ...] = tuple(range(shards) if owned is None else sorted(owned))
        self.primary = True  # holds pmq_broadcast, pmq_last_read and the chat tables

    # -- what each engine provides --------------------------------------------------------

    @abc.abstractmethod
    def _session(self, op: str, write: bool) -> AbstractContextManager[Cursor]:
        """A cursor inside one transaction, committed on a clean exit and rolled back on an
        error; driver errors leave it as StorageError naming ``op``."""

    @abc.abstractmethod
    def _schema_statements(self) -> list[str]:
        """Idempotent DDL creating every table except ``pmq_schema``."""

    @abc.abstractmethod
    def _schema_table(self) -> str:
        """Idempotent DDL creating ``pmq_schema``."""

    @abc.abstractmethod
    def _add_index(self, cur: Cursor, table: str, column: str) -> None:
        """Index ``column`` of ``table`` (or columns, as "a, b") unless it is indexed so
        already (idempotent, and safe when another process adds the same index at once)."""

    @abc.abstractmethod
    def _add_column(self, cur: Cursor, table: str, column: str, definition: str) -> None:
        """Add ``column`` (``definition``: its type and default) to ``table`` unless it has it
        (idempotent, and safe when another process adds it at once)."""

    @abc.abstractmethod
    def _delete_chunk(self, table: str, column: str, limit: int) -> str:
        """A DELETE of at most ``limit`` rows of ``table`` with ``column`` below one
        parameter."""

    def ping(self) -> None:
        """Return when the store answers a trivial query; raise StorageError otherwise."""
        with self._session("ping", write=False) as cur:
            cur.execute("SELECT 1")
            cur.fetchall()

    @abc.abstractmethod
    def close(self) -> None:
        """Release every connection. Idempotent; the store is unusable afterwards."""

    # -- the contract ----------------------------------------------------------------------

    def init_schema(self) -> None:
        """Create every table (the owned ``pmq_msg_N`` and, on a primary, the others) that is
        missing and record SCHEMA_VERSION in ``pmq_schema``. Safe to run any number of times
        and from several processes at once; refuses a database written by a newer PMQ."""
        with self._session("init_schema", write=True) as cur:
            cur.execute(self._schema_table())
            cur.execute("SELECT MAX(version) FROM pmq_schema")
            found = cur.fetchall()[0][0]
            if found is not None and found > SCHEMA_VERSION:
                raise StorageError(
                    f"{self.engine} schema version {found} is newer than this PMQ's "
                    f"({SCHEMA_VERSION}); upgrade PMQ"
                )
            for statement in self._schema_statements():
                cur.execute(statement)
            for table, column, definition in self.added_columns():
                self._add_column(cur, table, column, definition)
            for table, columns in self.added_indexes():
                self._add_index(cur, table, columns)
            if self.primary:
                for table, column in RETENTION_TABLES:
                    self._add_index(cur, table, column)
            p = self.placeholder
            cur.execute(
                f"{self.insert_ignore} INTO pmq_schema (version, applied_at) VALUES ({p}, {p})",
                (SCHEMA_VERSION, int(time.time() * 1000)),
            )

    def write_messages(self, rows: Sequence[StoredMessage]) -> int:
        """Insert ``rows`` in one transaction, one multi-row INSERT per shard (split only when
        a statement would exceed MAX_ROWS_PER_INSERT or MAX_CHARS_PER_INSERT). Ids already
        stored are skipped, so retrying a failed or partly applied batch never duplicates.
        Returns the number of rows newly inserted."""
        if not rows:
            return 0
        by_table: dict[str, list[StoredMessage]] = {}
        for row in rows:
            by_table.setdefault(self.table(row.uid), []).append(row)
        inserted = 0
        one_row = "(" + ", ".join([self.placeholder] * 6) + ")"
        with self._session("write_messages", write=True) as cur:
            # Shards in one fixed order, so concurrent batches take row locks in the same order.
            for table, table_rows in sorted(by_table.items()):
                for chunk in insert_chunks(table_rows):
                    values = ", ".join([one_row] * len(chunk))
                    params = [
                        v for r in chunk for v in (r.id, r.uid, r.kind, r.from_uid, r.body, r.ts)
                    ]
                    cur.execute(
                        f"{self.insert_ignore} INTO {table} ({MSG_COLUMNS}) VALUES {values}",
                        params,
                    )
                    inserted += cur.rowcount
        return inserted

    def write_broadcasts(self, rows: Sequence[StoredBroadcast]) -> int:
        """Insert broadcasts, skipping ids already stored; returns rows newly inserted."""
        if not rows:
            return 0
        p = self.placeholder
        values = ", ".join([f"({p}, {p}, {p}, {p}, {p})"] * len(rows))
        with self._session("write_broadcasts", write=True) as cur:
            cur.execute(
                f"{self.insert_ignore} INTO pmq_broadcast (id, grp, kind, body, ts) "
                f"VALUES {values}",
                [v for r in rows for v in (r.id, r.group, r.kind, r.body, r.ts)],
            )
            return cur.rowcount

    def set_last_reads(self, rows: Sequence[LastRead]) -> None:
        """Record last-read times (one row per user and kind; a later write replaces it)."""
        if not rows:
            return
        p = self.placeholder
        with self._session("set_last_reads", write=True) as cur:
            for row in rows:
                cur.execute(
                    f"{self.replace_into} INTO pmq_last_read (uid, kind, ts) "
                    f"VALUES ({p}, {p}, {p})",
                    (row.uid, row.kind, row.ts),
                )

    def last_read(self, uid: int, kind: str) -> int | None:
        """The stored last-read time of ``uid`` for ``kind``, None when never cleared."""
        p = self.placeholder
        with self._session("last_read", write=False) as cur:
            cur.execute(f"SELECT ts FROM pmq_last_read WHERE uid = {p} AND kind = {p}", (uid, kind))
            found = cur.fetchall()
        return int(found[0][0]) if found else None

    def unacked(self, uid: int, after_id: int = 0, limit: int = 200) -> list[StoredMessage]:
        """``uid``'s unacked messages with ids above ``after_id``, at most ``limit``, in id
        order. Page by passing the last id returned as the next ``after_id``."""
        p = self.placeholder
        with self._session("unacked", write=False) as cur:
            cur.execute(
                f"SELECT {MSG_COLUMNS} FROM {self.table(uid)} "
                f"WHERE uid = {p} AND acked = 0 AND revoked = 0 AND id > {p} ORDER BY id LIMIT {p}",
                (uid, after_id, limit),
            )
            return [StoredMessage(*row) for row in cur.fetchall()]

    def unacked_of(
        self, uids: Iterable[int], after_id: int, limit: int = CATCH_UP_ROWS
    ) -> list[StoredMessage]:
        """The unacked messages of every user of ``uids`` with ids above ``after_id``, in id
        order, at most ``limit`` per message table: one query per table for a catch-up over
        a worker's users (pmq.reactor.catchup.LossCatchUp), not one per user."""
        by_table: dict[str, list[int]] = {}
        for uid in sorted(set(uids)):
            by_table.setdefault(self.table(uid), []).append(uid)
        p = self.placeholder
        found: list[StoredMessage] = []
        with self._session("unacked_of", write=False) as cur:
            for table, users in by_table.items():
                for chunk, marks in self._in_chunks(users):
                    cur.execute(
                        f"SELECT {MSG_COLUMNS} FROM {table} WHERE uid IN ({marks}) "
                        f"AND acked = 0 AND revoked = 0 AND id > {p} ORDER BY id LIMIT {p}",
                        (*chunk, after_id, limit),
                    )
                    found += [StoredMessage(*row) for row in cur.fetchall()]
        return sorted(found, key=lambda row: row.id)

    def _in_chunks(self, values: list[int]) -> Iterator[tuple[list[int], str]]:
        """``values`` in slices of at most ACK_CHUNK, each with its ``IN (...)`` placeholders."""
        for start in range(0, len(values), ACK_CHUNK):
            chunk = values[start : start + ACK_CHUNK]
            yield chunk, ", ".join([self.placeholder] * len(chunk))

    def ack(self, uid: int, ids: Iterable[int]) -> int:
        """Mark ``uid``'s messages ``ids`` acked; ids of other users or unknown ids are
        ignored. Returns how many were unacked before."""
        wanted = sorted(set(ids))
        if not wanted:
            return 0
        p = self.placeholder
        acked = 0
        with self._session("ack", write=True) as cur:
            for chunk, marks in self._in_chunks(wanted):
                cur.execute(
                    f"UPDATE {self.table(uid)} SET acked = 1 "
                    f"WHERE uid = {p} AND acked = 0 AND id IN ({marks})",
                    (uid, *chunk),
                )
                acked += cur.rowcount
        return acked

    def existing(self, uid: int, ids: Iterable[int]) -> set[int]:
        """Which of ``ids`` are stored as ``uid``'s messages, acked or not; ids of other users
        and unknown ids are left out. The sweep asks this before a message leaves Redis."""
        wanted = sorted(set(ids))
        if not wanted:
            return set()
        p = self.placeholder
        found: set[int] = set()
        with self._session("existing", write=False) as cur:
            for chunk, marks in self._in_chunks(wanted):
                cur.execute(
                    f"SELECT id FROM {self.table(uid)} WHERE uid = {p} AND id IN ({marks})",
                    (uid, *chunk),
                )
                found.update(int(row[0]) for row in cur.fetchall())
        return found

    def unacked_users(self, shard: int, after_uid: int = 0, limit: int = 1000) -> list[int]:
        """The users above ``after_uid`` with unacked messages in ``pmq_msg_{shard}``, at most
        ``limit``, in uid order. Page by passing the last uid returned as ``after_uid``."""
        p = self.placeholder
        with self._session("unacked_users", write=False) as cur:
            cur.execute(
                f"SELECT DISTINCT uid FROM pmq_msg_{shard} "
                f"WHERE uid > {p} AND acked = 0 ORDER BY uid LIMIT {p}",
                (after_uid, limit),
            )
            return [int(row[0]) for row in cur.fetchall()]

    def redis_marks(self) -> dict[int, Mark]:
        """The highest Redis mark (epoch, generation) recorded per user bucket."""
        with self._session("redis_marks", write=False) as cur:
            cur.execute("SELECT bucket, epoch, gen FROM pmq_redis_mark")
            return {int(b): (int(e), int(g)) for b, e, g in cur.fetchall()}

    def raise_redis_marks(self, marks: Mapping[int, Mark]) -> dict[int, Mark]:
        """Record each bucket's mark unless a higher one is recorded already (a stored mark
        only ever rises, whatever order concurrent writers commit in); returns every
        bucket's recorded mark, as redis_marks() would after."""
        rows = sorted(marks.items())  # one order for every caller: row locks taken alike
        p = self.placeholder
        with self._session("raise_redis_marks", write=True) as cur:
            if rows:
                cur.execute(
                    "INSERT INTO pmq_redis_mark (bucket, epoch, gen) VALUES "
                    + ", ".join([f"({p}, {p}, {p})"] * len(rows))
                    + f" {self.keep_higher_mark}",
                    [v for bucket, (epoch, gen) in rows for v in (bucket, epoch, gen)],
                )
            cur.execute("SELECT bucket, epoch, gen FROM pmq_redis_mark")
            return {int(b): (int(e), int(g)) for b, e, g in cur.fetchall()}

    def delete_before(self, ts_ms: int) -> int:
        """Delete every row older than ``ts_ms`` (unix ms): the messages (acked or not) of
        every owned shard and, on a primary, the rows of RETENTION_TABLES. DELETE_CHUNK rows
        per transaction, so no lock is held for long. Returns the count."""
        tables = [(f"pmq_msg_{n}", "ts") for n in self.owned]
        if self.primary:
            tables += RETENTION_TABLES
        deleted = 0
        for table, column in tables:
            statement = self._delete_chunk(table, column, DELETE_CHUNK)
            while True:
                with self._session("delete_before", write=True) as cur:
                    cur.execute(statement, (ts_ms,))
                    count = cur.rowcount
                deleted += count
                if count < DELETE_CHUNK:
                    break
        return deleted

    def count_messages(self) -> int:
        """The number of stored messages, acked or not, over all shards."""
        total = 0
        with self._session("count_messages", write=False) as cur:
            for n in self.owned:
                cur.execute(f"SELECT COUNT(*) FROM pmq_msg_{n}")
                total += int(cur.fetchall()[0][0])
        return total
