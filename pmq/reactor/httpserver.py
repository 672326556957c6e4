"""The ingest HTTP/1.1 server: a small asyncio server over httptools, JSON in and out.

Each socket worker calls :func:`start_http_server` on the shared SO_REUSEPORT port with a
:class:`~pmq.reactor.http.Router`. The server answers the requests of one connection in
order, one at a time (pipelined requests wait their turn; pmq.reactor.httpconn), and owns
everything around the handlers: keep-alive, body limits (413), bearer key checks (401),
malformed requests (400), 404/405, and turning :class:`~pmq.reactor.http.HttpError` or any
other exception into a JSON reply of the shape ``{"code", "msg", "data"}``.

Hostile clients are bounded too (docs/security.md): a ``Transfer-Encoding`` other than
``chunked`` is 501; a request whose head and body are not in within ``request_timeout``
seconds of its first byte is 408 and closes; a new connection that sends nothing for that
long is closed without a reply; past ``max_connections`` open connections a new one is
answered 503 and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import socket

from pmq.reactor.http import Handler, HttpRequest, HttpResponse, Router, json_response
from pmq.reactor.httpconn import HttpConnection

REQUEST_TIMEOUT = 10.0  # seconds from a request's first byte to its last (ingest.request_timeout)
MAX_CONNECTIONS = 1024  # open connections served at once (ingest.max_connections)
CANCEL_GRACE = 1.0  # seconds drain() gives cancelled handlers to unwind


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
        self.connections: set[HttpConnection] = set()
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
        """Stop accepting and reading, answer what was received, a request partly received
        included once the rest of it is in (last replies say ``Connection: close``), and
        close connections as they go idle. At the deadline cancel
        the handlers still running, abort every connection, and return how many requests
        were unanswered (0 when all finished in time)."""
        self.close()
        self.draining = True
        for conn in list(self.connections):
            conn.begin_drain()  # a request partly received is counted in flight here
        if self.in_flight:
            self._idle = asyncio.get_running_loop().create_future()
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
        lambda: HttpConnection(server), host, port, reuse_port=reuse_port
    )
    server.port = server._server.sockets[0].getsockname()[1]
    return server
