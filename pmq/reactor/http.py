"""The ingest HTTP/1.1 server: a small asyncio protocol over httptools, JSON in and out.

Each socket worker calls :func:`start_http_server` on the shared SO_REUSEPORT port with a
:class:`Router` of ``async def handler(request, **params) -> HttpResponse`` functions. The
server answers the requests of one connection in order, one at a time (pipelined requests wait
their turn), and owns everything around the handlers: keep-alive, body limits (413), bearer
key checks (401), malformed requests (400), 404/405, and turning :class:`HttpError` or any
other exception into a JSON reply of the SPEC 5 shape ``{"code", "msg", "data"}``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hmac
import http
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, unquote

import httptools
import orjson

from pmq.protocol import MESSAGES

log = logging.getLogger(__name__)

KEEPALIVE_TIMEOUT = 75.0  # seconds a connection may stay silent between requests
LINGER_TIMEOUT = 5.0  # seconds to read-and-drop after rejecting, so the reply is not reset
MAX_HEAD = 64 * 1024  # bytes of request line + headers
MAX_PIPELINE = 32  # queued requests per connection before reading pauses
CANCEL_GRACE = 1.0  # seconds drain() gives cancelled handlers to unwind

REASONS: dict[int, str] = {s.value: s.phrase for s in http.HTTPStatus} | {
    int(code): text for code, text in MESSAGES.items()
}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

Handler = Callable[..., Awaitable["HttpResponse"]]


class HttpError(Exception):
    """Raise from a handler (or ``HttpRequest.json``/``form``) to answer ``status`` with ``msg``."""

    def __init__(self, status: int, msg: str) -> None:
        super().__init__(status, msg)
        self.status = status
        self.msg = msg


@dataclasses.dataclass(slots=True)
class HttpRequest:
    """One complete request. ``path`` is as sent (still percent-encoded); ``query`` holds the
    first value of each parameter; header names are lower case (repeats joined with ", ")."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The decoded JSON body; HttpError(400) if it is empty or not valid JSON."""
        if not self.body:
            raise HttpError(400, "body is empty; expected JSON")
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            raise HttpError(400, "body is not valid JSON") from None

    def form(self) -> dict[str, str]:
        """The x-www-form-urlencoded body, first value of each field; HttpError(400) if not UTF-8."""
        try:
            text = self.body.decode()
        except UnicodeDecodeError:
            raise HttpError(400, "body is not valid form data") from None
        return {k: v[0] for k, v in parse_qs(text, keep_blank_values=True).items()}


