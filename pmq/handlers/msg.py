"""Inbox actions: msg.ack, msg.pull."""

from __future__ import annotations

from typing import Any

from pmq import metrics
from pmq.handlers.base import App, Caller, Handler, bad_request, int_field
from pmq.wire.client import MAX_ID, Kind, is_uid

MAX_ACK = 1000
MAX_PULL = 200


def message_ids(data: dict[str, Any]) -> list[int]:
    ids = data.get("ids")
    if not isinstance(ids, list) or not ids:
        raise bad_request("ids: must be a non-empty list of message ids")
    if len(ids) > MAX_ACK:
        raise bad_request(f"ids: at most {MAX_ACK} per request")
    parsed = []
    for value in ids:
        if not is_uid(value):  # message ids take the same shape as uids
            raise bad_request("ids: every id must be a message id (a string of digits)")
        parsed.append(int(value))
    return parsed


async def ack(app: App, caller: Caller, data: dict[str, Any]) -> dict[str, Any]:
    """Remove messages from the user's inbox, for every device. Counted: the broadcasts named,
    the messages that were in Redis, and, while storage may hold the user's messages (after
    they left Redis, or Redis lost data), the other ids, whose ack the storage writer makes."""
    ids = message_ids(data)
    broadcasts = await app.broadcasts.acknowledge(caller.uid, caller.groups, ids)
    known = set(broadcasts)
    acked = await app.inbox.ack(caller.uid, [i for i in ids if i not in known])
    count = len(broadcasts) + len(acked.hot) + acked.cold
    metrics.MESSAGES_ACKED.inc(count)
    return {"acked": count}


async def pull(app: App, caller: Caller, data: dict[str, Any]) -> dict[str, Any]:
    """Page through unacked messages in id order, after ``after``; with ``kind: system``,
    through the broadcasts to the user's groups (acked or not) within retention."""
    after = int_field(data, "after", 0, 0, MAX_ID)
    limit = int_field(data, "limit", MAX_PULL, 1, MAX_PULL)
    kind = data.get("kind")
    if kind is not None and kind != Kind.SYSTEM:
        raise bad_request('kind: only "system" can be pulled on its own')
    if kind == Kind.SYSTEM:
        messages = await app.broadcasts.above(caller.groups, after, limit)
    else:
        messages = await app.inbox.pending(caller.uid, app.cold_messages, after, limit)
    return {"messages": messages}


ACTIONS: dict[str, Handler] = {"msg.ack": ack, "msg.pull": pull}
