"""A command is never applied twice because its connection dropped after Redis ran it, for
both ways PMQ talks to one Redis (pmq.redis.pipe's Pipe, its pipelines too, and
pmq.redis.conn's pool), while a connection already dead before the command was written is
replaced without failing it; and on a Redis Cluster, whose client still finds a master that
moved after such a failure.

The fault is real: a proxy forwards the command to Redis, waits for Redis's reply (so the
command ran) and cuts the client's connection instead of passing the reply on."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
import uvloop
from redis.exceptions import ConnectionError as RedisConnectionError

from pmq.config import RedisConfig
from pmq.domain.cluster import connect_sync
from pmq.domain.ids import IdGenerator
from pmq.domain.inbox import Inbox
from pmq.domain.messaging import publish
from pmq.domain.routing import Routes
from pmq.redis import conn as redisconn
from pmq.redis import pipe as redispipe
from pmq.redis import resp as respconn
from pmq.redis.batching import Batcher
from pmq.redis.keys import Keys
from tests.helpers import REDIS_URL, RedisServer, wait_for, wait_for_async
from tests.test_redis_cluster import RedisClusterServers

INCR = "return redis.call('INCR', KEYS[1])"


class ReplyCutter:
    """A proxy to the test Redis (or to ``target``) on this event loop. Once :meth:`arm` ed,
    the next data a client sends is forwarded and Redis's reply awaited, then that client's
    connection is aborted with the reply withheld; later connections pass through."""

    def __init__(self, target: respconn.Endpoint | None = None) -> None:
        self.target = target or respconn.Endpoint.of(aioredis.Redis.from_url(REDIS_URL))
        self.armed = False
        self.cuts = 0
        self.server: asyncio.Server | None = None
        self.clients: list[asyncio.Transport] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def arm(self) -> None:
        self.armed = True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients.append(writer.transport)  # type: ignore[arg-type]
        up_reader, up_writer = await asyncio.open_connection(self.target.host, self.target.port)
        cutting = asyncio.Event()  # the command in flight is the one to cut after

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                if cutting.is_set():  # Redis ran it and answered: withhold the answer
                    self.cuts += 1
                    writer.transport.abort()
                    return
                writer.write(data)

        replies = asyncio.create_task(downstream())
        try:
            while data := await reader.read(65536):
                if self.armed:
                    self.armed = False
                    cutting.set()
                up_writer.write(data)
            await replies
        except (OSError, asyncio.CancelledError):  # cut, or the test's loop ended
            pass
        finally:
            replies.cancel()
            up_writer.transport.abort()
            writer.transport.abort()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for transport in self.clients:
            transport.abort()


async def counter(key: str) -> int:
    async with aioredis.Redis.from_url(REDIS_URL) as client:
        return int(await client.get(key) or 0)


def run_cut(
    redis_prefix: str, make: Callable[[int], tuple[Callable[..., Awaitable[Any]], Any]]
) -> tuple[Any, int, int]:
    """Warm up a client through the cutter, arm it, run the INCR script once: (what the
    call gave, the counter in Redis, how many connections were cut)."""
    key = f"{redis_prefix}counter"

    async def scenario() -> tuple[Any, int, int]:
        cutter = ReplyCutter()
        port = await cutter.start()
        call, closer = make(port)
        try:
            assert await call("PING") in (b"PONG", True)
            cutter.arm()
            result = await asyncio.gather(call("EVAL", INCR, 1, key), return_exceptions=True)
            return result[0], await counter(key), cutter.cuts
        finally:
            await closer()
            await cutter.close()

    return uvloop.run(scenario())


def pipe_at(port: int) -> tuple[Callable[..., Awaitable[Any]], Any]:
    pipe = redispipe.Pipe(respconn.Endpoint("127.0.0.1", port))

    async def close() -> None:
        pipe.close()

    return pipe.call, close


def pipeline_at(port: int) -> tuple[Callable[..., Awaitable[Any]], Any]:
    """The command and a PING after it, sent together as one pipeline's (Pipe.call_many)."""
    pipe = redispipe.Pipe(respconn.Endpoint("127.0.0.1", port))

    async def call(*args: Any) -> Any:
        return (await pipe.call_many([respconn.pack(*args), respconn.pack("PING")]))[0]

    async def close() -> None:
        pipe.close()

    return call, close


def pool_at(port: int) -> tuple[Callable[..., Awaitable[Any]], Any]:
    client = redisconn.connect(RedisConfig(url=f"redis://127.0.0.1:{port}/0"))
    return client.execute_command, client.aclose


