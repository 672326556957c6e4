"""Unread counters: unread.get, unread.clear."""

from __future__ import annotations

from typing import Any

from pmq.handlers.base import App, Caller, Handler, bad_request
from pmq.wire.client import is_kind

MAX_CLEAR_KINDS = 32  # kinds one unread.clear names; a client with more clears all


async def get(app: App, caller: Caller, data: dict[str, Any]) -> dict[str, Any]:
    return await app.unread.counts(caller.uid, caller.groups)


def kinds_field(data: dict[str, Any]) -> list[str] | None:
    """The optional ``kinds``: at most MAX_CLEAR_KINDS kind names, repeats dropped."""
    kinds = data.get("kinds")
    if kinds is None:
        return None
    if not isinstance(kinds, list):
        raise bad_request('kinds: must be a list of kinds like "comment"')
    if len(kinds) > MAX_CLEAR_KINDS:
        raise bad_request(
            f"kinds: at most {MAX_CLEAR_KINDS} per request (leave kinds out to clear all)"
        )
    if not all(is_kind(k) for k in kinds):
        raise bad_request('kinds: must be a list of kinds like "comment"')
    return list(dict.fromkeys(kinds))


async def clear(app: App, caller: Caller, data: dict[str, Any]) -> dict[str, Any]:
    """Set the named counters (all when ``kinds`` is absent) to 0, live on every device."""
    kinds = kinds_field(data)
    cleared = await app.unread.clear(caller.uid, kinds)
    await app.routes.notify_unread(caller.uid)
    return {"cleared": cleared}


ACTIONS: dict[str, Handler] = {"unread.get": get, "unread.clear": clear}
