"""The ingest HTTP/1.1 server: a small asyncio protocol over httptools, JSON in and out.

Each socket worker calls :func:`start_http_server` on the shared SO_REUSEPORT port with a
:class:`Router` of ``async def handler(request, **params) -> HttpResponse`` functions. The
server answers the requests of one connection in order, one at a time (pipelined requests wait
their turn), and owns everything around the handlers: keep-alive, body limits (413), bearer
key checks (401), malformed requests (400), 404/405, and turning :class:`HttpError` or any
other exception into a JSON reply of the SPEC 5 shape ``{"code", "msg", "data"}``.

Hostile clients are bounded too (docs/security.md): a ``Transfer-Encoding`` other than
``chunked`` is 501; a request whose head and body are not in within ``request_timeout``
seconds of its first byte is 408 and closes; a new connection that sends nothing for that
long is closed without a reply; past ``max_connections`` open connections a new one is
answered 503 and closed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import hmac
import http
import logging
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import parse_qs, unquote

import httptools
import orjson

from pmq.wire.client import MESSAGES

log = logging.getLogger(__name__)

KEEPALIVE_TIMEOUT = 75.0  # seconds a connection may stay silent between requests
REQUEST_TIMEOUT = 10.0  # seconds from a request's first byte to its last (ingest.request_timeout)
MAX_CONNECTIONS = 1024  # open connections served at once (ingest.max_connections)
LINGER_TIMEOUT = 5.0  # seconds to read-and-drop after rejecting, so the reply is not reset
MAX_HEAD = 64 * 1024  # bytes of request line + headers
MAX_PIPELINE = 32  # queued requests per connection before reading pauses
CANCEL_GRACE = 1.0  # seconds drain() gives cancelled handlers to unwind

REASONS: dict[int, str] = {s.value: s.phrase for s in http.HTTPStatus} | {
    int(code): text for code, text in MESSAGES.items()
}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

Handler = Callable[..., Awaitable["HttpResponse"]]
Methods = dict[str, tuple[Handler, bool]]  # method -> (handler, public)


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
        """The x-www-form-urlencoded body, first value of each field; HttpError(400) if not
        UTF-8."""
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


def json_response(
    status: int, data: dict[str, Any] | None = None, msg: str | None = None
) -> HttpResponse:
    """A reply of the SPEC 5 shape: ``{"code": status, "msg": msg or the reason phrase,
    "data": data or {}}``, with that HTTP status."""
    body = {"code": status, "msg": msg or REASONS.get(status, ""), "data": data or {}}
    return HttpResponse(status, orjson.dumps(body))


class Router:
    """Maps (method, path) to a handler. ``{name}`` in a pattern matches one path segment and
    is passed to the handler as a keyword argument, percent-decoded."""

    def __init__(self) -> None:
        self._static: dict[str, Methods] = {}
        self._dynamic: list[tuple[re.Pattern[str], Methods]] = []
        self._by_pattern: dict[str, Methods] = {}

    def add(self, method: str, pattern: str, handler: Handler, *, public: bool = False) -> None:
        """Route ``method pattern`` to ``handler``; ``public`` routes skip the API key check.
        Raises ValueError for a malformed pattern or a route added twice."""
        if not pattern.startswith("/"):
            raise ValueError(f"route pattern must start with '/': {pattern!r}")
        method = method.upper()
        methods = self._by_pattern.get(pattern)
        if methods is None:
            regex = _compile(pattern) if "{" in pattern or "}" in pattern else None
            methods = self._by_pattern[pattern] = {}
            if regex is None:
                self._static[pattern] = methods
            else:
                self._dynamic.append((regex, methods))
        if method in methods:
            raise ValueError(f"route added twice: {method} {pattern}")
        methods[method] = (handler, public)

    def match(self, path: str) -> tuple[Methods, dict[str, str]] | None:
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
    parts = []
    for segment in pattern.split("/"):
        if segment.startswith("{") and segment.endswith("}") and segment[1:-1].isidentifier():
            parts.append(f"(?P<{segment[1:-1]}>[^/]+)")
        elif "{" in segment or "}" in segment:
            raise ValueError(f"a parameter must be a whole segment: {pattern!r}")
        else:
            parts.append(re.escape(segment))
    return re.compile("/".join(parts))


@functools.lru_cache(maxsize=256)
def _head_start(status: int, content_type: str) -> bytes:
    """A reply's status line and Content-Type, up to the Content-Length value: made once
    per (status, type), the same for almost every reply."""
    reason = REASONS.get(status, "Unknown")
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: "
    return head.encode("latin-1")


def _encode(response: HttpResponse, keep_alive: bool, head_only: bool) -> bytes:
    head = (
        _head_start(response.status, response.content_type)
        + b"%d" % len(response.body)
        + (b"\r\nConnection: keep-alive\r\n" if keep_alive else b"\r\nConnection: close\r\n")
    )
    if response.headers:
        head += "".join(f"{name}: {value}\r\n" for name, value in response.headers).encode(
            "latin-1"
        )
    return head + b"\r\n" if head_only else head + b"\r\n" + response.body


class HttpServer:
    """A listening ingest server. ``close()`` stops accepting; ``drain()`` finishes the rest."""

    def __init__(
        self,
        router: Router,
        *,
        max_body: int,
        api_key: str = "",
        request_timeout: float = REQUEST_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.router = router
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.served = 0  # open connections counted against max_connections
        self.refused = 0  # connections answered 503 for being over max_connections
        self.timed_out = 0  # requests answered 408
        self._auth = f"Bearer {api_key}".encode() if api_key else b""
        self._server: asyncio.Server | None = None
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()  # running handlers (strong references)
        self.in_flight = 0  # requests received in full, not yet answered (running or queued)
        self._idle: asyncio.Future[None] | None = None
        self.draining = False
        self.port = 0  # the bound port, set once listening (useful when asked for port 0)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._server.sockets) if self._server is not None else ()

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
        if self.in_flight:
            self._idle = loop.create_future()
        for conn in list(self.connections):
            conn.begin_drain()
        if self._idle is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._idle), timeout)
        left = self.in_flight
        if left:
            tasks = list(self.tasks)
            for task in tasks:
                task.cancel()
            for conn in list(self.connections):
                conn.abort()
            if tasks:
                await asyncio.wait(tasks, timeout=CANCEL_GRACE)
        return left

    def request_done(self, count: int = 1) -> None:
        self.in_flight -= count
        if self.in_flight == 0 and self._idle is not None and not self._idle.done():
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
        handler, public = route
        if self._auth and not public:
            given = request.headers.get("authorization", "").encode("latin-1")
            if not hmac.compare_digest(given, self._auth):
                response = json_response(401, msg="missing or wrong API key")
                response.headers = (("WWW-Authenticate", "Bearer"),)
                return response
        return handler, params


def _parser_refusal(exc: httptools.HttpParserError) -> tuple[int, str]:
    """The status and message for a request the parser refused. The parser itself refuses
    some codings before any callback sees them (``chunked, gzip``, a repeated header):
    those are 501 like the rest; Content-Length beside Transfer-Encoding stays a 400."""
    text = str(exc).lower()
    if "transfer-encoding" in text and "content-length" not in text:
        return 501, "Transfer-Encoding not supported: only chunked"
    return 400, "malformed HTTP request"


class _Connection(asyncio.Protocol):
    """One client connection. It is also the parser's callback object (the ``on_*`` methods).
    Complete requests queue up; one at a time is answered, in order (pipelining safe)."""

    transport: asyncio.Transport

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.queue: collections.deque[tuple[HttpRequest, bool]] = collections.deque()
        self.task: asyncio.Task[None] | None = None
        self.rejected = False  # a 400/413/431 is owed last; further input is read and dropped
        self.rejection: HttpResponse | None = None
        self.read_paused = self.write_paused = self.eof = self.owe_continue = False
        self.in_head = self.counted = False
        self.messages = self.head_size = self.body_size = 0
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        # When the connection last owed the client nothing (opened, or a reply went out):
        # bytes that begin no request (blank lines) do not move it, so they keep nothing open.
        self.last_active = self.loop.time()
        self.started: float | None = None  # the first byte of the request being received
        self.timer = self.loop.call_later(self._step(), self._check_idle)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        server = self.server
        server.connections.add(self)
        if server.draining:
            transport.close()
        elif server.served >= server.max_connections:
            # Accepted and answered, not left in the backlog: with SO_REUSEPORT the kernel
            # keeps handing this worker its share of new connections whether it accepts or
            # not, so pausing would leave them hanging unanswered; a 503 says "retry".
            server.refused += 1
            self._reject(503, f"over {server.max_connections} connections; retry")
            assert self.rejection is not None
            self.rejection.headers = (("Retry-After", "1"),)
            self._next()
        else:
            self.counted = True
            server.served += 1

    def connection_lost(self, exc: Exception | None) -> None:
        # A running handler is left to finish (it may be half-way through a write to Redis);
        # its reply is dropped and it is counted done then.
        self.timer.cancel()
        self.server.connections.discard(self)
        if self.counted:
            self.counted = False
            self.server.served -= 1
        self._drop_queue()

    def data_received(self, data: bytes) -> None:
        if self.rejected or self.transport.is_closing():
            return
        message, was_in_head = self.messages, self.in_head
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if not isinstance(cause, HttpError):
                log.error("http parser callback failed", exc_info=cause)
                cause = HttpError(500, "internal error")
            self._reject(cause.status, cause.msg)
        except httptools.HttpParserError as exc:
            self._reject(*_parser_refusal(exc))
        except httptools.HttpParserUpgrade:
            self._reject(400, "malformed HTTP request")
        # httptools buffers a head in full before calling back: bound it by counting the
        # reads that fall wholly inside one head (one read of slack, never a false alarm).
        if self.in_head and was_in_head and self.messages == message and not self.rejected:
            self.head_size += len(data)
            if self.head_size > MAX_HEAD:
                self._reject(431, "request head too large")
        self._next()

    def eof_received(self) -> bool:
        self.eof = True
        return self.task is not None or bool(self.queue)  # True: answer, then close

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.last_active = self.loop.time()
        self._next()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.messages += 1
        self.in_head = True
        self.started = self.loop.time()
        self.head_size = self.body_size = 0
        self.url = b""
        self.headers = {}
        self.body = []

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
        coding = self.headers.get("transfer-encoding")
        if coding is not None and coding.strip().lower() != "chunked":
            raise HttpError(501, f"Transfer-Encoding {coding!r} not supported: only chunked")
        length = self.headers.get("content-length", "0")
        if not length.isdigit():
            raise HttpError(400, "malformed Content-Length")
        if int(length) > self.server.max_body:
            raise HttpError(413, f"body over {self.server.max_body} bytes")
        expect = self.headers.get("expect", "").lower() == "100-continue"
        self.owe_continue = expect and self.parser.get_http_version() == "1.1"
        self._send_continue()

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > self.server.max_body:
            raise HttpError(413, f"body over {self.server.max_body} bytes")
        self.body.append(body)

    def on_message_complete(self) -> None:
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            raise HttpError(400, "malformed request target") from None
        query = parse_qs(url.query.decode("latin-1"), keep_blank_values=True) if url.query else {}
        request = HttpRequest(
            self.parser.get_method().decode("ascii"),
            (url.path or b"/").decode("latin-1"),
            {k: v[0] for k, v in query.items()},
            self.headers,
            b"".join(self.body),
        )
        self.owe_continue = False
        self.started = None
        self.queue.append((request, self.parser.should_keep_alive()))
        self.server.in_flight += 1
        if len(self.queue) >= MAX_PIPELINE and not self.read_paused:
            self.transport.pause_reading()
            self.read_paused = True

    # answering

    def _next(self) -> None:
        """Answer what is owed, in order: routing refusals at once, a handler in a task (which
        calls back here when done), the rejection last; close when draining and idle."""
        transport = self.transport
        while self.task is None and self.queue and not self.write_paused:
            if transport.is_closing():
                return
            request, keep_alive = self.queue.popleft()
            prepared = self.server.prepare(request)
            if isinstance(prepared, HttpResponse):
                self._send(request, prepared, keep_alive)
            else:
                self.task = self.loop.create_task(self._run(request, *prepared, keep_alive))
                self.server.tasks.add(self.task)
        if self.task is not None or self.queue or transport.is_closing():
            return
        if self.rejection is not None:
            self._send_rejection(self.rejection)
        elif self.eof or self.server.draining:
            transport.close()
        else:
            if self.read_paused:
                transport.resume_reading()
                self.read_paused = False
                if self.started is not None:  # its clock stood still while we did not read
                    self.started = self.loop.time()
            self._send_continue()

    async def _run(
        self, request: HttpRequest, handler: Handler, params: dict[str, str], keep_alive: bool
    ) -> None:
        response: HttpResponse | None = None
        try:  # HttpError becomes its JSON reply, any other exception a logged 500
            response = await handler(request, **params)
        except HttpError as exc:
            response = json_response(exc.status, msg=exc.msg)
        except Exception:
            log.exception("http handler failed: %s %s", request.method, request.path)
            response = json_response(500, msg="internal error")
        finally:
            self.server.tasks.discard(cast(asyncio.Task[None], self.task))
            self.task = None
            if response is None:  # cancelled (drain's deadline): the client gets a reset
                self.server.request_done()
                self.transport.abort()
            else:
                self._send(request, response, keep_alive)
                self._next()

    def _send(self, request: HttpRequest, response: HttpResponse, keep_alive: bool) -> None:
        self.server.request_done()
        if self.transport.is_closing():
            return  # the client left: the reply is dropped
        keep_alive = keep_alive and not (self.server.draining and not self.queue)
        self.transport.write(_encode(response, keep_alive, request.method == "HEAD"))
        self.last_active = self.loop.time()
        if not keep_alive:
            self._drop_queue()
            self.transport.close()

    def _send_continue(self) -> None:
        # Only when nothing is owed before it: a 100 must not overtake an earlier reply.
        if self.owe_continue and self.task is None and not self.queue:
            self.owe_continue = False
            self.transport.write(CONTINUE)
            self.started = self.loop.time()  # the body's clock starts when it may come

    def _reject(self, status: int, msg: str) -> None:
        self.rejected = True
        self.rejection = json_response(status, msg=msg)
        self.owe_continue = False
        self.started = None
        if self.read_paused:  # keep reading (and dropping) until the rejection is out
            self.transport.resume_reading()
            self.read_paused = False

    def _send_rejection(self, response: HttpResponse) -> None:
        self.rejection = None
        self.transport.write(_encode(response, False, False))
        if self.eof or not self.transport.can_write_eof():
            self.transport.close()
            return
        # Half-close, then read and drop until the client closes (or LINGER_TIMEOUT): closing
        # with unread request bytes would send a reset that can destroy the reply in flight.
        self.transport.write_eof()
        self.timer.cancel()
        self.timer = self.loop.call_later(LINGER_TIMEOUT, self.transport.abort)

    def _drop_queue(self) -> None:
        if self.queue:
            self.server.request_done(len(self.queue))
            self.queue.clear()

    def _step(self) -> float:
        """The timer's longest period: a request begun meanwhile is seen in time."""
        return min(self.server.request_timeout, KEEPALIVE_TIMEOUT)

    def _check_idle(self) -> None:
        """Answer 408 to a request not received in time; close a connection idle too long
        (a new one that sent nothing: request_timeout; between requests: KEEPALIVE_TIMEOUT).
        Runs at least every _step() seconds while the connection lives."""
        now, limit = self.loop.time(), self.server.request_timeout
        delay = self._step()
        if self.started is not None and not self.read_paused:
            taken = now - self.started
            if taken >= limit:
                self.server.timed_out += 1
                self._reject(408, f"request not received within {limit:g} s")
                self._next()
                if self.rejection is None:  # sent: the linger timer has taken over
                    return
            else:
                delay = limit - taken
        elif self.task is None and self.started is None:
            quiet = now - self.last_active
            allowed = limit if self.messages == 0 else KEEPALIVE_TIMEOUT
            if quiet >= allowed:
                if self.queue or self.transport.is_closing():
                    self.abort()  # replies stuck behind a client that stopped reading
                else:
                    self.transport.close()
                return
            delay = min(delay, allowed - quiet)
        self.timer = self.loop.call_later(delay, self._check_idle)

    def begin_drain(self) -> None:
        """Stop reading; close now if nothing is owed, else after the last reply."""
        if not self.transport.is_closing():
            if not self.read_paused:
                self.transport.pause_reading()
                self.read_paused = True
            self._next()

    def abort(self) -> None:
        self._drop_queue()
        self.transport.abort()


async def start_http_server(
    router: Router,
    host: str,
    port: int,
    *,
    max_body: int,
    api_key: str = "",
    reuse_port: bool = True,
    request_timeout: float = REQUEST_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
) -> HttpServer:
    """Listen on ``host:port`` (SO_REUSEPORT by default, shared with sibling workers) and serve
    ``router``. With ``api_key`` set, every non-public route needs ``Authorization: Bearer
    <key>``. A request must arrive whole within ``request_timeout`` seconds of its first
    byte (else 408); at most ``max_connections`` are served at once (more are answered
    503). The caller owns the result: ``close()`` it, then ``await drain(timeout)``."""
    loop = asyncio.get_running_loop()
    server = HttpServer(
        router,
        max_body=max_body,
        api_key=api_key,
        request_timeout=request_timeout,
        max_connections=max_connections,
    )
    server._server = await loop.create_server(
        lambda: _Connection(server), host, port, reuse_port=reuse_port
    )
    server.port = server._server.sockets[0].getsockname()[1]
    return server
