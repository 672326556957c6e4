"""The notification centre's actions: msg.list, msg.read (docs/notification-centre.md).

The site's side (``GET /api/v1/users/{uid}/messages``, ``POST /api/v1/users/{uid}/read``,
pmq.reactor.centre) checks its requests with the same functions, so both answer bad input
alike, with a 400 naming the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pmq.domain.centre import UnknownItem
from pmq.domain.feed import Query
from pmq.handlers.base import App, Caller, Handler, bad_request, int_field
from pmq.handlers.msg import MAX_ACK
from pmq.handlers.unread import MAX_CLEAR_KINDS
from pmq.wire.client import is_kind, is_uid

MAX_LIST = 100
DEFAULT_LIST = 20
BAD_KIND = 'kind: must match [a-z_]{1,32}, e.g. "comment"'
BAD_BEFORE = "before: must be the id of a message of this user's feed (a string of digits)"
BAD_IDS = f"ids: must be a list of 1 to {MAX_ACK} message ids (strings of digits)"
BAD_KINDS = f'kinds: must be a list of at most {MAX_CLEAR_KINDS} kinds like "comment"'
BOTH = "ids, kinds: give one of them, or neither to read everything"


def list_query(uid: str, groups: Sequence[str], data: dict[str, Any]) -> Query:
    """A msg.list request as a feed query; ActionError(400) naming a bad field."""
    kind = data.get("kind")
    if kind is not None and not is_kind(kind):
        raise bad_request(BAD_KIND)
    before = data.get("before")
    if before is not None and not is_uid(before):
        raise bad_request(BAD_BEFORE)
    limit = int_field(data, "limit", DEFAULT_LIST, 1, MAX_LIST)
    unread_only = data.get("unread_only", False)
    if not isinstance(unread_only, bool):
        raise bad_request("unread_only: must be true or false")
    return Query(uid, groups, kind, int(before or 0), limit, unread_only)


def read_request(data: dict[str, Any]) -> tuple[list[int] | None, list[str] | None]:
    """A msg.read request: (ids, kinds), both None for everything; ActionError(400)."""
    ids, kinds = data.get("ids"), data.get("kinds")
    if ids is not None and kinds is not None:
        raise bad_request(BOTH)
    if ids is not None:
        if not isinstance(ids, list) or not 0 < len(ids) <= MAX_ACK or not all(map(is_uid, ids)):
            raise bad_request(BAD_IDS)
        return [int(i) for i in ids], None
    if kinds is not None:
        if not isinstance(kinds, list) or not 0 < len(kinds) <= MAX_CLEAR_KINDS:
            raise bad_request(BAD_KINDS)
        if not all(map(is_kind, kinds)):
            raise bad_request(BAD_KINDS)
        return None, list(dict.fromkeys(kinds))
    unknown = sorted(set(data) - {"ids", "kinds"})
    if unknown:  # a misspelt "ids" must not mark everything read
        raise bad_request(f"{unknown[0][:64]}: unknown field; give ids, kinds or neither (all)")
    return None, None


async def list_page(app: App, query: Query) -> dict[str, Any]:
    """The reply's data for ``query``; 400 for an unknown ``before``. Storage down raises
    StorageError (the caller answers 503)."""
    try:
        page = await app.centre.page(query)
    except UnknownItem:
        raise bad_request(BAD_BEFORE) from None
    return {"messages": page.messages, "next": page.next}


async def mark_read(
    app: App, uid: str, groups: Sequence[str], data: dict[str, Any]
) -> dict[str, Any]:
    """The reply's data of a read request for ``uid`` (StorageError as list_page())."""
    ids, kinds = read_request(data)
    return {"read": await app.centre.read(uid, groups, ids, kinds)}


async def list_messages(app: App, caller: Caller, data: dict[str, Any]) -> dict[str, Any]:
    """The user's feed, newest first, with read marks (module docstring)."""
    return await list_page(app, list_query(caller.uid, caller.groups, data))


async def read(app: App, caller: Caller, data: dict[str, Any]) -> dict[str, Any]:
    """Mark items read by ids, by kinds, or all; ``read``: how many were unread."""
    return await mark_read(app, caller.uid, caller.groups, data)


ACTIONS: dict[str, Handler] = {"msg.list": list_messages, "msg.read": read}
