"""Storage operations, sans I/O: the items of the storage queues, as their producers write
them and the storage writer (pmq.tasks.writer) reads them.

Each item is one JSON object whose ``op`` (an :class:`OpName`) says what it is:

- ``msg``: a unicast message to store (pmq.domain.inbox's inbox_publish queues it with the message);
- ``ack``: a user's messages acked (pmq.domain.inbox's inbox_ack queues those it removed, and the
  writer queues again the acks it could not apply yet);
- ``last_read``: a user's last clear of a kind (pmq.domain.unread);
- ``cs`` and ``cs_session``: a chat message, and a chat session closed (pmq.domain.chat);
- ``broadcast``: a broadcast with its group (pmq.domain.broadcast);
- ``read``: items a user marked read, and the kinds read up to an id (pmq.domain.reads);
- ``revoke``, ``edit``: a unicast message retracted, or its body replaced (the whole message,
  so that storage holds it right even before the message's own row is written), and
  ``bc_revoke``: a broadcast retracted (pmq.domain.amend).

The producers call the ``encode_*`` functions here; a message's is a concatenation around
its JSON, encoded once for the push and the storage op alike (pmq.wire.client.Message). A
Lua script (pmq/redis/scripts) that queues an op gets it in its ARGV as encoded here: inbox_ack
keeps in the ack op only the ids it queues, chat_close fills in the session's fields it
reads, chat_send puts the peer's uid as the recipient between the two parts of a ``cs`` op
made with a stand-in (pmq.wire.client.around_recipient).
:func:`parse` turns an item back into one :data:`StoreOp` value, or raises ValueError.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson

from pmq.wire.client import Message, is_kind, is_uid


class OpName(enum.StrEnum):
    MSG = "msg"
    ACK = "ack"
    LAST_READ = "last_read"
    CS = "cs"
    CS_SESSION = "cs_session"
    BROADCAST = "broadcast"
    READ = "read"
    REVOKE = "revoke"
    EDIT = "edit"
    BC_REVOKE = "bc_revoke"


# Encoders --------------------------------------------------------------------------------


def encode_message(message_json: bytes) -> bytes:
    """A ``msg`` op around a unicast message's JSON (Message.encode())."""
    return b'{"op":"msg","msg":' + message_json + b"}"


def encode_ack(uid: str, ids: Sequence[int | str]) -> bytes:
    """An ``ack`` op of ``ids`` of ``uid``'s messages (ids carried as strings)."""
    return orjson.dumps({"op": OpName.ACK, "uid": uid, "ids": [str(i) for i in ids]})


def encode_last_read(uid: str, kind: str, ts: int) -> bytes:
    """A ``last_read`` op: ``uid`` cleared ``kind`` at ``ts`` (unix ms)."""
    return orjson.dumps({"op": OpName.LAST_READ, "uid": uid, "kind": kind, "ts": ts})


def encode_cs_message(session_id: str, message_json: bytes) -> bytes:
    """A ``cs`` op: a chat message's JSON (Message.encode()) and its session."""
    return b'{"op":"cs","session_id":' + orjson.dumps(session_id) + b',"msg":' + message_json + b"}"


def encode_cs_session(
    session_id: str,
    reason: str,
    uid: str = "",
    agent: str = "",
    opened: str = "",
    closed: str = "",
    last_msg_id: str = "",
) -> bytes:
    """A ``cs_session`` op: a closed session. The chat_close script (pmq/redis/scripts) gets it with
    the session's id and the close reason and fills in what it reads: the user, the agent
    ('' when none), the opening and closing times and the last message id ('' when none)."""
    return orjson.dumps(
        {
            "op": OpName.CS_SESSION,
            "id": session_id,
            "uid": uid,
            "agent": agent,
            "opened": opened,
            "closed": closed,
            "last_msg_id": last_msg_id,
            "reason": reason,
        }
    )


def encode_broadcast(group: str, message_json: bytes) -> bytes:
    """A ``broadcast`` op: a broadcast's JSON (Message.encode(), with its group) and group."""
    return b'{"op":"broadcast","group":' + orjson.dumps(group) + b',"msg":' + message_json + b"}"


def encode_read(uid: str, ids: Sequence[tuple[int, int]], marks: dict[str, int]) -> bytes:
    """A ``read`` op: ``ids`` (id, unix ms of the item) that ``uid`` read one by one, and
    ``marks``: kind ("*" for every kind) -> the id up to which all of that kind is read."""
    return orjson.dumps(
        {
            "op": OpName.READ,
            "uid": uid,
            "ids": [[str(i), ts] for i, ts in ids],
            "marks": {kind: str(mark) for kind, mark in marks.items()},
        }
    )


