"""A lean Redis connection for a socket worker's hot path (single server only).

redis-py wraps every command, even inside a pipeline, in Python: packing, a pool checkout,
a timeout, its parser's layers. Under unicast load that was a fifth of a socket worker's
CPU (docs/benchmarks.md, b). Here hiredis packs each command and parses every reply in C;
the commands issued during one event-loop iteration leave in one write on one connection,
and each reply, in order, resolves its caller's future.

:class:`Pipe` carries commands (publish scripts, relays); :class:`Subscription` reads one
sharded pub/sub channel and runs its handler on each message as it is parsed, a bounded
number per callback so a backlog never stalls the loop.

A confirmation (WAITAOF) blocks its connection in Redis until it answers: at most one is in
flight per connection, and the commands asked for meanwhile wait here, to be written together
with one confirmation for all of them once it answers (a group commit). So a confirmation that
times out costs the callers after it one wait more at most, never one per batch.

A command is written to Redis at most once. One whose connection was already gone before
it was written (Redis restarted and the worker saw the close) goes on a fresh connection; one
written before the connection dropped fails its caller with a connection error, since Redis
may have run it and a second run of a publish script would count or deduplicate it twice.

A Redis Cluster goes through redis-py (pmq.redisconn), which routes by slot.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import socket
import time
from collections.abc import Callable
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
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

Handler = Callable[[dict[str, Any]], None]


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


def supports(client: aioredis.Redis) -> bool:
    """True for a plain TCP or unix-socket Redis (no TLS, no cluster)."""
    pool = getattr(client, "connection_pool", None)
    if pool is None:
        return False
    cls = pool.connection_class
    return cls in (aioredis.Connection, aioredis.UnixDomainSocketConnection)


def pack(*args: Any) -> bytes:
    """One command in RESP (hiredis's stub types its argument as a 1-tuple)."""
    return hiredis.pack_command(cast(Any, args))


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


def _error(reply: hiredis.ReplyError) -> ResponseError:
    message = str(reply)
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return ResponseError(message)


class _Protocol(asyncio.Protocol):
    """One connection: replies resolve the waiting futures in order; with ``on_push``,
    sharded pub/sub messages go to it instead."""

    def __init__(self, on_push: Callable[[list[Any]], None] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.reader = hiredis.Reader()
        self.on_push = on_push
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[asyncio.Future[Any] | _Shared] = collections.deque()
        self.outgoing: list[bytes] = []
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
        if self.lost.done():
            raise Unsent(f"Redis connection lost: {self.lost.result()}")
        future = self.loop.create_future()
        if not self.outgoing:
            self.loop.call_soon(self._flush)
        if not self.waiting:
            self.progress = time.monotonic()
        self.outgoing.append(packed)
        self.waiting.append(future)
        if self.watchdog is None:
            self.watchdog = self.loop.call_later(REPLY_SECONDS, self._check)
        return future

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
            self.transport.write(b"".join(outgoing))

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


async def _open(endpoint: Endpoint, on_push: Callable[[list[Any]], None] | None) -> _Protocol:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(CONNECT_SECONDS):
            if endpoint.path:
                _, conn = await loop.create_unix_connection(
                    lambda: _Protocol(on_push), endpoint.path
                )
            else:
                _, conn = await loop.create_connection(
                    lambda: _Protocol(on_push), endpoint.host, endpoint.port
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


class Pipe:
    """Commands to one Redis over one connection, opened on first use and again after it
    is lost."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._conn: _Protocol | None = None
        self._opening: asyncio.Task[_Protocol] | None = None

    async def call(self, *args: Any) -> Any:
        """Send one command with the others of this loop iteration; its reply or error.

        A command never reaches Redis twice. If its connection ended before the command was
        written (Redis restarted since), it goes once more on a fresh connection. If the
        connection drops after the write, the caller gets RedisConnectionError although
        Redis may have run the command: the caller must not assume either way (the ingest
        answers 503 and the site retries with its idempotency key)."""
        packed = pack(*args)
        conn = self._conn  # open: no coroutine in between (the hot path)
        if conn is None or conn.lost.done():
            conn = await self._connection()
        try:
            return await conn.send(packed)
        except Unsent:
            return await (await self._connection()).send(packed)

    async def call_confirmed(self, confirm: tuple[Any, ...], *args: Any) -> tuple[Any, Any]:
        """As :meth:`call`, with ``confirm`` (WAITAOF: it answers for every write before it
        on the connection) sent once after the commands of this iteration, for all callers
        that ask in it; while a confirmation is in flight, all who ask meanwhile wait for it
        to answer, then share the next one. Returns the command's reply and the
        confirmation's reply, or the error the confirmation raised; raises the command's
        error."""
        packed, confirming = pack(*args), pack(*confirm)
        try:
            return await self._confirmed(await self._connection(), packed, confirming)
        except Unsent:
            return await self._confirmed(await self._connection(), packed, confirming)

    @staticmethod
    async def _confirmed(conn: _Protocol, packed: bytes, confirm: bytes) -> tuple[Any, Any]:
        reply = conn.send(packed)
        confirmation = conn.confirm(confirm)
        try:
            result = await reply
        except BaseException:
            confirmation.cancel()  # its outcome no longer matters (nor gets logged)
            raise
        try:
            return result, await confirmation
        except RedisError as exc:
            return result, exc

    async def _connection(self) -> _Protocol:
        """The open connection, or a new one."""
        conn = self._conn
        if conn is not None and not conn.lost.done():
            return conn
        if self._opening is None or self._opening.done():  # one open for all who wait
            self._opening = asyncio.get_running_loop().create_task(self._open())
        return await asyncio.shield(self._opening)

    async def _open(self) -> _Protocol:
        self._conn = await _open(self.endpoint, None)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class Subscription:
    """One sharded pub/sub channel on its own connection; ``handler`` gets each message as
    ``{"channel": ..., "data": ...}``. Same interface as pmq.redisconn's."""

    def __init__(self, client: aioredis.Redis, channel: str, handler: Handler) -> None:
        self.endpoint = Endpoint.of(client)
        self.channel = channel
        self.handler = handler
        self._conn: _Protocol | None = None

    async def start(self) -> None:
        conn = await _open(self.endpoint, self._on_push)
        try:
            await conn.send(pack("SSUBSCRIBE", self.channel))
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _on_push(self, reply: list[Any]) -> None:
        self.handler({"channel": reply[1], "data": reply[2]})

    async def dispatch(self) -> None:
        """Handle messages until the connection ends, then raise why."""
        if self._conn is None:
            raise RedisConnectionError("not subscribed")
        raise await asyncio.shield(self._conn.lost)  # a cancelled reader leaves it be

    async def recover(self) -> None:
        """After dispatch raised: subscribe again on a fresh connection."""
        await self.close()
        await self.start()

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