def test_a_pipe_command_cut_after_redis_ran_it_fails_and_runs_once(redis_prefix: str) -> None:
    result, count, cuts = run_cut(redis_prefix, pipe_at)
    assert cuts == 1
    assert count == 1  # never sent again: the script ran once
    assert isinstance(result, RedisConnectionError)
    assert not isinstance(result, respconn.Unsent)


def test_a_pipeline_cut_after_redis_ran_it_fails_and_runs_once(redis_prefix: str) -> None:
    result, count, cuts = run_cut(redis_prefix, pipeline_at)
    assert cuts == 1
    assert count == 1
    assert isinstance(result, RedisConnectionError)
    assert not isinstance(result, respconn.Unsent)


def test_a_pooled_command_cut_after_redis_ran_it_fails_and_runs_once(redis_prefix: str) -> None:
    result, count, cuts = run_cut(redis_prefix, pool_at)
    assert cuts == 1
    assert count == 1
    assert isinstance(result, RedisConnectionError)


def test_a_pipe_connection_dead_before_the_write_is_replaced(redis_prefix: str) -> None:
    key = f"{redis_prefix}counter"

    async def scenario() -> list[Any]:
        pipe = redispipe.Pipe(respconn.Endpoint.of(aioredis.Redis.from_url(REDIS_URL)))
        try:
            await pipe.call("PING")
            queued = asyncio.create_task(pipe.call("EVAL", INCR, 1, key))
            await asyncio.sleep(0)  # queued: its write is due at the loop's next turn
            assert pipe._conn is not None and pipe._conn.outgoing
            assert pipe._conn.transport is not None
            pipe._conn.transport.abort()  # gone before the write
            return [await queued, await pipe.call("EVAL", INCR, 1, key)]
        finally:
            pipe.close()

    assert uvloop.run(scenario()) == [1, 2]
    assert uvloop.run(counter(key)) == 2


def test_a_pipeline_whose_connection_died_before_the_write_is_sent_again(
    redis_prefix: str,
) -> None:
    key = f"{redis_prefix}conns"

    async def scenario() -> list[Any]:
        pipe = redispipe.Pipe(respconn.Endpoint.of(aioredis.Redis.from_url(REDIS_URL)))
        try:
            await pipe.call("PING")
            queued = asyncio.create_task(pipe.pipeline().hset(key, "c1", "w1").execute())
            await asyncio.sleep(0)  # queued: its write is due at the loop's next turn
            assert pipe._conn is not None and pipe._conn.outgoing
            assert pipe._conn.transport is not None
            pipe._conn.transport.abort()  # gone before the write
            # HSET answers 1 for a new field: 0 would say it ran before (was sent twice)
            return [await queued, await pipe.pipeline().hgetall(key).execute()]
        finally:
            pipe.close()

    assert uvloop.run(scenario()) == [[1], [{b"c1": b"w1"}]]


@pytest.mark.parametrize("client", ["pipe", "pool"])
def test_the_first_command_after_a_redis_restart_succeeds(tmp_path: Path, client: str) -> None:
    server = RedisServer(tmp_path).start()

    async def scenario() -> list[Any]:
        call, close = (pipe_at if client == "pipe" else pool_at)(server.port)
        try:
            first = await call("EVAL", INCR, 1, "k")
            await asyncio.to_thread(server.stop)  # the worker's loop runs meanwhile
            await asyncio.to_thread(server.start)
            started = time.monotonic()
            after = [await call("EVAL", INCR, 1, "k"), await call("GET", "k")]
            assert time.monotonic() - started < 5
            return [first, *after]
        finally:
            await close()

    try:
        assert uvloop.run(scenario()) == [1, 1, b"1"]
    finally:
        server.stop()