def encode_amend(op: OpName, message_json: bytes, group: str | None = None) -> bytes:
    """A ``revoke`` or ``edit`` op around a unicast message's JSON, or a ``bc_revoke`` op
    around a broadcast's JSON with its ``group``."""
    head = b'{"op":"' + op.value.encode() + b'",'
    if group is not None:
        head += b'"group":' + orjson.dumps(group) + b","
    return head + b'"msg":' + message_json + b"}"


# Values ----------------------------------------------------------------------------------
# Fields in the order of the store's rows (pmq.store), bodies as JSON text.


class MessageOp(NamedTuple):
    """``msg``: a unicast message to store."""

    id: int
    uid: int  # the recipient
    kind: str
    from_uid: int | None
    body: str
    ts: int

    def encode(self) -> bytes:
        sender = None if self.from_uid is None else str(self.from_uid)
        body = orjson.loads(self.body)
        message = Message(self.id, self.kind, sender, str(self.uid), body, self.ts)
        return encode_message(message.encode())


class AckOp(NamedTuple):
    """``ack``: ids of a user's messages, acked."""

    uid: int
    ids: list[int]

    def encode(self) -> bytes:
        return encode_ack(str(self.uid), self.ids)


class LastReadOp(NamedTuple):
    """``last_read``: when a user last cleared a kind (unix ms)."""

    uid: int
    kind: str
    ts: int

    def encode(self) -> bytes:
        return encode_last_read(str(self.uid), self.kind, self.ts)


class CsMessageOp(NamedTuple):
    """``cs``: a chat message."""

    id: int
    session_id: int
    from_uid: int
    to_uid: int
    body: str
    ts: int

    def encode(self) -> bytes:
        message = Message(
            self.id, "cs", str(self.from_uid), str(self.to_uid), orjson.loads(self.body), self.ts
        )
        return encode_cs_message(str(self.session_id), message.encode())


class CsSessionOp(NamedTuple):
    """``cs_session``: a chat session closed."""

    id: int
    uid: int
    agent: int | None
    opened_at: int
    closed_at: int
    last_msg_id: int | None
    reason: str

    def encode(self) -> bytes:
        return encode_cs_session(
            str(self.id),
            self.reason,
            str(self.uid),
            "" if self.agent is None else str(self.agent),
            str(self.opened_at),
            str(self.closed_at),
            "" if self.last_msg_id is None else str(self.last_msg_id),
        )


class BroadcastOp(NamedTuple):
    """``broadcast``: a broadcast to store."""

    id: int
    group: str
    kind: str
    body: str
    ts: int

    def encode(self) -> bytes:
        body = orjson.loads(self.body)
        message = Message(self.id, self.kind, None, None, body, self.ts, self.group)
        return encode_broadcast(self.group, message.encode())


class ReadOp(NamedTuple):
    """``read``: (id, unix ms) items a user read, and kind -> id marks ("*": every kind)."""

    uid: int
    ids: list[tuple[int, int]]
    marks: dict[str, int]

    def encode(self) -> bytes:
        return encode_read(str(self.uid), self.ids, self.marks)


class AmendOp(NamedTuple):
    """``revoke`` or ``edit`` (``name``) of a unicast message (``message``, as stored)."""

    name: OpName
    message: MessageOp

    def encode(self) -> bytes:
        wire = self.message.encode()[len(b'{"op":"msg","msg":') : -1]
        return encode_amend(self.name, wire)


class BroadcastRevokeOp(NamedTuple):
    """``bc_revoke``: a broadcast retracted (``broadcast``, as stored)."""

    broadcast: BroadcastOp

    def encode(self) -> bytes:
        return self.broadcast.encode().replace(b'"op":"broadcast"', b'"op":"bc_revoke"', 1)


StoreOp = (
    MessageOp
    | AckOp
    | LastReadOp
    | CsMessageOp
    | CsSessionOp
    | BroadcastOp
    | ReadOp
    | AmendOp
    | BroadcastRevokeOp
)


# Parser ----------------------------------------------------------------------------------


