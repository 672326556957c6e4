"""The client WebSocket endpoint: handshake auth, the request loop, hello and replies.

One :class:`Gateway` per socket worker, listening with SO_REUSEPORT on the client port.
The handshake authenticates the token (query ``token`` or ``Authorization: Bearer``) before
anything is kept; a refused token gets HTTP 401 and no registry entry.

The same port serves the customer-service pages (``/cs/agent.html``, ``/cs/chat.html`` and
their scripts, from ``pmq/static/cs``) to plain GETs; every other path is a 404.
"""

from __future__ import annotations

import http
import importlib.resources
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import websockets
from redis.exceptions import RedisError
from websockets.asyncio.server import Server, ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from pmq.domain.auth import Authenticator, Identity
from pmq.domain.kicks import now_ms
from pmq.errors import ActionError, AuthError, StorageError
from pmq.handlers.base import App, Caller, Handler
from pmq.log import Throttled
from pmq.reactor.connections import Client, ConnectionTable, new_conn_id
from pmq.reactor.heartbeat import WatchedConnection
from pmq.wire import client as wire
from pmq.wire.client import Code, ProtocolError, encode_reply, parse_request

log = logging.getLogger(__name__)
UNAVAILABLE = Throttled(log)

WS_PATH = "/ws"
RATE_LIMITED = "rate limit: slow down"
CLOSE_TIMEOUT = 2.0
STATIC_PREFIX = "/cs/"
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The pages take their token from the URL: never let it leak as a Referer to image hosts.
# Images may come from any http(s) host; scripts, styles and sockets only from this node.
STATIC_HEADERS = [
    ("Cache-Control", "no-cache"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src http: https:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
]

OnOpen = Callable[[Client], Awaitable[None]]
OnClose = Callable[[Client], Awaitable[None]]


def token_of(request: Request) -> str:
    """The client token from ``?token=`` or ``Authorization: Bearer``; "" when absent."""
    query = parse_qs(urlsplit(request.path).query)
    if query.get("token"):
        return query["token"][0]
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def origin_allowed(request: Request, allowed: frozenset[str]) -> bool:
    """True when the handshake has no Origin header (native apps, servers) or its one Origin
    is in ``allowed`` (lower case); a repeated Origin header is never allowed."""
    origins = request.headers.get_all("Origin")
    if not origins:
        return True
    return len(origins) == 1 and origins[0].strip().lower() in allowed


def load_static() -> dict[str, Response]:
    """GET path -> ready response for every file of pmq/static/cs (read once, at start)."""
    pages: dict[str, Response] = {}
    folder = importlib.resources.files("pmq") / "static" / "cs"
    for entry in folder.iterdir():
        content_type = STATIC_TYPES.get("." + entry.name.rpartition(".")[2])
        if content_type is None or not entry.is_file():
            continue
        body = entry.read_bytes()
        headers = Headers(
            [
                ("Content-Type", content_type),
                ("Content-Length", str(len(body))),
                *STATIC_HEADERS,
                ("Connection", "close"),
            ]
        )
        pages[STATIC_PREFIX + entry.name] = Response(200, "OK", headers, body)
    return pages


def plain_response(status: http.HTTPStatus, text: str) -> Response:
    body = (text + "\n").encode()
    headers = Headers(
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


# What a connection keeps of its upgrade once it is open (see forget_handshake).
SPENT_REQUEST = Request(WS_PATH, Headers())
SPENT_RESPONSE = Response(http.HTTPStatus.SWITCHING_PROTOCOLS, "Switching Protocols", Headers())


def forget_handshake(ws: ServerConnection) -> None:
    """Drop the upgrade's request and response, which websockets keeps for the connection's
    life: their headers (a browser's cookies and user agent, often KiBs) and the token in
    the URL are not needed past the upgrade. They become shared placeholders, not None:
    websockets takes a None request for "the handshake has not come yet"."""
    ws.request = SPENT_REQUEST
    ws.response = SPENT_RESPONSE


def forget_parser_error(ws: ServerConnection) -> None:
    """Drop the traceback of the error that ended the connection's parser. websockets keeps
    that error (an EOFError when the peer went away without a close frame, as phones do),
    and its traceback holds the parser's frame, which holds the protocol: a reference cycle.
    The heap freezer (pmq.workers.heap) would keep it until its hourly full collection;
    without the traceback the connection is freed by reference count when it ends."""
    error = ws.protocol.parser_exc
    if error is not None:
        error.__traceback__ = None


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
    ) -> None:
        self.app = app
        self.table = table
        self.authenticator = authenticator
        self.handlers = handlers
        self.on_open = on_open
        self.on_close = on_close
        self.server: Server | None = None
        self.static = load_static()
        # Checked here rather than by websockets' ``origins``, which runs after
        # process_request: a foreign page would get its tokens checked (a user-centre call
        # each in auth.mode = "http") and learn from 401 or 403 whether they are good.
        self.origins = frozenset(o.lower() for o in app.config.server.allowed_origins)

    async def start(self, host: str, port: int) -> None:
        config = self.app.config
        self.server = await websockets.serve(
            self.serve_connection,
            host,
            port,
            reuse_port=True,
            process_request=self.process_request,
            max_size=config.server.max_frame,
            max_queue=4,
            create_connection=WatchedConnection,
            ping_interval=None,  # pmq.reactor.heartbeat pings, one loop for every connection
            close_timeout=CLOSE_TIMEOUT,
            compression=None,
            server_header=None,
        )

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """Authenticate before the upgrade; anything but a good token on /ws is refused,
        except GETs of the static pages, answered here. A page of a site not in
        server.allowed_origins is refused (403) before its token is looked at."""
        path = urlsplit(request.path).path
        if path != WS_PATH:
            return self.static.get(path) or plain_response(http.HTTPStatus.NOT_FOUND, "not found")
        if self.origins and not origin_allowed(request, self.origins):
            return plain_response(http.HTTPStatus.FORBIDDEN, "origin not allowed")
        token = token_of(request)
        if not token:
            return plain_response(http.HTTPStatus.UNAUTHORIZED, "missing token")
        checked_ms = now_ms()  # a kick from now on may have passed the check unseen
        try:
            identity = await self.authenticator.authenticate(token)
        except AuthError as exc:
            return plain_response(http.HTTPStatus(exc.status), exc.reason)
        connection.pmq_identity = (identity, checked_ms)  # type: ignore[attr-defined]
        return None

    async def serve_connection(self, ws: ServerConnection) -> None:
        identity: Identity
        identity, checked_ms = ws.pmq_identity  # type: ignore[attr-defined]
        forget_handshake(ws)
        config = self.app.config.server
        client = Client(ws, new_conn_id(), identity, config.max_pending, config.rate, checked_ms)
        self.table.add(client)
        try:
            await self.on_open(client)
            async for frame in ws:
                await self.on_frame(client, frame)
        except websockets.ConnectionClosed:
            pass
        except Exception:
            log.exception("connection failed conn=%s uid=%s", client.conn_id, client.uid)
        finally:
            self.table.remove(client)
            forget_parser_error(ws)
            try:
                await self.on_close(client)
            except Exception:
                log.exception("cleanup failed conn=%s uid=%s", client.conn_id, client.uid)

    async def on_frame(self, client: Client, frame: str | bytes) -> None:
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
            return encode_reply(request.id, Code.NOT_FOUND, f"unknown action {request.action!r}")
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
            self.server.close(close_connections=False)

    def close_all(self, code: int, reason: str) -> None:
        for client in self.table:
            client.close(code, reason)