def test_a_publish_whose_relay_is_cut_is_accepted_once_and_not_raised(redis_prefix: str) -> None:
    # The message is accepted on one connection; its relay to the worker holding the user
    # goes through the cutter, which lets Redis publish it and cuts the reply.
    keys = Keys(redis_prefix)

    async def scenario() -> tuple[int, int, list[str], int]:
        cutter = ReplyCutter()
        port = await cutter.start()
        client = aioredis.Redis.from_url(REDIS_URL)
        relay_batch = Batcher(aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0"))
        routes = Routes(client, keys, "w1", 25, relay_batch)
        inbox = Inbox(client, keys, IdGenerator(1), 60, 3600)
        got: list[dict[str, Any]] = []
        listener = redispipe.Subscription(client, keys.worker_channel("w2"), got.append)
        await listener.start()
        try:
            await Routes(client, keys, "w2", 25).register("42", "c1")
            await relay_batch.call("PING")
            cutter.arm()
            _, reached = await publish(inbox, routes, ["42"], "notice", None, {"n": 1})
            await wait_for_async(lambda: got, 10, "the relay")
            pending = [m["id"] for m in await inbox.pending("42", None, 0, 10)]
            return cutter.cuts, reached, pending, len(got)
        finally:
            relay_batch.close()
            await listener.close()
            await client.aclose()
            await cutter.close()

    cuts, reached, pending, relays = uvloop.run(scenario())
    assert cuts == 1 and reached == 0  # answered as accepted, pushed to no one here
    assert len(pending) == 1  # in the inbox, for the next connect
    assert relays == 1  # the relay was not sent again


# On a Redis Cluster ------------------------------------------------------------------------


def announced_ports(port: int) -> set[int]:
    """The node ports that the cluster node on ``port`` tells clients (CLUSTER SLOTS)."""
    with contextlib.closing(redis.Redis(port=port)) as node:
        return {int(shard[2][1]) for shard in node.execute_command("CLUSTER", "SLOTS")}


def announce(servers: RedisClusterServers, owner: int, port: int) -> None:
    """Make the master on ``owner`` tell clients (through every node) it is at ``port``."""
    with contextlib.closing(redis.Redis(port=owner)) as node:
        node.config_set("cluster-announce-port", port)
    wait_for(lambda: all(port in announced_ports(p) for p in servers.ports), 20, "gossip")


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="a Redis Cluster needs redis-cli")
def test_a_cluster_command_cut_after_the_node_ran_it_fails_and_runs_once(tmp_path: Path) -> None:
    """A script call and a pipelined one, each cut after the owning master ran it, fail and
    ran once; the next command succeeds; when the master then answers at another address
    (as after a failover), the client finds it again by refreshing its slots map."""
    servers = RedisClusterServers(tmp_path).start()
    key = "{resend}counter"
    with contextlib.closing(servers.client()) as probe:
        owner = probe.get_node_from_key(key).port
    direct = redis.Redis(port=owner)

    async def scenario() -> list[Any]:
        cutter = ReplyCutter(respconn.Endpoint("127.0.0.1", owner))
        announce(servers, owner, await cutter.start())  # clients reach the master via it
        client = redisconn.connect(RedisConfig(url=f"redis+cluster://127.0.0.1:{owner}"))
        seen: list[Any] = []
        try:
            assert await client.get(key) is None  # the connection to the master, warm
            cutter.arm()
            seen.append(await asyncio.gather(client.eval(INCR, 1, key), return_exceptions=True))
            seen.append([direct.get(key), cutter.cuts])
            seen.append(await client.eval(INCR, 1, key))  # no lasting breakage

            await client.get(key)  # warm again
            cutter.arm()
            pipe = client.pipeline(transaction=False)
            pipe.eval(INCR, 1, key)
            seen.append(await asyncio.gather(pipe.execute(), return_exceptions=True))
            seen.append([direct.get(key), cutter.cuts])

            # pmqctl's blocking cluster client (pmqctl dlq retry writes through it).
            blocking = connect_sync(RedisConfig(url=f"redis+cluster://127.0.0.1:{owner}"))
            await asyncio.to_thread(blocking.get, key)
            cutter.arm()
            seen.append(
                await asyncio.gather(
                    asyncio.to_thread(blocking.eval, INCR, 1, key), return_exceptions=True
                )
            )
            seen.append([direct.get(key), cutter.cuts])
            blocking.close()

            # The master moves back to its own port and the proxy's address goes dead.
            await cutter.close()
            await asyncio.to_thread(announce, servers, owner, owner)

            async def found_again() -> list[Any] | None:
                """[the reply], or None for a connection error (a redirect or a failed
                topology refresh) while the client looks for the master."""
                try:
                    return [await client.get(key)]
                except RedisConnectionError:
                    return None

            [found] = await wait_for_async(found_again, 20, "the master at its new address")
            seen.append(found)
            seen.append(await client.eval(INCR, 1, key))
            return seen
        finally:
            await client.aclose()
            await cutter.close()

    try:
        [cut], ran, after, [cut_pipe], ran_pipe, [cut_sync], ran_sync, found, last = uvloop.run(
            scenario()
        )
    finally:
        direct.close()
        servers.stop()
    assert isinstance(cut, RedisConnectionError), cut
    assert ran == [b"1", 1]  # never sent again: the script ran once
    assert after == 2
    assert isinstance(cut_pipe, RedisConnectionError), cut_pipe
    assert ran_pipe == [b"3", 2]
    assert isinstance(cut_sync, RedisConnectionError), cut_sync
    assert ran_sync == [b"4", 3]
    assert found == b"4" and last == 5
