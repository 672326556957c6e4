"""One RESP connection to Redis over asyncio, parsed in C by hiredis.

A :class:`RespConnection` writes the commands asked for during one event-loop iteration in
one write, and resolves each caller's future with its reply, in order (a caller's several
commands, sent together, with the list of their replies); a bounded number of replies per
callback, so a backlog never stalls the loop. With ``on_push`` it hands sharded
pub/sub messages to a subscriber instead. A watchdog fails every caller when Redis stops
answering for REPLY_SECONDS; TCP keepalive finds a peer gone silent.

A confirmation (WAITAOF) blocks its connection in Redis until it answers: at most one is in
flight per connection, and the commands asked for meanwhile wait here, to be written together
with one confirmation for all of them once it answers (a group commit).

When the connection ends, a caller whose command was written gets the connection error
(Redis may have run it); one whose command was still queued gets :class:`Unsent`, safe to
send again. pmq.redis.pipe builds its Pipe and Subscription on this.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

CONNECT_SECONDS = 5.0
REPLY_SECONDS = 10.0  # no reply for this long while commands wait: Redis hangs, give up
REPLIES_PER_TURN = 256  # replies (and pub/sub handlers) between two yields to the loop
# TCP keepalive: first probe after 30 s idle, then every 10 s; dead after 3 unanswered.
KEEPALIVE = [
    (getattr(socket, name), value)
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))
    if hasattr(socket, name)
]


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to connect, read from a redis-py client's pool."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None  # a unix socket instead of host:port
    db: int = 0
    username: str | None = None
    password: str | None = None

    @classmethod
    def of(cls, client: aioredis.Redis) -> Endpoint:
        kwargs = client.connection_pool.connection_kwargs
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in kwargs.items() if k in fields and v is not None})

    def __str__(self) -> str:
        return self.path or f"{self.host}:{self.port}"


def pack(*args: Any) -> bytes:
    """One command in RESP (hiredis's stub types its argument as a 1-tuple)."""
    return hiredis.pack_command(cast(Any, args))


# A command to write: packed, or (RespConnection.send_built) packed at the write.
Outgoing = bytes | Callable[[], bytes]


class Unsent(RedisConnectionError):
    """The connection ended before the command was written: Redis never saw it, and sending
    it again (on a fresh connection) cannot apply it twice."""


class _Shared:
    """One reply awaited by several callers, each with a future of its own (so one
    cancelled caller cancels nobody else's); resolved as one entry of ``waiting``."""

    __slots__ = ("futures",)

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self.futures = [future]

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def set_result(self, result: Any) -> None:
        for f in self.futures:
            if not f.done():
                f.set_result(result)

    def set_exception(self, exc: BaseException) -> None:
        for f in self.futures:
            if not f.done():
                f.set_exception(exc)


class _Replies:
    """The replies to commands written together (:meth:`RespConnection.send_many`), one list
    for one future. Each command still has its own entry in ``waiting`` (this object, once
    per command), so what was written is counted as for single commands; the first error
    reply fails the future (as redis-py's pipeline raises it), and the later replies are
    read and dropped."""

    __slots__ = ("count", "future", "replies")

    def __init__(self, future: asyncio.Future[list[Any]], count: int) -> None:
        self.future = future
        self.replies: list[Any] = []
        self.count = count

    def done(self) -> bool:
        return self.future.done()

    def set_result(self, reply: Any) -> None:
        self.replies.append(reply)
        if len(self.replies) == self.count:
            self.future.set_result(self.replies)

    def set_exception(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


def _error(reply: hiredis.ReplyError) -> ResponseError:
    """The redis-py exception for an error reply (NoScriptError for NOSCRIPT)."""
    message = str(reply)
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return ResponseError(message)


class RespConnection(asyncio.Protocol):
    """One connection: replies resolve the waiting futures in order; with ``on_push``,
    sharded pub/sub messages go to it instead."""

    def __init__(self, on_push: Callable[[list[Any]], None] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.reader = hiredis.Reader()
        self.on_push = on_push
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[asyncio.Future[Any] | _Shared | _Replies] = (
            collections.deque()
        )
        self.outgoing: list[Outgoing] = []
        self.lost = self.loop.create_future()  # its result: why the connection ended
        self.paused = False
        self.progress = time.monotonic()  # last reply, or when the first waiter came
        self.watchdog: asyncio.TimerHandle | None = None
        # The confirmation to send after the next write, and its reply's future.
        self.confirming: tuple[bytes, _Shared] | None = None
        # The confirmation written and not yet answered: no write until it answers.
        self.in_flight: _Shared | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # A subscription only listens: without keepalive a peer gone silent (a cut
            # network, no reset) would never be noticed.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for option, value in KEEPALIVE:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        """The reply to ``packed``, written with the other commands of this iteration."""
        future = self.loop.create_future()
        self._queue(packed, future)
        return future

    def send_built(self, build: Callable[[], bytes]) -> asyncio.Future[Any]:
        """As :meth:`send`, for a command ``build()`` packs only when this iteration's
        commands are written, in its place among them: until then its caller may still add
        to it (pmq.redis.batching merges script calls so)."""
        future = self.loop.create_future()
        self._queue(build, future)
        return future

    def send_many(self, commands: Sequence[bytes]) -> asyncio.Future[list[Any]]:
        """The replies to ``commands`` (at least one), in one list: they go in the same
        write, so either all of them reach Redis or none (then :class:`Unsent`)."""
        future: asyncio.Future[list[Any]] = self.loop.create_future()
        replies = _Replies(future, len(commands))
        for packed in commands:
            self._queue(packed, replies)
        return future

    def _queue(self, packed: Outgoing, waiter: asyncio.Future[Any] | _Replies) -> None:
        if self.lost.done():
            raise Unsent(f"Redis connection lost: {self.lost.result()}")
        if not self.outgoing:
            self.loop.call_soon(self._flush)
        if not self.waiting:
            self.progress = time.monotonic()
        self.outgoing.append(packed)
        self.waiting.append(waiter)
        if self.watchdog is None:
            self.watchdog = self.loop.call_later(REPLY_SECONDS, self._check)

    def confirm(self, packed: bytes) -> asyncio.Future[Any]:
        """The reply to ``packed``, written once after every command queued for the next
        write, whoever else asks for it meanwhile (call right after :meth:`send`). While an
        earlier confirmation is in flight, that write waits for its answer."""
        future = self.loop.create_future()
        if self.confirming is None:
            self.confirming = (packed, _Shared(future))
        else:
            self.confirming[1].futures.append(future)
        return future

    def _flush(self) -> None:
        if self.transport is not None and self.transport.is_closing():
            # Closed before this write (aborted, its end not yet reported): nothing queued
            # left, so _fail tells those callers Unsent.
            self._fail(RedisConnectionError("Redis connection closed before the write"))
        if self.in_flight is not None:  # Redis would hold these anyway: _release sends them
            return
        if self.confirming is not None:
            packed, shared = self.confirming
            self.confirming = None
            self.outgoing.append(packed)
            self.waiting.append(shared)
            self.in_flight = shared
        outgoing, self.outgoing = self.outgoing, []
        if self.transport is not None and not self.lost.done():
            self.transport.write(b"".join([o if isinstance(o, bytes) else o() for o in outgoing]))

    def _check(self) -> None:
        self.watchdog = None
        if not self.waiting or self.lost.done():
            return
        if time.monotonic() - self.progress >= REPLY_SECONDS:
            self._fail(RedisTimeoutError(f"no reply from Redis in {REPLY_SECONDS:.0f}s"))
        else:
            self.watchdog = self.loop.call_later(REPLY_SECONDS, self._check)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        self._read()

    def _read(self) -> None:
        try:
            for _ in range(REPLIES_PER_TURN):
                reply = self.reader.gets()
                if reply is False:
                    if self.paused and self.transport is not None:
                        self.paused = False
                        self.transport.resume_reading()
                    return
                self._dispatch(reply)
        except hiredis.ProtocolError as exc:
            self._fail(RedisConnectionError(f"Redis protocol error: {exc}"))
            return
        if self.lost.done():
            return
        if not self.paused and self.transport is not None:  # more may be buffered: go on
            self.paused = True  # next turn, after the loop has served others
            self.transport.pause_reading()
        self.loop.call_soon(self._read)

    def _dispatch(self, reply: Any) -> None:
        if self.on_push is not None and isinstance(reply, list) and reply[:1] == [b"smessage"]:
            try:
                self.on_push(reply)
            except Exception:
                log.exception("pub/sub handler failed")
            return
        self.progress = time.monotonic()
        if not self.waiting:
            self._fail(RedisConnectionError("Redis sent a reply nobody asked for"))
            return
        future = self.waiting.popleft()
        if future is self.in_flight:
            self._release()
        if future.done():  # its caller was cancelled
            return
        if isinstance(reply, hiredis.ReplyError):
            future.set_exception(_error(reply))
        else:
            future.set_result(reply)

    def _release(self) -> None:
        """The confirmation in flight answered: write what waited for it, but the commands
        whose callers gave up meanwhile (never written, so never run)."""
        self.in_flight = None
        held = [self.waiting.pop() for _ in self.outgoing]
        held.reverse()
        kept = [(p, f) for p, f in zip(self.outgoing, held, strict=True) if not f.done()]
        self.outgoing = [packed for packed, _ in kept]
        self.waiting.extend(future for _, future in kept)
        if self.confirming is not None and self.confirming[1].done():  # nobody waits for it
            self.confirming = None
        if self.outgoing or self.confirming is not None:
            self._flush()

    def _fail(self, exc: Exception) -> None:
        """End the connection: every caller whose command was written gets ``exc``; those
        still queued for the next write (the last of ``waiting``) get :class:`Unsent`."""
        if not self.lost.done():
            self.lost.set_result(exc)
        waiting, self.waiting = self.waiting, collections.deque()
        written = len(waiting) - len(self.outgoing)
        self.outgoing = []
        for index, future in enumerate(waiting):
            if not future.done():
                future.set_exception(exc if index < written else Unsent(str(exc)))
        if self.confirming is not None:  # its batch was never written
            self.confirming[1].set_exception(Unsent(str(exc)))
            self.confirming = None
        self.in_flight = None
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"Redis connection lost: {exc or 'closed by server'}"))

    def close(self) -> None:
        self._fail(RedisConnectionError("Redis connection closed"))


async def open_connection(
    endpoint: Endpoint, on_push: Callable[[list[Any]], None] | None
) -> RespConnection:
    """A connection to ``endpoint``, authenticated and on its database, within
    CONNECT_SECONDS; RedisConnectionError when it cannot be made. ``on_push``: the
    subscriber of sharded pub/sub messages read on it."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(CONNECT_SECONDS):
            if endpoint.path:
                _, conn = await loop.create_unix_connection(
                    lambda: RespConnection(on_push), endpoint.path
                )
            else:
                _, conn = await loop.create_connection(
                    lambda: RespConnection(on_push), endpoint.host, endpoint.port
                )
            try:
                if endpoint.password:
                    user = [endpoint.username] if endpoint.username else []
                    await conn.send(pack("AUTH", *user, endpoint.password))
                if endpoint.db:
                    await conn.send(pack("SELECT", endpoint.db))
            except BaseException:  # refused (a wrong password), or cancelled: let it go
                conn.close()
                raise
    except (OSError, TimeoutError) as exc:
        raise RedisConnectionError(f"cannot connect to Redis at {endpoint}: {exc}") from exc
    return conn
