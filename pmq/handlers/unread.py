"""Unread counters: unread.get, unread.clear."""

from __future__ import annotations

from typing import Any

from pmq import protocol
from pmq.handlers.base import App, Caller, Handler, bad_request


async def get(app: App, caller: Caller, data: dict[str, Any]) -> dict[str, Any]:
    return await app.unread.counts(caller.uid, caller.groups)


async def clear(app: App, caller: Caller, data: dict[str, Any]) -> dict[str, Any]:
    """Set the named counters (all when ``kinds`` is absent) to 0, live on every device."""
    kinds = data.get("kinds")
    if kinds is not None and (
        not isinstance(kinds, list) or not all(protocol.is_kind(k) for k in kinds)
    ):
        raise bad_request('kinds: must be a list of kinds like "comment"')
    cleared = await app.unread.clear(caller.uid, kinds)
    await app.routes.notify_unread(caller.uid)
    return {"cleared": cleared}


ACTIONS: dict[str, Handler] = {"unread.get": get, "unread.clear": clear}
