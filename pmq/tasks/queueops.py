"""Storage-queue items as the storage writer reads them: each parsed into a store row, an
ack or a last-read time, and a batch of them sorted by what the store does with each.

The items are JSON objects with an ``op``: ``msg`` (pmq.inbox), ``ack``, ``last_read``
(pmq.unread), ``cs`` and ``cs_session`` (pmq.chat), ``broadcast`` (pmq.broadcast). An item
that is not one of them is named in :attr:`Batch.malformed` with the reason, never raised.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import orjson

from pmq.store import StoredMessage
from pmq.store.base import LastRead, StoredBroadcast, StoredCsMessage, StoredCsSession
from pmq.wire.client import is_kind, is_uid

Ack = tuple[int, list[int]]


@dataclasses.dataclass(slots=True)
class Batch:
    """Queue items parsed for the store: rows to insert, then acks as (uid, ids)."""

    rows: list[StoredMessage] = dataclasses.field(default_factory=list)
    acks: list[Ack] = dataclasses.field(default_factory=list)
    last_reads: list[LastRead] = dataclasses.field(default_factory=list)
    cs_messages: list[StoredCsMessage] = dataclasses.field(default_factory=list)
    cs_sessions: list[StoredCsSession] = dataclasses.field(default_factory=list)
    broadcasts: list[StoredBroadcast] = dataclasses.field(default_factory=list)
    malformed: dict[int, str] = dataclasses.field(default_factory=dict)  # position: reason


def parse_cs(op: str, item: dict[str, Any]) -> StoredCsMessage | StoredCsSession | None:
    """A chat item (pmq.chat): ``cs`` = a message, ``cs_session`` = a closed session."""
    m = item.get("msg")
    if op == "cs" and isinstance(m, dict):
        ts = m.get("ts")
        if (
            is_uid(item.get("session_id"))
            and all(is_uid(m.get(name)) for name in ("id", "from", "to"))
            and isinstance(ts, int)
            and not isinstance(ts, bool)
            and "body" in m
        ):
            body = orjson.dumps(m["body"]).decode()
            return StoredCsMessage(
                int(m["id"]), int(item["session_id"]), int(m["from"]), int(m["to"]), body, ts
            )
    elif op == "cs_session":
        agent, last = item.get("agent"), item.get("last_msg_id")
        if (
            all(is_uid(item.get(name)) for name in ("id", "uid", "opened", "closed"))
            and (agent == "" or is_uid(agent))
            and (last == "" or is_uid(last))
        ):
            return StoredCsSession(
                id=int(item["id"]),
                uid=int(item["uid"]),
                agent=int(agent) if agent else None,
                status="closed",
                opened_at=int(item["opened"]),
                closed_at=int(item["closed"]),
                last_msg_id=int(last) if last else None,
            )
    return None


def parse_broadcast(item: dict[str, Any]) -> StoredBroadcast | None:
    """A broadcast item (pmq.broadcast): its group and its message as pushed."""
    m, group = item.get("msg"), item.get("group")
    if isinstance(m, dict) and isinstance(group, str) and group:
        ts = m.get("ts")
        if is_uid(m.get("id")) and is_kind(m.get("kind")) and isinstance(ts, int) and "body" in m:
            body = orjson.dumps(m["body"]).decode()
            return StoredBroadcast(int(m["id"]), group, m["kind"], body, ts)
    return None


def parse_item(
    raw: bytes,
) -> StoredMessage | Ack | LastRead | StoredCsMessage | StoredCsSession | StoredBroadcast:
    """One queue item as a row or an ack; ValueError when it is not one PMQ wrote."""
    item = orjson.loads(raw)  # orjson.JSONDecodeError is a ValueError
    op = item.get("op") if isinstance(item, dict) else None
    if op in ("cs", "cs_session") and (chat := parse_cs(op, item)) is not None:
        return chat
    if op == "broadcast" and (broadcast := parse_broadcast(item)) is not None:
        return broadcast
    if op == "msg" and isinstance(item.get("msg"), dict):
        m = item["msg"]
        sender = m.get("from")
        ts = m.get("ts")
        if (
            is_uid(m.get("id"))
            and is_uid(m.get("to"))
            and is_kind(m.get("kind"))
            and (sender is None or is_uid(sender))
            and isinstance(ts, int)
            and not isinstance(ts, bool)
            and "body" in m
        ):
            return StoredMessage(
                id=int(m["id"]),
                uid=int(m["to"]),
                kind=m["kind"],
                from_uid=None if sender is None else int(sender),
                body=orjson.dumps(m["body"]).decode(),
                ts=ts,
            )
    elif op == "ack":
        ids = item.get("ids")
        if is_uid(item.get("uid")) and isinstance(ids, list) and all(map(is_uid, ids)):
            return int(item["uid"]), [int(i) for i in ids]
    elif op == "last_read":
        ts = item.get("ts")
        if is_uid(item.get("uid")) and is_kind(item.get("kind")) and isinstance(ts, int):
            return LastRead(int(item["uid"]), item["kind"], ts)
    raise ValueError(f"not a storage operation: {raw[:200]!r}")


def parse_batch(items: Sequence[bytes]) -> Batch:
    """Parse every item; the malformed ones are left out and named in ``malformed``."""
    batch = Batch()
    for position, raw in enumerate(items):
        try:
            parsed = parse_item(raw)
        except ValueError as exc:
            batch.malformed[position] = f"malformed: {exc}"
            continue
        if isinstance(parsed, StoredMessage):
            batch.rows.append(parsed)
        elif isinstance(parsed, LastRead):
            batch.last_reads.append(parsed)
        elif isinstance(parsed, StoredCsMessage):
            batch.cs_messages.append(parsed)
        elif isinstance(parsed, StoredCsSession):
            batch.cs_sessions.append(parsed)
        elif isinstance(parsed, StoredBroadcast):
            batch.broadcasts.append(parsed)
        elif parsed[1]:
            batch.acks.append(parsed)
    return batch