def parse(raw: bytes) -> StoreOp:
    """One queue item as its value; ValueError when it is not an op PMQ writes."""
    item = orjson.loads(raw)  # orjson.JSONDecodeError is a ValueError
    op = item.get("op") if isinstance(item, dict) else None
    parsed: StoreOp | None = None
    if op == OpName.MSG:
        parsed = _message(item.get("msg"))
    elif op == OpName.ACK:
        ids = item.get("ids")
        if is_uid(item.get("uid")) and isinstance(ids, list) and all(map(is_uid, ids)):
            parsed = AckOp(int(item["uid"]), [int(i) for i in ids])
    elif op == OpName.LAST_READ:
        ts = item.get("ts")
        if is_uid(item.get("uid")) and is_kind(item.get("kind")) and isinstance(ts, int):
            parsed = LastReadOp(int(item["uid"]), item["kind"], ts)
    elif op == OpName.CS:
        parsed = _cs_message(item)
    elif op == OpName.CS_SESSION:
        parsed = _cs_session(item)
    elif op == OpName.BROADCAST:
        parsed = _broadcast(item)
    elif op == OpName.READ:
        parsed = _read(item)
    elif op in (OpName.REVOKE, OpName.EDIT):
        message = _message(item.get("msg"))
        parsed = None if message is None else AmendOp(OpName(op), message)
    elif op == OpName.BC_REVOKE:
        broadcast = _broadcast(item)
        parsed = None if broadcast is None else BroadcastRevokeOp(broadcast)
    if parsed is None:
        raise ValueError(f"not a storage operation: {raw[:200]!r}")
    return parsed


def _is_ts(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _message(m: Any) -> MessageOp | None:
    if not isinstance(m, dict):
        return None
    sender = m.get("from")
    if (
        is_uid(m.get("id"))
        and is_uid(m.get("to"))
        and is_kind(m.get("kind"))
        and (sender is None or is_uid(sender))
        and _is_ts(m.get("ts"))
        and "body" in m
    ):
        return MessageOp(
            int(m["id"]),
            int(m["to"]),
            m["kind"],
            None if sender is None else int(sender),
            orjson.dumps(m["body"]).decode(),
            m["ts"],
        )
    return None


def _cs_message(item: dict[str, Any]) -> CsMessageOp | None:
    m = item.get("msg")
    if (
        isinstance(m, dict)
        and is_uid(item.get("session_id"))
        and all(is_uid(m.get(name)) for name in ("id", "from", "to"))
        and _is_ts(m.get("ts"))
        and "body" in m
    ):
        body = orjson.dumps(m["body"]).decode()
        return CsMessageOp(
            int(m["id"]), int(item["session_id"]), int(m["from"]), int(m["to"]), body, m["ts"]
        )
    return None


def _cs_session(item: dict[str, Any]) -> CsSessionOp | None:
    agent, last, reason = item.get("agent"), item.get("last_msg_id"), item.get("reason", "")
    if (
        all(is_uid(item.get(name)) for name in ("id", "uid", "opened", "closed"))
        and (agent == "" or is_uid(agent))
        and (last == "" or is_uid(last))
    ):
        return CsSessionOp(
            int(item["id"]),
            int(item["uid"]),
            int(agent) if agent else None,
            int(item["opened"]),
            int(item["closed"]),
            int(last) if last else None,
            reason if isinstance(reason, str) else "",
        )
    return None


def _broadcast(item: dict[str, Any]) -> BroadcastOp | None:
    m, group = item.get("msg"), item.get("group")
    if isinstance(m, dict) and isinstance(group, str) and group:
        ts = m.get("ts")
        if is_uid(m.get("id")) and is_kind(m.get("kind")) and isinstance(ts, int) and "body" in m:
            return BroadcastOp(int(m["id"]), group, m["kind"], orjson.dumps(m["body"]).decode(), ts)
    return None


def _read(item: dict[str, Any]) -> ReadOp | None:
    ids, marks = item.get("ids"), item.get("marks")
    if ids == {}:  # what Lua's cjson makes of an empty list (centre_read.lua)
        ids = []
    if not (is_uid(item.get("uid")) and isinstance(ids, list) and isinstance(marks, dict)):
        return None
    pairs = []
    for pair in ids:
        if not (isinstance(pair, list) and len(pair) == 2 and is_uid(pair[0]) and _is_ts(pair[1])):
            return None
        pairs.append((int(pair[0]), pair[1]))
    if not all((k == "*" or is_kind(k)) and is_uid(v) for k, v in marks.items()):
        return None
    return ReadOp(int(item["uid"]), pairs, {k: int(v) for k, v in marks.items()})