@dataclasses.dataclass(slots=True)
class HttpResponse:
    """What a handler returns; the server adds Content-Length and Connection."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def json_response(status: int, data: dict[str, Any] | None = None, msg: str | None = None) -> HttpResponse:
    """``{"code": status, "msg": msg or the reason phrase, "data": data or {}}`` with that status."""
    body = {"code": status, "msg": msg or REASONS.get(status, ""), "data": data or {}}
    return HttpResponse(status, orjson.dumps(body))


@dataclasses.dataclass(frozen=True, slots=True)
class _Route:
    handler: Handler
    public: bool


class Router:
    """Maps (method, path) to a handler. ``{name}`` in a pattern matches one path segment and
    is passed to the handler as a keyword argument, percent-decoded."""

    def __init__(self) -> None:
        self._static: dict[str, dict[str, _Route]] = {}
        self._dynamic: list[tuple[re.Pattern[str], dict[str, _Route]]] = []
        self._by_pattern: dict[str, dict[str, _Route]] = {}

    def add(self, method: str, pattern: str, handler: Handler, *, public: bool = False) -> None:
        """Route ``method pattern`` to ``handler``; ``public`` routes skip the API key check.
        Raises ValueError for a malformed pattern or a route added twice."""
        method = method.upper()
        methods = self._by_pattern.get(pattern)
        if methods is None:
            methods = self._by_pattern[pattern] = {}
            if "{" in pattern:
                self._dynamic.append((_compile(pattern), methods))
            elif pattern.startswith("/"):
                self._static[pattern] = methods
            else:
                raise ValueError(f"route pattern must start with '/': {pattern!r}")
        if method in methods:
            raise ValueError(f"route added twice: {method} {pattern}")
        methods[method] = _Route(handler, public)

    def match(self, path: str) -> tuple[dict[str, _Route], dict[str, str]] | None:
        """The routes by method for ``path`` and its parameters, or None if no pattern matches."""
        methods = self._static.get(path)
        if methods is not None:
            return methods, {}
        for regex, methods in self._dynamic:
            found = regex.fullmatch(path)
            if found is not None:
                return methods, {k: unquote(v) for k, v in found.groupdict().items()}
        return None


def _compile(pattern: str) -> re.Pattern[str]:
    if not pattern.startswith("/"):
        raise ValueError(f"route pattern must start with '/': {pattern!r}")
    parts = []
    for segment in pattern.split("/"):
        if segment.startswith("{") and segment.endswith("}") and segment[1:-1].isidentifier():
            parts.append(f"(?P<{segment[1:-1]}>[^/]+)")
        elif "{" in segment or "}" in segment:
            raise ValueError(f"a parameter must be a whole segment: {pattern!r}")
        else:
            parts.append(re.escape(segment))
    return re.compile("/".join(parts))


def _encode(response: HttpResponse, keep_alive: bool, head_only: bool) -> bytes:
    lines = [
        f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}\r\n"
        f"Content-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n"
    ]
    lines.extend(f"{name}: {value}\r\n" for name, value in response.headers)
    lines.append("\r\n")
    head = "".join(lines).encode("latin-1")
    return head if head_only else head + response.body


class HttpServer:
    """A listening ingest server. ``close()`` stops accepting; ``drain()`` finishes the rest."""

    def __init__(self, router: Router, *, max_body: int, api_key: str = "") -> None:
        self.router = router
        self.max_body = max_body
        self._auth = f"Bearer {api_key}".encode() if api_key else b""
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._in_flight = 0
        self._idle: asyncio.Future[None] | None = None
        self.draining = False

    @property
    def in_flight(self) -> int:
        """Requests received in full and not yet answered (running or queued behind one)."""
        return self._in_flight

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self._server.sockets) if self._server is not None else ()

    @property
    def port(self) -> int:
        """The bound port (useful when started on port 0)."""
        return int(self.sockets[0].getsockname()[1])

    def close(self) -> None:
        """Stop accepting connections; open ones carry on. Idempotent."""
        if self._server is not None:
            self._server.close()

    async def drain(self, timeout: float) -> int:
        """Stop accepting and reading, answer what was received (last replies say
        ``Connection: close``), and close connections as they go idle. At the deadline cancel
        the handlers still running, abort every connection, and return how many requests
        were unanswered (0 when all finished in time)."""
        self.close()
        self.draining = True
        loop = asyncio.get_running_loop()
        if self._in_flight:
            self._idle = loop.create_future()
        for conn in list(self._connections):
            conn.begin_drain()
        if self._idle is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._idle), timeout)
            except TimeoutError:
                pass
        left = self._in_flight
        if left:
            log.warning("http drain: %d request(s) still running at the deadline; cancelling", left)
            tasks = [c.task for c in self._connections if c.task is not None]
            for task in tasks:
                task.cancel()
            for conn in list(self._connections):
                conn.abort()
            if tasks:
                await asyncio.wait(tasks, timeout=CANCEL_GRACE)
        return left

    def request_started(self) -> None:
        self._in_flight += 1

    def request_done(self, count: int = 1) -> None:
        self._in_flight -= count
        if self._in_flight == 0 and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    def prepare(self, request: HttpRequest) -> HttpResponse | tuple[Handler, dict[str, str]]:
        """The reply when routing or the key check refuses, else the handler and its params."""
        found = self.router.match(request.path)
        if found is None:
            return json_response(404)
        methods, params = found
        route = methods.get(request.method)
        if route is None:
            allow = ", ".join(sorted(methods))
            response = json_response(405, msg=f"method not allowed; allowed: {allow}")
            response.headers = (("Allow", allow),)
            return response
        if self._auth and not route.public:
            given = request.headers.get("authorization", "").encode("latin-1")
            if not hmac.compare_digest(given, self._auth):
                response = json_response(401, msg="missing or wrong API key")
                response.headers = (("WWW-Authenticate", "Bearer"),)
                return response
        return route.handler, params

    @staticmethod
    async def call(handler: Handler, request: HttpRequest, params: dict[str, str]) -> HttpResponse:
        """Run one handler; HttpError becomes its JSON reply, any other exception a logged 500."""
        try:
            return await handler(request, **params)
        except HttpError as exc:
            return json_response(exc.status, msg=exc.msg)
        except Exception:
            log.exception("http handler failed: %s %s", request.method, request.path)
            return json_response(500, msg="internal error")


class _Connection(asyncio.Protocol):
    """One client connection: feeds httptools, queues complete requests, answers in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: collections.deque[tuple[HttpRequest | HttpResponse, bool]] = collections.deque()
        self.task: asyncio.Task[None] | None = None
        self.rejected = False  # a 400/413/431 is queued: read and drop whatever else comes
        self.read_paused = self.write_paused = self.eof = self.owe_continue = False
        self.messages = 0
        self.in_head = False
        self.head_size = 0
        self._reset_message()
        self.last_active = self.loop.time()
        self.timer = self.loop.call_later(KEEPALIVE_TIMEOUT, self._check_idle)

    def _reset_message(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.body_size = 0
        self.path = ""
        self.query: dict[str, str] = {}

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server._connections.add(self)
        if self.server.draining:
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        self._drop_queue()
        self.server._connections.discard(self)
        # A running handler is left to finish (it may be half-way through a write to Redis);
        # its reply is discarded and it is counted done then.

    def data_received(self, data: bytes) -> None:
        if self.rejected:
            return
        self.last_active = self.loop.time()
        message, was_in_head = self.messages, self.in_head
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if not isinstance(cause, HttpError):
                log.error("http parser callback failed", exc_info=cause)
                cause = HttpError(500, "internal error")
            self._reject(cause.status, cause.msg)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._reject(400, "malformed HTTP request")
        else:
            # Count only chunks wholly inside one request head: exact enough to bound memory.
            if self.in_head and was_in_head and self.messages == message:
                self.head_size += len(data)
                if self.head_size > MAX_HEAD:
                    self._reject(431, "request head too large")

    def eof_received(self) -> bool:
        self.eof = True
        if self.task is None and not self.queue:
            return False  # nothing owed: let the transport close
        return True  # half-closed: answer what was received, then close

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._next()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.messages += 1
        self.in_head = True
        self.head_size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        old = self.headers.get(key)
        self.headers[key] = text if old is None else f"{old}, {text}"

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.parser.should_upgrade():
            raise HttpError(400, "protocol upgrade not supported")
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            raise HttpError(400, "malformed request target") from None
        self.path = url.path.decode("latin-1")
        if url.query:
            parsed = parse_qs(url.query.decode("latin-1"), keep_blank_values=True)
            self.query = {k: v[0] for k, v in parsed.items()}
        length = self.headers.get("content-length")
        if length is not None and int(length) > self.server.max_body:
            raise HttpError(413, f"body over {self.server.max_body} bytes")
        if self.headers.get("expect", "").lower() == "100-continue":
            self.owe_continue = True
            self._send_continue()

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > self.server.max_body:
            raise HttpError(413, f"body over {self.server.max_body} bytes")
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.owe_continue = False
        request = HttpRequest(
            self.parser.get_method().decode("ascii"),
            self.path,
            self.query,
            self.headers,
            b"".join(self.body),
        )
        self.queue.append((request, self.parser.should_keep_alive()))
        self.server.request_started()
        self._reset_message()
        if len(self.queue) >= MAX_PIPELINE and not self.read_paused:
            self._transport().pause_reading()
            self.read_paused = True
        self._next()

    # answering

    def _transport(self) -> asyncio.Transport:
        assert self.transport is not None
        return self.transport

    def _next(self) -> None:
        """Answer queued requests in order: a routing refusal at once, a handler in a task.
        Returns while a handler runs; its task calls back here when it is done."""
        transport = self._transport()
        while self.task is None and self.queue and not self.write_paused:
            if transport.is_closing():
                return
            item, keep_alive = self.queue.popleft()
            if isinstance(item, HttpResponse):
                self._send_rejection(item)
                return
            prepared = self.server.prepare(item)
            if isinstance(prepared, HttpResponse):
                self._send(item, prepared, keep_alive)
            else:
                handler, params = prepared
                self.task = self.loop.create_task(self._run(item, handler, params, keep_alive))
        if self.read_paused and len(self.queue) < MAX_PIPELINE // 2 and not self.server.draining:
            transport.resume_reading()
            self.read_paused = False
        if self.task is None and not self.queue and not transport.is_closing():
            if self.eof or self.server.draining:
                transport.close()
            else:
                self._send_continue()

    async def _run(
        self, request: HttpRequest, handler: Handler, params: dict[str, str], keep_alive: bool
    ) -> None:
        response: HttpResponse | None = None
        try:
            response = await self.server.call(handler, request, params)
        finally:
            self.task = None
            if response is None:  # cancelled by drain()
                self.server.request_done()
            else:
                self._send(request, response, keep_alive)
                self._next()

    def _send(self, request: HttpRequest, response: HttpResponse, keep_alive: bool) -> None:
        self.server.request_done()
        transport = self._transport()
        if transport.is_closing():
            return
        if self.server.draining and not self.queue:
            keep_alive = False
        transport.write(_encode(response, keep_alive, request.method == "HEAD"))
        self.last_active = self.loop.time()
        if not keep_alive:
            self._drop_queue()
            transport.close()

    def _send_continue(self) -> None:
        # Only when nothing is owed before it: a 100 must not overtake an earlier reply.
        if self.owe_continue and self.task is None and not self.queue:
            self.owe_continue = False
            self._transport().write(CONTINUE)

    def _reject(self, status: int, msg: str) -> None:
        """Queue a final error reply after the replies already owed, then drop all input."""
        self.rejected = True
        self.owe_continue = False
        self.queue.append((json_response(status, msg=msg), False))
        if self.read_paused:  # keep reading (and dropping) so closing does not reset the reply
            self._transport().resume_reading()
            self.read_paused = False
        self._next()

    def _send_rejection(self, response: HttpResponse) -> None:
        transport = self._transport()
        transport.write(_encode(response, False, False))
        self._drop_queue()
        if transport.can_write_eof():
            # Half-close and read-and-drop until the client closes or LINGER_TIMEOUT, so
            # unread request bytes do not turn our close into a reset that loses the reply.
            transport.write_eof()
            self.timer.cancel()
            self.timer = self.loop.call_later(LINGER_TIMEOUT, transport.abort)
        else:
            transport.close()

    def _drop_queue(self) -> None:
        dropped = sum(isinstance(item, HttpRequest) for item, _ in self.queue)
        self.queue.clear()
        if dropped:
            self.server.request_done(dropped)

    def _check_idle(self) -> None:
        transport = self._transport()
        if transport.is_closing():
            return
        quiet = self.loop.time() - self.last_active
        if self.task is None and not self.queue and quiet >= KEEPALIVE_TIMEOUT:
            transport.close()
        else:
            self.timer = self.loop.call_later(max(KEEPALIVE_TIMEOUT - quiet, 1.0), self._check_idle)

    def begin_drain(self) -> None:
        """Stop reading new requests; close now if nothing is owed (else after the last reply)."""
        transport = self._transport()
        if not transport.is_closing():
            transport.pause_reading()
            self.read_paused = True
            if self.task is None and not self.queue:
                transport.close()

    def abort(self) -> None:
        self._drop_queue()
        self._transport().abort()


async def start_http_server(
    router: Router,
    host: str,
    port: int,
    *,
    max_body: int,
    api_key: str = "",
    reuse_port: bool = True,
) -> HttpServer:
    """Listen on ``host:port`` (SO_REUSEPORT by default, shared with sibling workers) and serve
    ``router``. With ``api_key`` set, every non-public route needs ``Authorization: Bearer
    <key>``. The caller owns the result: ``close()`` it, then ``await drain(timeout)``."""
    loop = asyncio.get_running_loop()
    server = HttpServer(router, max_body=max_body, api_key=api_key)
    server._server = await loop.create_server(
        lambda: _Connection(server), host, port, reuse_port=reuse_port
    )
    return server
