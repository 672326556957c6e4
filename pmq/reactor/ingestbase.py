"""What every ingest route shares (pmq.reactor.ingest, pmq.reactor.centre): the services it is
given, the checks of a uid and of a JSON object body, Redis away as 503, and the timing of
each route.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

from redis.exceptions import RedisError

from pmq import metrics
from pmq.domain.auth import Authenticator
from pmq.handlers.base import App
from pmq.log import Throttled
from pmq.reactor.http import HttpError, HttpRequest, HttpResponse, Router
from pmq.store import Store
from pmq.wire.client import is_uid

log = logging.getLogger(__name__)
REDIS_DOWN = Throttled(log)
T = TypeVar("T")


class IngestApp(App, Protocol):
    """What the routes need of the socket worker; ``in_thread`` is the worker base's."""

    @property
    def store(self) -> Store: ...
    @property
    def authenticator(self) -> Authenticator: ...
    async def in_thread(self, func: Callable[..., T], *args: Any) -> T: ...


def check_uid(value: object, field: str = "uid") -> str:
    """A uid as its canonical decimal string; 400 naming ``field`` otherwise."""
    if not is_uid(value):
        raise HttpError(400, f"{field}: must be a user id (a positive integer)")
    return str(int(value))  # type: ignore[call-overload]


def json_object(request: HttpRequest) -> dict[str, Any]:
    body = request.json()
    if not isinstance(body, dict):
        raise HttpError(400, "body: must be a JSON object")
    return body


def add_api_routes(router: Router, routes: Iterable[tuple[str, str, Any]]) -> None:
    """Add each (method, path, handler) to the ingest ``router`` behind the API key, its run
    time recorded in pmq_ingest_request_seconds{route}."""
    for method, path, handler in routes:
        router.add(method, path, timed(path, handler))


def timed(route: str, handler: Any) -> Any:
    """The handler, its run time recorded in pmq_ingest_request_seconds{route}."""
    histogram = metrics.buffered(metrics.INGEST_SECONDS.labels(route))

    async def run(request: HttpRequest, **params: str) -> HttpResponse:
        start = time.perf_counter()
        try:
            return await handler(request, **params)
        finally:
            histogram.observe(time.perf_counter() - start)

    return run


async def redis_call(awaitable: Any) -> Any:
    """Await a Redis-backed operation; an unreachable Redis becomes 503 for the site."""
    try:
        return await awaitable
    except (RedisError, OSError) as exc:
        REDIS_DOWN.warning("redis unavailable, answered 503: %s", exc)
        raise HttpError(503, "redis unavailable, retry") from exc
