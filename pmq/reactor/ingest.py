"""The internal HTTP API of SPEC 5 on the ingest port: routes and their handlers.

The HTTP mechanics (parsing, keep-alive, body limit, API key) live in pmq.reactor.http;
this module only maps paths to what the site asks for.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from redis.exceptions import RedisError

from pmq import protocol
from pmq.errors import StorageError
from pmq.handlers.base import App
from pmq.reactor.http import HttpError, HttpRequest, HttpResponse, Router, json_response
from pmq.store import Store

log = logging.getLogger(__name__)


class IngestApp(App, Protocol):
    @property
    def store(self) -> Store: ...
    async def in_thread(self, func: Any, *args: Any) -> Any: ...


def check_uid(value: str) -> str:
    if not protocol.is_uid(value):
        raise HttpError(400, "uid: must be a positive integer")
    return value


def build_router(app: IngestApp) -> Router:
    router = Router()

    async def healthz(request: HttpRequest) -> HttpResponse:
        checks: dict[str, str] = {}
        try:
            await app.redis.ping()
            checks["redis"] = "ok"
        except (RedisError, OSError) as exc:
            checks["redis"] = f"down: {exc}"
        try:
            await app.in_thread(app.store.ping)
            checks["storage"] = "ok"
        except StorageError as exc:
            checks["storage"] = f"down: {exc}"
        failing = [name for name, state in checks.items() if state != "ok"]
        if failing:
            return json_response(503, checks, msg=f"unavailable: {', '.join(failing)}")
        return json_response(200, checks)

    async def user(request: HttpRequest, uid: str) -> HttpResponse:
        check_uid(uid)
        conns = await redis_call(app.routes.connections(uid))
        return json_response(200, {"uid": uid, "online": bool(conns), "connections": len(conns)})

    async def kick(request: HttpRequest, uid: str) -> HttpResponse:
        check_uid(uid)
        reason = ""
        if request.body:
            body = request.json()
            if not isinstance(body, dict):
                raise HttpError(400, "body: must be a JSON object")
            reason = body.get("reason") or ""
            if not isinstance(reason, str) or len(reason) > 120:
                raise HttpError(400, "reason: must be a string of at most 120 characters")
        closed = await redis_call(app.routes.kick(uid, reason or "kicked"))
        return json_response(200, {"closed": closed})

    router.add("GET", "/healthz", healthz, public=True)
    router.add("GET", "/api/v1/users/{uid}", user)
    router.add("POST", "/api/v1/users/{uid}/kick", kick)
    return router


async def redis_call(awaitable: Any) -> Any:
    """Await a Redis-backed operation; an unreachable Redis becomes 503 for the site."""
    try:
        return await awaitable
    except (RedisError, OSError) as exc:
        log.error("redis unavailable: %s", exc)
        raise HttpError(503, "redis unavailable, retry") from exc
