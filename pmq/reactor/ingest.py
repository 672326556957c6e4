"""The internal HTTP API on the ingest port (docs/ingest.md): routes and handlers.

The HTTP mechanics live in pmq.reactor.httpserver (body limit, API key, routing refusals)
and pmq.reactor.httpconn (parsing, keep-alive, pipelining, timeouts); this module only maps
paths to what the site asks for.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from redis.exceptions import RedisError

from pmq import metrics
from pmq.domain.broadcast import ALL, content_key, id_key
from pmq.domain.messaging import publish
from pmq.errors import StorageError
from pmq.reactor import openapi
from pmq.reactor.bulkpresence import add_presence_route
from pmq.reactor.centre import add_centre_routes
from pmq.reactor.connections import close_reason
from pmq.reactor.http import HttpError, HttpRequest, HttpResponse, Router, json_response
from pmq.reactor.ingestbase import IngestApp, add_api_routes, check_uid, json_object, redis_call
from pmq.wire.client import Kind, is_kind

__all__ = ["IngestApp", "IngestRoutes", "build_router", "check_uid", "json_object"]

MAX_RECIPIENTS = 1000
DEDUPE_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
GROUP = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def message_fields(body: dict[str, Any]) -> tuple[list[str], str, str | None, Any, str | None]:
    """Check a publish request: (recipients, kind, sender, body, dedupe key)."""
    to = body.get("to")
    if isinstance(to, list):
        if not to or len(to) > MAX_RECIPIENTS:
            raise HttpError(400, f"to: a list of 1 to {MAX_RECIPIENTS} user ids")
        recipients = list(dict.fromkeys(check_uid(uid, "to") for uid in to))
    else:
        recipients = [check_uid(to, "to")]
    kind = body.get("kind")
    if not is_kind(kind):
        raise HttpError(400, 'kind: must match [a-z_]{1,32}, e.g. "comment"')
    sender = body.get("from")
    sender = None if sender is None else check_uid(sender, "from")
    if not isinstance(body.get("body"), dict):
        raise HttpError(400, "body: must be a JSON object")
    return recipients, str(kind), sender, body["body"], dedupe_field(body)


def dedupe_field(body: dict[str, Any]) -> str | None:
    key = body.get("id")
    if key is not None and (not isinstance(key, str) or not DEDUPE_KEY.fullmatch(key)):
        raise HttpError(400, "id: must be 1-128 characters of A-Z a-z 0-9 _ . : -")
    return key


def broadcast_fields(body: dict[str, Any]) -> tuple[str, str, Any, str | None]:
    """Check a broadcast request: (group, kind, body, dedupe key)."""
    group = body.get("group")
    if not isinstance(group, str) or not GROUP.fullmatch(group):
        raise HttpError(400, 'group: "all" or a group name (1-64 of A-Z a-z 0-9 _ . : -)')
    kind = body.get("kind", Kind.SYSTEM)
    if not is_kind(kind):
        raise HttpError(400, 'kind: must match [a-z_]{1,32}, e.g. "system"')
    if not isinstance(body.get("body"), dict):
        raise HttpError(400, "body: must be a JSON object")
    return group, str(kind), body["body"], dedupe_field(body)


class IngestRoutes:
    """The ingest API's handlers, each answering one route for the services of ``app``."""

    def __init__(self, app: IngestApp) -> None:
        self.app = app

    async def healthz(self, request: HttpRequest) -> HttpResponse:
        """200 when Redis and the store answer, else 503 naming what is down."""
        checks: dict[str, str] = {}
        try:
            await self.app.redis.ping()
            checks["redis"] = "ok"
        except (RedisError, OSError) as exc:
            checks["redis"] = f"down: {exc}"
        try:
            await self.app.in_thread(self.app.store.ping)
            checks["storage"] = "ok"
        except StorageError as exc:
            checks["storage"] = f"down: {exc}"
        failing = [name for name, state in checks.items() if state != "ok"]
        if failing:
            return json_response(503, checks, msg=f"unavailable: {', '.join(failing)}")
        return json_response(200, checks)

    async def user(self, request: HttpRequest, uid: str) -> HttpResponse:
        """The user's presence (online, connections) and unread counts."""
        uid = check_uid(uid)
        conns = await redis_call(self.app.routes.connections(uid))
        unread = await redis_call(self.app.unread.counts(uid, await self.app.routes.groups(uid)))
        return json_response(
            200, {"uid": uid, "online": bool(conns), "connections": len(conns), "unread": unread}
        )

    async def accept(
        self, recipients: list[str], kind: str, sender: str | None, body: Any, key: str | None
    ) -> HttpResponse:
        """Publish a checked message: 202 with its ids, 200 for a duplicate key."""
        accepted, online = await redis_call(
            publish(self.app.inbox, self.app.routes, recipients, kind, sender, body, key)
        )
        if accepted.duplicate:
            return json_response(200, {"ids": accepted.ids, "online": 0, "duplicate": True})
        return json_response(202, {"ids": accepted.ids, "online": online})

    async def messages(self, request: HttpRequest) -> HttpResponse:
        """POST /api/v1/messages: a message to one user or a list of users."""
        return await self.accept(*message_fields(json_object(request)))

    async def seed_comment(self, request: HttpRequest) -> HttpResponse:
        """The old site's form: ``uid`` and ``msg`` (JSON with ``comment_uid``)."""
        form = request.form()
        uid = check_uid(form.get("uid"), "uid")
        try:
            msg = orjson.loads(form.get("msg", ""))
        except orjson.JSONDecodeError:
            raise HttpError(400, "msg: must be JSON") from None
        if not isinstance(msg, dict):
            raise HttpError(400, "msg: must be a JSON object")
        sender = check_uid(msg.get("comment_uid"), "msg.comment_uid")
        return await self.accept([uid], Kind.COMMENT, sender, msg, None)

    async def kick(self, request: HttpRequest, uid: str) -> HttpResponse:
        """Revoke the user's tokens, then close every connection of theirs (4001)."""
        uid = check_uid(uid)
        reason = ""
        if request.body:
            body = json_object(request)
            reason = body.get("reason") or ""
            if not isinstance(reason, str):
                raise HttpError(400, "reason: must be a string")
            reason = close_reason(reason)  # what the close frame holds, cut here once
        # Revoke first: a client closed below that reconnects at once with the same token
        # is then refused on every node.
        await redis_call(self.app.authenticator.revoke(uid))
        closed = await redis_call(self.app.routes.kick(uid, reason or "kicked"))
        return json_response(200, {"closed": closed})

    async def announce(self, group: str, kind: str, body: Any, key: str | None) -> HttpResponse:
        """Publish a checked broadcast: 202 with its id, 200 for a repeat of its dedupe
        ``key`` (none: never a repeat)."""
        published = await redis_call(self.app.broadcasts.publish(group, kind, body, key))
        if published.duplicate:
            return json_response(200, {"id": published.id, "duplicate": True})
        metrics.BROADCASTS.labels(group).inc()
        return json_response(202, {"id": published.id})

    async def broadcast(self, request: HttpRequest) -> HttpResponse:
        """POST /api/v1/broadcast: a message to a group, or to everyone."""
        group, kind, body, explicit = broadcast_fields(json_object(request))
        return await self.announce(group, kind, body, id_key(explicit) if explicit else None)

    async def seed_system(self, request: HttpRequest) -> HttpResponse:
        """The old site's form: ``msg`` (JSON), a system message to everyone."""
        try:
            msg = orjson.loads(request.form().get("msg", ""))
        except orjson.JSONDecodeError:
            raise HttpError(400, "msg: must be JSON") from None
        if not isinstance(msg, dict):
            raise HttpError(400, "msg: must be a JSON object")
        return await self.announce(ALL, Kind.SYSTEM, msg, content_key(ALL, Kind.SYSTEM, msg))

    async def prometheus(self, request: HttpRequest) -> HttpResponse:
        """The node's metrics in Prometheus's text format."""
        body, content_type = metrics.render()
        return HttpResponse(200, body, content_type)


def build_router(app: IngestApp) -> Router:
    """The ingest port's routes: /healthz, /metrics and /openapi.json public, the API behind
    the API key, each API route timed (pmq_ingest_request_seconds)."""
    routes = IngestRoutes(app)
    router = Router()
    router.add("GET", "/healthz", routes.healthz, public=True)
    router.add("GET", "/metrics", routes.prometheus, public=True)
    router.add("GET", "/openapi.json", openapi.serve, public=True)
    add_api_routes(router, [
        ("GET", "/api/v1/users/{uid}", routes.user),
        ("POST", "/api/v1/users/{uid}/kick", routes.kick),
        ("POST", "/api/v1/messages", routes.messages),
        ("POST", "/api/comment/message", routes.seed_comment),
        ("POST", "/api/v1/broadcast", routes.broadcast),
        ("POST", "/api/system/message", routes.seed_system),
    ])
    add_centre_routes(router, app)
    add_presence_route(router, app)
    return router
