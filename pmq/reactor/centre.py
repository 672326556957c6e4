"""The notification centre's routes on the ingest port (docs/notification-centre.md): a
user's feed and read marks for the site, and the retraction and editing of messages and
broadcasts. They answer like the other ingest routes (pmq.reactor.ingest): 400 naming the
field, 404 for an id PMQ does not hold (or no longer: retracted), 503 when Redis or storage
is away.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from pmq.errors import ActionError, StorageError
from pmq.handlers.centre import list_page, list_query, mark_read
from pmq.reactor.http import HttpError, HttpRequest, HttpResponse, Router, json_response
from pmq.reactor.ingestbase import IngestApp, add_api_routes, check_uid, json_object, redis_call
from pmq.wire.client import is_uid

FLAGS = {"true": True, "1": True, "false": False, "0": False, "": False}


def item_id(value: str, what: str) -> int:
    """A message or broadcast id from the path; 404 for anything else (no such item)."""
    if not is_uid(value):
        raise HttpError(404, f"id: no such {what}")
    return int(value)


async def answer(call: Awaitable[Any]) -> Any:
    """Await a centre call: ActionError as its status, Redis or storage away as 503."""
    try:
        return await redis_call(call)
    except ActionError as exc:
        raise HttpError(exc.code, exc.msg) from None
    except StorageError as exc:
        raise HttpError(503, "storage unavailable, retry") from exc


class CentreRoutes:
    def __init__(self, app: IngestApp) -> None:
        self.app = app

    async def messages(self, request: HttpRequest, uid: str) -> HttpResponse:
        """GET /api/v1/users/{uid}/messages?kind=&before=&limit=&unread_only="""
        uid = check_uid(uid)
        query: dict[str, Any] = {k: v for k, v in request.query.items() if v != ""}
        if "unread_only" in query:
            flag = FLAGS.get(query["unread_only"].lower())
            query["unread_only"] = query["unread_only"] if flag is None else flag
        groups = await redis_call(self.app.routes.groups(uid))
        try:
            parsed = list_query(uid, groups, query)
        except ActionError as exc:
            raise HttpError(exc.code, exc.msg) from None
        return json_response(200, await answer(list_page(self.app, parsed)))

    async def read(self, request: HttpRequest, uid: str) -> HttpResponse:
        """POST /api/v1/users/{uid}/read {"ids"} or {"kinds"} or {} (everything)."""
        uid = check_uid(uid)
        body = json_object(request) if request.body else {}
        groups = await redis_call(self.app.routes.groups(uid))
        return json_response(200, await answer(mark_read(self.app, uid, groups, body)))

    async def revoke(self, request: HttpRequest, id: str) -> HttpResponse:
        """DELETE /api/v1/messages/{id}: 200 {"revoked": true}, 404 when none (or again)."""
        if not await answer(self.app.centre.amends.revoke(item_id(id, "message"))):
            raise HttpError(404, "id: no such message")
        return json_response(200, {"revoked": True})

    async def edit(self, request: HttpRequest, id: str) -> HttpResponse:
        """PATCH /api/v1/messages/{id} {"body": {...}}: 200 {"msg": the message now}."""
        message_id = item_id(id, "message")
        body = json_object(request).get("body")
        if not isinstance(body, dict):
            raise HttpError(400, "body: must be a JSON object")
        edited = await answer(self.app.centre.amends.edit(message_id, body))
        if edited is None:
            raise HttpError(404, "id: no such message")
        return json_response(200, {"msg": edited})

    async def revoke_broadcast(self, request: HttpRequest, id: str) -> HttpResponse:
        """DELETE /api/v1/broadcast/{id}: 200 {"revoked": true}, 404 when none (or again)."""
        if not await answer(self.app.centre.amends.revoke_broadcast(item_id(id, "broadcast"))):
            raise HttpError(404, "id: no such broadcast")
        return json_response(200, {"revoked": True})


def add_centre_routes(router: Router, app: IngestApp) -> None:
    """Add the centre's routes to the ingest ``router``, behind the API key, timed."""
    routes = CentreRoutes(app)
    add_api_routes(router, [
        ("GET", "/api/v1/users/{uid}/messages", routes.messages),
        ("POST", "/api/v1/users/{uid}/read", routes.read),
        ("DELETE", "/api/v1/messages/{id}", routes.revoke),
        ("PATCH", "/api/v1/messages/{id}", routes.edit),
        ("DELETE", "/api/v1/broadcast/{id}", routes.revoke_broadcast),
    ])
