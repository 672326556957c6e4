"""One ingest HTTP/1.1 connection: parsing (httptools), pipelining and timeouts.

An :class:`HttpConnection` is the asyncio protocol of one client and the parser's callback
object. Complete requests queue up (reading pauses past MAX_PIPELINE); one at a time is
handed to its handler and answered, in order. It bounds what a client may hold open: a head
over MAX_HEAD is 431, a body over the server's limit 413, a request not in within the
server's ``request_timeout`` 408; a quiet connection closes (KEEPALIVE_TIMEOUT between
requests). A refused request is answered last, then the connection half-closes and lingers
so the reply is not destroyed by a reset. Its server is pmq.reactor.httpserver.HttpServer.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING, cast

import httptools

from pmq.reactor.http import (
    Handler,
    HttpError,
    HttpRequest,
    HttpResponse,
    encode_response,
    json_response,
    parse_request,
)

if TYPE_CHECKING:
    from pmq.reactor.httpserver import HttpServer

log = logging.getLogger(__name__)

KEEPALIVE_TIMEOUT = 75.0  # seconds a connection may stay silent between requests
LINGER_TIMEOUT = 5.0  # seconds to read-and-drop after rejecting, so the reply is not reset
MAX_HEAD = 64 * 1024  # bytes of request line + headers
MAX_PIPELINE = 32  # queued requests per connection before reading pauses
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _parser_refusal(exc: httptools.HttpParserError) -> tuple[int, str]:
    """The status and message for a request the parser refused. The parser itself refuses
    some codings before any callback sees them (``chunked, gzip``, a repeated header):
    those are 501 like the rest; Content-Length beside Transfer-Encoding stays a 400."""
    text = str(exc).lower()
    if "transfer-encoding" in text and "content-length" not in text:
        return 501, "Transfer-Encoding not supported: only chunked"
    return 400, "malformed HTTP request"


class HttpConnection(asyncio.Protocol):
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
        self.partial = False  # a drain counted the request being received as in flight
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
        self._settle_partial()

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
        request = parse_request(
            self.parser.get_method(), self.url, self.headers, b"".join(self.body)
        )
        self.owe_continue = False
        self.started = None
        self.queue.append((request, self.parser.should_keep_alive()))
        if self.partial:
            self.partial = False  # counted in flight when the drain began
        else:
            self.server.in_flight += 1
        if (self.server.draining or len(self.queue) >= MAX_PIPELINE) and not self.read_paused:
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
        elif self.eof or (self.server.draining and not self.partial):
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
        keep_alive = keep_alive and not (
            self.server.draining and not self.queue and not self.partial
        )
        self.transport.write(encode_response(response, keep_alive, request.method == "HEAD"))
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
        self._settle_partial()  # answered by the rejection
        self.rejected = True
        self.rejection = json_response(status, msg=msg)
        self.owe_continue = False
        self.started = None
        if self.read_paused:  # keep reading (and dropping) until the rejection is out
            self.transport.resume_reading()
            self.read_paused = False

    def _send_rejection(self, response: HttpResponse) -> None:
        self.rejection = None
        self.transport.write(encode_response(response, False, False))
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
        """Stop reading; close now if nothing is owed, else after the last reply. A request
        partly received is owed too: reading goes on until it is in (or times out, 408)."""
        if self.started is not None and not self.rejected and not self.transport.is_closing():
            self.partial = True
            self.server.in_flight += 1
            return
        if not self.transport.is_closing():
            if not self.read_paused:
                self.transport.pause_reading()
                self.read_paused = True
            self._next()

    def abort(self) -> None:
        self._drop_queue()
        self._settle_partial()
        self.transport.abort()

    def _settle_partial(self) -> None:
        """The partly received request the drain waits for ended unanswered or rejected."""
        if self.partial:
            self.partial = False
            self.server.request_done()
