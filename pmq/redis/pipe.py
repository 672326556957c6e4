"""A lean Redis connection for a socket worker's hot path (single server only).

redis-py wraps every command, even inside a pipeline, in Python: packing, a pool checkout,
a timeout, its parser's layers. Under unicast load that was a fifth of a socket worker's
CPU (docs/benchmarks.md, b). Here hiredis packs each command and parses every reply in C;
the commands issued during one event-loop iteration leave in one write on one connection,
and each reply, in order, resolves its caller's future.

:class:`Pipe` carries commands (publish scripts, relays) and pipelines of a few commands
sent in one go (:class:`Pipeline`: a connect's registration); :class:`Subscription` reads one
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

The connection itself (hiredis parsing, the group commit, the watchdog, Unsent) is
pmq.redis.resp. A Redis Cluster goes through redis-py (pmq.redis.conn), which routes by slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from pmq.redis.resp import Endpoint, RespConnection, Unsent, open_connection, pack

Handler = Callable[[dict[str, Any]], None]


def supports(client: aioredis.Redis) -> bool:
    """True for a plain TCP or unix-socket Redis (no TLS, no cluster) whose client reads
    replies as bytes, as a Pipe does."""
    pool = getattr(client, "connection_pool", None)
    if pool is None or pool.connection_kwargs.get("decode_responses"):
        return False
    cls = pool.connection_class
    return cls in (aioredis.Connection, aioredis.UnixDomainSocketConnection)


class Pipe:
    """Commands to one Redis over one connection, opened on first use and again after it
    is lost."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._conn: RespConnection | None = None
        self._opening: asyncio.Task[RespConnection] | None = None

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

    async def call_many(self, commands: Sequence[bytes]) -> list[Any]:
        """Send ``commands`` (packed, at least one) together with the others of this loop
        iteration, in one write; their replies in order, or the first error reply raised.
        Written at most once, as :meth:`call`: all of them go again on a fresh connection
        when none was written, none when they were."""
        conn = self._conn
        if conn is None or conn.lost.done():
            conn = await self._connection()
        try:
            return await conn.send_many(commands)
        except Unsent:
            return await (await self._connection()).send_many(commands)

    def connected(self) -> RespConnection | None:
        """The connection if it is open now, else None (the caller goes the usual way,
        which opens one)."""
        conn = self._conn
        return None if conn is None or conn.lost.done() else conn

    def pipeline(self) -> Pipeline:
        """A few commands to queue and send in one go (:class:`Pipeline`)."""
        return Pipeline(self)

    @staticmethod
    async def _confirmed(conn: RespConnection, packed: bytes, confirm: bytes) -> tuple[Any, Any]:
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

    async def _connection(self) -> RespConnection:
        """The open connection, or a new one."""
        conn = self._conn
        if conn is not None and not conn.lost.done():
            return conn
        if self._opening is None or self._opening.done():  # one open for all who wait
            self._opening = asyncio.get_running_loop().create_task(self._open())
        return await asyncio.shield(self._opening)

    async def _open(self) -> RespConnection:
        self._conn = await open_connection(self.endpoint, None)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def _ok(reply: Any) -> Any:
    return reply and reply == b"OK"


def _pairs(reply: list[Any]) -> dict[Any, Any]:
    found = iter(reply)
    return dict(zip(found, found, strict=True))


def _limit(start: int | None, num: int | None) -> tuple[Any, ...]:
    if (start is None) != (num is None):
        raise ValueError("start and num go together")
    return () if start is None else ("LIMIT", start, num)


class Pipeline:
    """Commands queued under the names and arguments of redis-py's pipeline methods (the
    few the hot path uses), sent by :meth:`execute` in one write on a :class:`Pipe`; their
    replies come back in the shapes redis-py's pipeline gives for a client without
    ``decode_responses`` (its response callbacks: SET gives True, EXPIRE and HEXISTS a bool,
    HGETALL a dict of bytes). So code that queues on a pipeline handed to it works on
    either (pmq.redis.batching.Batcher.pipeline picks)."""

    __slots__ = ("commands", "pipe", "shapes")

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe
        self.commands: list[bytes] = []
        self.shapes: list[Callable[[Any], Any] | None] = []  # a reply's redis-py callback

    def _queue(self, shape: Callable[[Any], Any] | None, *args: Any) -> Pipeline:
        self.commands.append(pack(*args))
        self.shapes.append(shape)
        return self

    def get(self, name: Any) -> Pipeline:
        return self._queue(None, "GET", name)

    def set(self, name: Any, value: Any, ex: int | None = None) -> Pipeline:
        expiry = () if ex is None else ("EX", ex)
        return self._queue(_ok, "SET", name, value, *expiry)

    def expire(self, name: Any, time: int) -> Pipeline:
        return self._queue(bool, "EXPIRE", name, time)

    def hset(self, name: Any, key: Any, value: Any) -> Pipeline:
        return self._queue(None, "HSET", name, key, value)

    def hdel(self, name: Any, *keys: Any) -> Pipeline:
        return self._queue(None, "HDEL", name, *keys)

    def hexists(self, name: Any, key: Any) -> Pipeline:
        return self._queue(bool, "HEXISTS", name, key)

    def hgetall(self, name: Any) -> Pipeline:
        return self._queue(_pairs, "HGETALL", name)

    def zrangebyscore(
        self, name: Any, min: Any, max: Any, start: int | None = None, num: int | None = None
    ) -> Pipeline:
        return self._queue(None, "ZRANGEBYSCORE", name, min, max, *_limit(start, num))

    def zrevrangebyscore(
        self, name: Any, max: Any, min: Any, start: int | None = None, num: int | None = None
    ) -> Pipeline:
        return self._queue(None, "ZREVRANGEBYSCORE", name, max, min, *_limit(start, num))

    async def execute(self) -> list[Any]:
        """Send the queued commands in one write and empty the pipeline; their replies in
        order, or the first error reply raised (as redis-py's pipeline does), or
        RedisConnectionError as :meth:`Pipe.call_many` says."""
        commands, shapes = self.commands, self.shapes
        self.commands, self.shapes = [], []
        if not commands:
            return []
        replies = await self.pipe.call_many(commands)
        return [r if shape is None else shape(r) for r, shape in zip(replies, shapes, strict=True)]


class Subscription:
    """One sharded pub/sub channel on its own connection; ``handler`` gets each message as
    ``{"channel": ..., "data": ...}``. Same interface as pmq.redis.conn's."""

    def __init__(self, client: aioredis.Redis, channel: str, handler: Handler) -> None:
        self.endpoint = Endpoint.of(client)
        self.channel = channel
        self.handler = handler
        self._conn: RespConnection | None = None

    async def start(self) -> None:
        conn = await open_connection(self.endpoint, self._on_push)
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
