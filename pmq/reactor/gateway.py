"""The client WebSocket endpoint: handshake auth, the static pages, requests and replies.

One :class:`Gateway` per socket worker, listening with SO_REUSEPORT on the client port
(the sockets themselves are pmq.reactor.websocket's). The upgrade is decided before anything
is kept: a token (query ``token`` or ``Authorization: Bearer``) that does not authenticate gets
HTTP 401 and no registry entry. Requests of one connection are answered one at a time, in
order.

The same port serves the files of each folder of ``pmq/static`` to plain GETs under the
folder's name: the customer-service pages (``/cs/agent.html``, ``/cs/chat.html`` and their
scripts), the JavaScript client the pages are built on, ``/cs/pmq-client.js`` (a link to
``clients/js/index.js``, copied by a plain install), and the notification-centre demo
(``/demo/inbox.html``); every other path is a 404.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from pmq.domain.auth import Authenticator, Identity
from pmq.domain.kicks import now_ms
from pmq.errors import ActionError, AuthError, StorageError
from pmq.handlers.base import App, Caller, Handler
from pmq.log import Throttled
from pmq.reactor.connections import Client, ConnectionTable, new_conn_id
from pmq.reactor.http import HttpRequest, HttpResponse, plain_response
from pmq.reactor.websocket import Connection, Decision, Upgrade
from pmq.wire import client as wire
from pmq.wire.client import Code, ProtocolError, encode_reply, parse_request

log = logging.getLogger(__name__)
UNAVAILABLE = Throttled(log)

WS_PATH = "/ws"
RATE_LIMITED = "rate limit: slow down"
MAX_ACTION_SHOWN = 64  # characters of an unknown action's name its 404 repeats
# Connections waiting to be accepted, per socket worker (the kernel caps it at somaxconn).
# When a node restarts, its clients all come back at once; a full queue drops their SYNs
# and each client's TCP tries again only after 1 s, then 3 s, 7 s... (asyncio's own default
# is 100).
ACCEPT_BACKLOG = 4096
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The pages take their token from the URL: never let it leak as a Referer to image hosts.
# Images may come from any http(s) host; scripts, styles and sockets only from this node.
STATIC_HEADERS = (
    ("Cache-Control", "no-cache"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src http: https:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
)

OnOpen = Callable[[Client], Awaitable[None]]
OnClose = Callable[[Client], Awaitable[None]]


def token_of(request: HttpRequest) -> str:
    """The client token from ``?token=`` or ``Authorization: Bearer``; "" when absent."""
    token = request.query.get("token")
    if token:
        return token
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def origin_allowed(request: HttpRequest, allowed: frozenset[str]) -> bool:
    """True when the handshake has no Origin header (native apps, servers) or its one Origin
    is in ``allowed`` (lower case); a repeated Origin header (joined with ", ") is never
    allowed."""
    origin = request.headers.get("origin")
    return origin is None or origin.strip().lower() in allowed


def load_static() -> dict[str, HttpResponse]:
    """GET path -> ready response for every file of the folders of pmq/static, each as
    /folder/file (read once, at start)."""
    pages: dict[str, HttpResponse] = {}
    for folder in (importlib.resources.files("pmq") / "static").iterdir():
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            content_type = STATIC_TYPES.get("." + entry.name.rpartition(".")[2])
            if content_type is None or not entry.is_file():
                continue
            pages[f"/{folder.name}/{entry.name}"] = HttpResponse(
                200, entry.read_bytes(), content_type, STATIC_HEADERS
            )
    return pages


def forget_tracebacks(error: BaseException) -> None:
    """Drop the tracebacks of ``error`` and of the errors it was raised from or during, once
    it has been answered and logged. An action's error can sit in a reference cycle with the
    frames it went through: a Redis call that timed out in redis-py's pool (``raise ... from
    err`` keeps ``err`` in the frame its traceback holds) under an ``asyncio.gather`` (whose
    failed child keeps the error) holds the action's frames, and so the connection. The heap
    freezer (pmq.workers.heap) would keep all that until its hourly full collection; without
    the tracebacks it goes by reference count."""
    pending: list[BaseException | None] = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        pending += [current.__cause__, current.__context__]


class Gateway:
    def __init__(
        self,
        app: App,
        table: ConnectionTable,
        authenticator: Authenticator,
        handlers: Callable[[], dict[str, Handler]],
        on_open: OnOpen,
        on_close: OnClose,
        on_leaving: OnClose,
    ) -> None:
        self.app = app
        self.table = table
        self.authenticator = authenticator
        self.handlers = handlers
        self.on_open = on_open
        self.on_close = on_close
        self.on_leaving = on_leaving
        self.server: asyncio.Server | None = None
        self.static = load_static()
        # Checked before the token: a foreign page would get its tokens checked (a
        # user-centre call each in auth.mode = "http") and learn from 401 or 403 whether
        # they are good.
        self.origins = frozenset(o.lower() for o in app.config.server.allowed_origins)

    async def start(self, host: str, port: int) -> None:
        max_frame = self.app.config.server.max_frame
        self.server = await asyncio.get_running_loop().create_server(
            lambda: Upgrade(self.decide, max_frame),
            host,
            port,
            reuse_port=True,
            backlog=ACCEPT_BACKLOG,
        )

    async def decide(self, request: HttpRequest) -> Decision:
        """Authenticate before the upgrade; anything but a good token on /ws is refused,
        except GETs of the static pages, answered here. A page of a site not in
        server.allowed_origins is refused (403) before its token is looked at."""
        if request.path != WS_PATH:
            page = self.static.get(request.path) if request.method == "GET" else None
            return page or plain_response(404, "not found")
        if self.origins and not origin_allowed(request, self.origins):
            return plain_response(403, "origin not allowed")
        token = token_of(request)
        if not token:
            return plain_response(401, "missing token")
        checked_ms = now_ms()  # a kick from now on may have passed the check unseen
        try:
            identity = await self.authenticator.authenticate(token)
        except AuthError as exc:
            return plain_response(exc.status, exc.reason)
        opened = functools.partial(self.opened, identity, checked_ms)
        return Connection(
            self.app.config.server.max_frame, opened, self.on_message, self.closed, self.leaving
        )

    async def opened(self, identity: Identity, checked_ms: int, connection: Connection) -> None:
        """The 101 is out: the connection becomes a Client. (Made only now: picows may still
        refuse the upgrade's headers, and a Client made before would be left behind.)"""
        config = self.app.config.server
        client = Client(
            connection, new_conn_id(), identity, config.max_pending, config.rate, checked_ms
        )
        connection.client = client
        self.table.add(client)
        try:
            await self.on_open(client)
        except Exception:
            log.exception("connection failed conn=%s uid=%s", client.conn_id, client.uid)
            client.close(wire.CloseCode.INTERNAL_ERROR, "internal error")

    async def on_message(self, connection: Connection, frame: bytes) -> None:
        client: Client = connection.client
        try:
            await self.on_frame(client, frame)
        except Exception:
            log.exception("request failed conn=%s uid=%s", client.conn_id, client.uid)

    async def leaving(self, connection: Connection) -> None:
        """The client closed: what must be done before its close completes."""
        client: Client | None = connection.client
        if client is not None:
            await self.on_leaving(client)

    async def closed(self, connection: Connection) -> None:
        client: Client = connection.client
        connection.client = None  # the two hold each other: freed by refcount, not the collector
        self.table.remove(client)
        try:
            await self.on_close(client)
        except Exception:
            log.exception("cleanup failed conn=%s uid=%s", client.conn_id, client.uid)

    async def on_frame(self, client: Client, frame: bytes) -> None:
        # Every frame counts against server.rate, valid JSON or not: a flood of garbage
        # costs the worker as much as a flood of requests. The frame is still parsed for
        # the id the 429 names.
        allowed = client.allow_request()
        try:
            request = parse_request(frame)
        except ProtocolError as exc:
            code, msg = (exc.code, exc.msg) if allowed else (Code.RATE_LIMITED, RATE_LIMITED)
            client.send(encode_reply(exc.request_id, code, msg))
            return
        if not allowed:
            client.send(encode_reply(request.id, Code.RATE_LIMITED, RATE_LIMITED))
            return
        client.send(await self.call(client, request))

    async def call(self, client: Client, request: wire.Request) -> bytes:
        handler = self.handlers().get(request.action)
        if handler is None:
            name = request.action[:MAX_ACTION_SHOWN]  # any string: the reply names it briefly
            return encode_reply(request.id, Code.NOT_FOUND, f"unknown action {name!r}")
        try:
            data: dict[str, Any] = await handler(
                self.app, Caller(client.identity, client.conn_id), request.data
            )
        except ActionError as exc:
            forget_tracebacks(exc)
            return encode_reply(request.id, exc.code, exc.msg)
        except (RedisError, OSError, StorageError) as exc:
            # Redis or storage away (or no pooled connection free in time): the client
            # retries later, as after any 503; nothing in PMQ is broken.
            UNAVAILABLE.warning("action %s answered 503: %s", request.action, exc)
            forget_tracebacks(exc)
            return encode_reply(request.id, Code.UNAVAILABLE, "unavailable, retry")
        except Exception as exc:
            log.exception(
                "action %s failed conn=%s uid=%s", request.action, client.conn_id, client.uid
            )
            forget_tracebacks(exc)
            return encode_reply(request.id, Code.SERVER_ERROR, "internal error")
        return encode_reply(request.id, Code.OK, data=data)

    def close(self) -> None:
        """Stop accepting new connections (idempotent); open ones stay."""
        if self.server is not None:
            self.server.close()

    def close_all(self, code: int, reason: str) -> None:
        for client in self.table:
            client.close(code, reason)
