"""The client port's WebSocket connections on picows, whose frame parser and masking are C.

A TCP connection starts with :class:`Upgrade`, which reads the HTTP request head (httptools)
and asks the gateway what to do with it, asynchronously: a token check may ask Redis or the
user centre. A refusal or a static page is answered there and the connection closed. An
accepted upgrade is handed over to picows with the head read so far: picows validates the
upgrade headers, sends the 101 and from then on parses frames for the :class:`Connection` the
gateway made. (picows's own server asks for the listener synchronously, before any await.)

picows hands over frames; a :class:`Connection` makes messages of them as RFC 6455 asks:
fragments joined, text checked as UTF-8 (1007), a message over ``server.max_frame`` closed with
1009, a frame out of place with 1002. Messages reach the gateway one at a time, in order; while
MAX_QUEUED wait, the socket stops being read, so a flooding client only fills its own queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import httptools
from multidict import CIMultiDict
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport
from picows.picows import WSProtocol  # type: ignore[attr-defined]  # not in its stubs

from pmq.reactor.http import (
    HttpError,
    HttpRequest,
    HttpResponse,
    encode_response,
    parse_request,
    plain_response,
)
from pmq.wire.client import CloseCode

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024  # bytes of request line and headers (a browser's cookies fit)
HEAD_SECONDS = 10.0  # the client must send its whole request head within this
CLOSE_SECONDS = 2.0  # after our close frame, how long the peer has to answer it
LEAVE_SECONDS = 1.0  # the longest the end of a peer-closed connection waits for on_leaving
MAX_QUEUED = 4  # messages waiting for the gateway before the socket stops being read
READ_BUFFER = 2048  # picows's first read buffer per connection (it grows for big frames)


class PicowsLog(logging.LoggerAdapter[logging.Logger]):
    """picows's log. A peer's protocol errors are its problem, not the node's: picows logs
    them at ERROR, here at DEBUG, so hostile input cannot fill the log. Not a Logger, so
    picows makes no child logger per connection."""

    def error(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self.debug(msg, *args, **kwargs)


PICOWS_LOG = PicowsLog(logging.getLogger("pmq.reactor.picows"), {})
NO_HEADERS: CIMultiDict[str] = CIMultiDict()  # shared by every connection, never changed


def forget_handshake(transport: WSTransport) -> None:
    """picows keeps the upgrade's request and response for the connection's life, with
    every header (a browser's cookies and user agent, often KiBs) and the token in the URL;
    none is needed past the upgrade. Only their shells stay."""
    transport.request.path = b"/ws"
    transport.request.headers = NO_HEADERS
    transport.response.headers = NO_HEADERS


class Connection(WSListener):
    """One upgraded client connection: its frames made messages, its writes and its close.

    ``on_open(conn)`` runs once the 101 is out, ``on_message(conn, data)`` for each message
    in order (after on_open returned), ``on_close(conn)`` once the TCP connection is gone.
    When the peer closes, ``on_leaving(conn)`` runs (after on_open and the message being
    handled) before the TCP connection ends, so that what the peer sees done is done: its
    close completes only then (or after LEAVE_SECONDS).
    ``heard`` and ``pinged`` (loop time) are the heartbeat's (pmq.reactor.heartbeat)."""

    __slots__ = (
        "client",
        "closing",
        "heard",
        "loop",
        "max_message",
        "on_close",
        "on_leaving",
        "on_message",
        "on_open",
        "parts",
        "parts_size",
        "parts_text",
        "pinged",
        "queue",
        "raw",
        "reader",
        "transport",
    )

    def __init__(
        self,
        max_message: int,
        on_open: Callable[[Connection], Awaitable[None]],
        on_message: Callable[[Connection, bytes], Awaitable[None]],
        on_close: Callable[[Connection], Awaitable[None]],
        on_leaving: Callable[[Connection], Awaitable[None]],
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.max_message = max_message
        self.on_open = on_open
        self.on_message = on_message
        self.on_close = on_close
        self.on_leaving = on_leaving
        self.client: Any = None  # the gateway's, for on_close
        self.transport: WSTransport | None = None
        self.raw: asyncio.Transport | None = None
        self.closing = False  # a close frame was sent or received: nothing more is written
        self.heard = self.pinged = self.loop.time()
        self.parts: list[bytes] | None = None  # a fragmented message being received
        self.parts_size = 0
        self.parts_text = False
        self.queue: deque[bytes] = deque()
        self.reader: asyncio.Task[None] | None = None  # runs on_open, then the queue

    # picows's callbacks ------------------------------------------------------------------
    def on_ws_connected(self, transport: WSTransport) -> None:
        forget_handshake(transport)
        self.transport = transport
        self.raw = transport.underlying_transport
        self.reader = self.loop.create_task(self._open())

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self.heard = self.loop.time()
        kind = frame.msg_type
        if kind is WSMsgType.PING:
            if not self.closing:
                transport.send_pong(frame.get_payload_as_bytes())
            return
        if kind is WSMsgType.PONG:
            return
        if kind is WSMsgType.CLOSE:
            self._closed_by_peer(frame)
            return
        if frame.rsv1 or frame.rsv2 or frame.rsv3:  # no extension was agreed
            self.close(CloseCode.PROTOCOL_ERROR, "reserved bits set")
            return
        if self.closing:
            return
        if kind is WSMsgType.CONTINUATION:
            self._continue(frame)
        elif self.parts is not None:
            self.close(CloseCode.PROTOCOL_ERROR, "expected a continuation frame")
        elif frame.fin:
            self._message(frame.get_payload_as_bytes(), kind is WSMsgType.TEXT)
        else:
            self.parts = [frame.get_payload_as_bytes()]
            self.parts_size = frame.payload_size
            self.parts_text = kind is WSMsgType.TEXT

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closing = True
        self.queue.clear()
        self.loop.create_task(self._gone())

    # frames to messages ------------------------------------------------------------------
    def _continue(self, frame: WSFrame) -> None:
        if self.parts is None:
            self.close(CloseCode.PROTOCOL_ERROR, "unexpected continuation frame")
            return
        self.parts_size += frame.payload_size
        if self.parts_size > self.max_message:
            self.close(CloseCode.MESSAGE_TOO_BIG, f"message over {self.max_message} bytes")
            return
        self.parts.append(frame.get_payload_as_bytes())
        if frame.fin:
            data, self.parts = b"".join(self.parts), None
            self._message(data, self.parts_text)

    def _message(self, data: bytes, text: bool) -> None:
        if text:
            try:
                data.decode()
            except UnicodeDecodeError:
                self.close(CloseCode.INVALID_DATA, "invalid UTF-8")
                return
        self.queue.append(data)
        if len(self.queue) >= MAX_QUEUED and self.raw is not None:
            self.raw.pause_reading()
        if self.reader is None:
            self.reader = self.loop.create_task(self._read())

    async def _open(self) -> None:
        try:
            await self.on_open(self)
        finally:
            await self._read()

    async def _read(self) -> None:
        """Hand queued messages to the gateway one at a time; ends when the queue is empty
        (the next message starts a new reader: an idle connection holds no task)."""
        try:
            while self.queue and not self.closing:
                data = self.queue.popleft()
                if len(self.queue) < MAX_QUEUED and self.raw is not None:
                    self.raw.resume_reading()
                await self.on_message(self, data)
        finally:
            self.reader = None

    async def _gone(self) -> None:
        if self.reader is not None:  # on_open may still be running: it ends first
            try:
                await asyncio.shield(self.reader)
            except Exception:
                pass
        await self.on_close(self)

    # closing -----------------------------------------------------------------------------
    def _closed_by_peer(self, frame: WSFrame) -> None:
        """The peer's close frame: answer it with its code (as websockets does), unless ours
        went first, and end the TCP connection, once on_leaving is done when the peer
        closed first (a client waits for the end of the TCP connection)."""
        assert self.transport is not None
        if self.closing:  # the peer answered ours
            self.transport.disconnect()
            return
        self.closing = True
        code = frame.get_close_code()
        if code == WSCloseCode.NO_INFO:  # a close frame without a code
            self.transport.send_close(WSCloseCode.OK)
        else:
            self.transport.send_close(code)
        self.loop.create_task(self._end_after_leaving(self.transport))

    async def _end_after_leaving(self, transport: WSTransport) -> None:
        try:
            async with asyncio.timeout(LEAVE_SECONDS):
                if self.reader is not None:  # on_open, or a message, first
                    await asyncio.shield(self.reader)
                await self.on_leaving(self)
        except Exception:  # on_close comes all the same, and does what this could not
            pass
        finally:
            transport.disconnect()

    @property
    def open(self) -> bool:
        """Upgraded, and no close frame sent or received yet: frames may be written."""
        return self.raw is not None and not self.closing

    def write(self, frame: bytes) -> int:
        """Write bytes already framed (a server's frames are never masked, so one frame's
        bytes serve every connection); returns the bytes not yet sent."""
        assert self.raw is not None
        self.raw.write(frame)
        return int(self.raw.get_write_buffer_size())

    def ping(self) -> None:
        assert self.transport is not None
        self.transport.send_ping(b"")

    def close(self, code: int, reason: str = "") -> None:
        """Send a close frame (once) and end the TCP connection when the peer answers it, or
        after CLOSE_SECONDS."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        self.transport.send_close(WSCloseCode(code), reason.encode())
        self.loop.call_later(CLOSE_SECONDS, self.abort)

    def abort(self) -> None:
        """End the TCP connection now, unsent bytes dropped."""
        if self.raw is not None:
            self.raw.abort()


Decision = HttpResponse | Connection
Decide = Callable[[HttpRequest], Awaitable[Decision]]


class Upgrade(asyncio.Protocol):
    """A new TCP connection on the client port, until its request head is read and decided:
    answered and closed (a refusal, a page), or handed to picows as an upgrade."""

    def __init__(self, decide: Decide, max_frame: int) -> None:
        self.decide = decide
        self.max_frame = max_frame
        self.head = bytearray()
        # The parser holds this protocol's methods (a cycle): dropped once the head is read.
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.method = b""
        self.url = b""
        self.headers: dict[str, str] = {}
        self.complete = False
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deciding: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.timer = asyncio.get_running_loop().call_later(HEAD_SECONDS, self._too_slow)

    def data_received(self, data: bytes) -> None:
        if self.complete:  # frames sent before the 101: kept for picows
            self.head += data
            return
        if self.parser is None:  # answered already (a bad head): the rest is not read
            return
        self.head += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # the head is complete (on_headers_complete ran)
        except httptools.HttpParserError as exc:
            self._answer(plain_response(400, f"bad request: {exc}"))
            return
        if len(self.head) > MAX_HEAD:
            self._answer(plain_response(431, "request head too large"))
        elif self.complete:
            assert self.transport is not None
            self.method, self.parser = self.parser.get_method(), None
            self.transport.pause_reading()
            # The client's part is done: the token check's own time (Redis, the user
            # centre, each with its timeout) must not be cut short by the head's deadline,
            # or a storm of connects would throw away the work done on each.
            self._stop_timer()
            self.deciding = asyncio.get_running_loop().create_task(self._decide())

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        self.complete = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.parser = None
        self._stop_timer()
        if self.deciding is not None:
            self.deciding.cancel()

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _too_slow(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def _decide(self) -> None:
        try:
            request = parse_request(self.method, self.url, self.headers, b"")
            decision = await self.decide(request)
        except HttpError as exc:
            decision = plain_response(exc.status, exc.msg)
        except Exception:
            log.exception("deciding on the upgrade of %r failed", self.url[:200])
            decision = plain_response(500, "internal error")
        if isinstance(decision, HttpResponse):
            self._answer(decision)
        else:
            self._hand_over(decision)

    def _answer(self, response: HttpResponse) -> None:
        assert self.transport is not None
        self.parser = None
        self._stop_timer()
        self.transport.write(encode_response(response, keep_alive=False, head_only=False))
        self.transport.close()

    def _hand_over(self, connection: Connection) -> None:
        """Give the socket to picows with the bytes read so far; picows reads the head again
        (in C), checks the upgrade headers (400 if wrong) and answers 101."""
        assert self.transport is not None
        if self.transport.is_closing():
            return
        protocol = WSProtocol(
            host_port=None,
            ws_path=None,
            is_client_side=False,
            ws_listener_factory=lambda request: connection,
            logger=PICOWS_LOG,
            disconnect_on_exception=True,
            websocket_handshake_timeout=None,
            enable_auto_ping=False,
            auto_ping_idle_timeout=20,
            auto_ping_reply_timeout=20,
            auto_ping_strategy=1,
            enable_auto_pong=False,
            max_frame_size=self.max_frame,
            extra_headers=None,
            read_buffer_init_size=READ_BUFFER,
        )
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        data = memoryview(bytes(self.head))
        while data:
            buffer = protocol.get_buffer(-1)
            size = min(len(buffer), len(data))
            memoryview(buffer)[:size] = data[:size]
            protocol.buffer_updated(size)
            data = data[size:]
        self.transport.resume_reading()
