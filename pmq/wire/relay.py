"""The relay between socket workers, sans I/O: what one worker publishes on another's channel.

A worker that must reach a connection held by another worker publishes, on that worker's
sharded channel (pmq.redis.keys.Keys.worker_channel), one relay message per user:
``"<op> <uid> <sent>\\n<payload>"``, where ``op`` is an :class:`Op`, ``sent`` the unix time
it left (so the receiver can time the delivery) and the payload what the op says. A new
message's payload (:data:`Op.MESSAGE`) carries the user's :class:`UnreadState` as the
publish read it, so the worker holding the user sends the badge with the push without
asking Redis (docs/protocol.md, "Live unread frames").

A broadcast goes the other way round: the socket worker that accepts it queues a
:func:`encode_broadcast_item` for the task workers, and the one that takes it publishes
:func:`encode_broadcast`, its group and push frame, on the broadcast channel every socket
worker reads (docs/protocol.md, "Broadcasts").
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson


class Op(enum.StrEnum):
    """What a relay message asks of the worker holding the user's connections."""

    PUSH = "push"  # payload: a frame for every connection of the user
    # The same, and the user's unread counters changed; the payload is encode_message()'s.
    # A node of an earlier version drops it (with a warning) rather than pushing the state
    # line to its clients; the message waits in the inbox for their reconnect.
    MESSAGE = "message"
    # payload: a push frame of a message a repeated publish found unacked; pushed to the
    # connections that have not had it (a node of an earlier version drops it, with a warning)
    AGAIN = "again"
    UNREAD = "unread"  # no payload: only the counters changed (e.g. cleared on another device)
    KICK = "kick"  # payload: the reason; close every connection with 4001
    # payload: conn ids, space-separated; close those with 4008 (server.max_connections_per_user).
    # A node of an earlier version drops it with a warning: the connection stays, over the bound.
    EVICT = "evict"


_OPS = {op.value: op for op in Op}  # a dict lookup: Op(name) costs a microsecond a relay


class UnknownOp(ValueError):
    """A relay message whose op this version does not know (a newer node sent it)."""

    def __init__(self, op: str, uid: str) -> None:
        super().__init__(f"unknown relay op {op!r}")
        self.op = op
        self.uid = uid


class UnreadState(NamedTuple):
    """A user's unread counters as a publish read them, for the badge sent with the push:
    ``counts`` are the unread hash's field/value pairs (bytes as Redis answered, or text once
    relayed), ``last_clear`` the time (unix ms) of the user's last clear of ``system``, 0
    for never (``system`` is counted from the broadcasts since, pmq.domain.unread)."""

    counts: Sequence[bytes | str]
    last_clear: int

    @classmethod
    def of_reply(cls, flat: Sequence[bytes | str]) -> UnreadState:
        """The state from a script's reply: the pairs, then the last clear (pmq.domain.inbox's
        PUBLISH and pmq.domain.unread's COUNTERS answer it so)."""
        return _new_tuple(cls, (flat[:-1], int(flat[-1])))


# Made on every new message's path: tuple.__new__ skips the named tuple's __new__, a Python
# call that costs as much again.
_new_tuple = tuple.__new__


def encode(op: Op, uid: str, payload: bytes, sent: float) -> bytes:
    """One relay message; ``sent`` is the unix time it leaves, in seconds."""
    return f"{op} {uid} {sent:.6f}\n".encode() + payload


def decode(message: bytes) -> tuple[Op, str, float, bytes]:
    """(op, uid, sent, payload) of what encode() made. ValueError (UnicodeDecodeError among
    them) when the header is not one; UnknownOp, a ValueError, for an op not in :class:`Op`."""
    head, _, payload = message.partition(b"\n")
    name, uid, sent = head.decode().split(" ")
    op = _OPS.get(name)
    if op is None:
        raise UnknownOp(name, uid)
    return op, uid, float(sent), payload


def encode_message(frame: bytes, state: UnreadState) -> bytes:
    """An :data:`Op.MESSAGE` payload: the state as one JSON line of strings (the pairs, then
    the last clear), then the push frame."""
    strings = [v if isinstance(v, str) else v.decode() for v in state.counts]
    strings.append(str(state.last_clear))
    return orjson.dumps(strings) + b"\n" + frame


def decode_message(payload: bytes) -> tuple[bytes, UnreadState]:
    """(frame, state) of an :data:`Op.MESSAGE` payload; ValueError when the state line is not
    what encode_message() makes (strings: field/count pairs, then the last clear, numbers)."""
    line, _, frame = payload.partition(b"\n")
    strings = orjson.loads(line)  # orjson.JSONDecodeError is a ValueError
    if (
        not isinstance(strings, list)
        or len(strings) % 2 != 1
        or not all(isinstance(value, str) for value in strings)
    ):
        raise ValueError("not an unread state")
    for number in strings[1::2]:
        int(number)  # ValueError if not a number
    return frame, _new_tuple(UnreadState, (strings[:-1], int(strings[-1])))


def encode_broadcast_item(group: str, message_json: bytes) -> bytes:
    """The broadcast queue's item: the group and the broadcast's JSON (Message.encode())."""
    return b'{"group":' + orjson.dumps(group) + b',"msg":' + message_json + b"}"


def decode_broadcast_item(item: bytes) -> tuple[str, dict[str, Any]]:
    """(group, message) of what encode_broadcast_item() made; ValueError for anything else,
    a message without a numeric id included."""
    try:
        parsed = orjson.loads(item)
        group, message = parsed["group"], parsed["msg"]
        int(message["id"])
    except (KeyError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError
        raise ValueError(f"not a broadcast queue item: {exc}") from None
    if not isinstance(group, str) or not isinstance(message, dict):
        raise ValueError("not a broadcast queue item")
    return group, message


def encode_broadcast(group: str, frame: bytes) -> bytes:
    """What the broadcast channel carries: the group, a newline, the push frame."""
    return group.encode() + b"\n" + frame


def decode_broadcast(message: bytes) -> tuple[str, bytes]:
    """The group and push frame of what encode_broadcast() made; ValueError (or its subclass
    UnicodeDecodeError) for anything else."""
    group, newline, frame = message.partition(b"\n")
    if not newline:
        raise ValueError("a broadcast channel message without its group line")
    return group.decode(), frame
