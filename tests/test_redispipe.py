"""pmq.redis.pipe against real Redis servers: replies in order, a Redis restarted or hung, and
the pub/sub reader (every message in order, the loop served during a backlog, a fresh
subscription after a restart)."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import uvloop
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pmq.redis import pipe as redispipe
from pmq.redis import resp as respconn
from tests.helpers import REDIS_URL, RedisServer, wait_for_async


def endpoint(url: str) -> respconn.Endpoint:
    return respconn.Endpoint.of(aioredis.Redis.from_url(url))


def test_endpoint_is_read_from_the_client_url() -> None:
    found = endpoint("redis://user:secret@127.0.0.1:6390/4")
    assert found == respconn.Endpoint("127.0.0.1", 6390, None, 4, "user", "secret")
    assert endpoint("unix:///tmp/r.sock?db=2").path == "/tmp/r.sock"
    assert not redispipe.supports(aioredis.Redis.from_url("rediss://127.0.0.1:6390/0"))


def test_replies_reach_their_callers_in_order(redis_prefix: str) -> None:
    async def scenario() -> list[Any]:
        pipe = redispipe.Pipe(endpoint(REDIS_URL))
        try:
            key = f"{redis_prefix}list"
            return await asyncio.gather(
                *(pipe.call("RPUSH", key, i) for i in range(1000)),
                pipe.call("LRANGE", key, 0, 2),
                pipe.call("HGET", key, "x"),  # a type error fails this caller only
                pipe.call("GET", f"{redis_prefix}missing"),
                return_exceptions=True,
            )
        finally:
            pipe.close()

    replies = uvloop.run(scenario())
    assert replies[:1000] == list(range(1, 1001))
    assert replies[1000] == [b"0", b"1", b"2"]
    assert isinstance(replies[1001], ResponseError) and "WRONGTYPE" in str(replies[1001])
    assert replies[1002] is None


def test_connections_probe_a_silent_peer_with_tcp_keepalive() -> None:
    async def scenario() -> tuple[int, int]:
        pipe = redispipe.Pipe(endpoint(REDIS_URL))
        try:
            await pipe.call("PING")
            assert pipe._conn is not None and pipe._conn.transport is not None
            sock = pipe._conn.transport.get_extra_info("socket")
            return (
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            )
        finally:
            pipe.close()

    assert uvloop.run(scenario()) == (1, 30)


def test_the_url_s_password_and_database_are_used(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, "--requirepass", "s3cret").start()
    url = f"redis://:s3cret@127.0.0.1:{server.port}/5"

    async def scenario() -> list[Any]:
        pipe = redispipe.Pipe(endpoint(url))
        wrong = redispipe.Pipe(endpoint(f"redis://:nope@127.0.0.1:{server.port}/5"))
        try:
            written = await pipe.call("SET", "k", "in five")
            refused = await asyncio.gather(wrong.call("PING"), return_exceptions=True)
            async with aioredis.Redis.from_url(url.replace("/5", "/0")) as zero:
                in_zero = await zero.get("k")
            return [written, refused[0], in_zero, await pipe.call("GET", "k")]
        finally:
            pipe.close()
            wrong.close()

    try:
        written, refused, in_zero, read = uvloop.run(scenario())
    finally:
        server.stop()
    assert (written, in_zero, read) == (b"OK", None, b"in five")
    assert isinstance(refused, ResponseError) and "WRONGPASS" in str(refused)


def test_a_restarted_redis_is_reconnected_to_without_failing_a_call(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()

    async def scenario() -> list[Any]:
        pipe = redispipe.Pipe(endpoint(server.url))
        try:
            first = await pipe.call("SET", "k", "before")
            server.stop()
            server.start()
            return [first, await pipe.call("SET", "k", "after"), await pipe.call("GET", "k")]
        finally:
            pipe.close()

    try:
        assert uvloop.run(scenario()) == [b"OK", b"OK", b"after"]
    finally:
        server.stop()


def test_redis_down_fails_every_caller_with_a_connection_error(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)  # never started: nothing listens on its port

    async def scenario() -> list[Any]:
        pipe = redispipe.Pipe(endpoint(server.url))
        return await asyncio.gather(*(pipe.call("PING") for _ in range(3)), return_exceptions=True)

    for result in uvloop.run(scenario()):
        assert isinstance(result, RedisConnectionError)


def test_a_hung_redis_times_out_the_waiting_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(respconn, "REPLY_SECONDS", 0.5)
    server = RedisServer(tmp_path).start()
    assert server.proc is not None

    async def scenario() -> tuple[list[Any], float, Any]:
        pipe = redispipe.Pipe(endpoint(server.url))
        try:
            await pipe.call("PING")
            os.kill(server.proc.pid, signal.SIGSTOP)
            started = time.monotonic()
            results = await asyncio.gather(
                *(pipe.call("PING") for _ in range(3)), return_exceptions=True
            )
            waited = time.monotonic() - started
            os.kill(server.proc.pid, signal.SIGCONT)
            return results, waited, await pipe.call("PING")
        finally:
            pipe.close()

    try:
        results, waited, after = uvloop.run(scenario())
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()
    assert all(isinstance(r, RedisTimeoutError) for r in results)
    assert 0.5 <= waited < 5
    assert after == b"PONG"  # a fresh connection once Redis answers again


def test_subscription_handles_every_message_in_order_and_serves_the_loop_meanwhile(
    redis_prefix: str,
) -> None:
    channel = f"{redis_prefix}ch"
    count = 5000

    async def scenario() -> tuple[list[bytes], list[int]]:
        client = aioredis.Redis.from_url(REDIS_URL)
        seen: list[bytes] = []
        subscription = redispipe.Subscription(client, channel, lambda m: seen.append(m["data"]))
        await subscription.start()
        reading = asyncio.create_task(subscription.dispatch())
        ticks: list[int] = []  # how many messages were handled each time the loop came here

        async def ticker() -> None:
            while True:
                ticks.append(len(seen))
                await asyncio.sleep(0)

        ticking = asyncio.create_task(ticker())
        try:
            pipe = client.pipeline(transaction=False)  # one burst: a backlog on arrival
            for i in range(count):
                pipe.execute_command("SPUBLISH", channel, str(i))
            await pipe.execute()
            await wait_for_async(lambda: len(seen) == count, 10, f"{count} messages")
        finally:
            ticking.cancel()
            reading.cancel()
            await subscription.close()
            await client.aclose()
        return seen, ticks

    seen, ticks = uvloop.run(scenario())
    assert seen == [str(i).encode() for i in range(count)]
    steps = [b - a for a, b in itertools.pairwise(ticks) if b > a]
    # At most REPLIES_PER_TURN per callback; a turn may run two (the end of a backlog, then
    # newly read data), never the whole burst.
    assert len(steps) >= count // (2 * respconn.REPLIES_PER_TURN)
    assert max(steps) <= 2 * respconn.REPLIES_PER_TURN


def test_subscription_raises_on_a_restart_and_recovers(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()

    async def scenario() -> tuple[Exception, list[bytes]]:
        client = aioredis.Redis.from_url(server.url)
        seen: list[bytes] = []
        subscription = redispipe.Subscription(client, "ch", lambda m: seen.append(m["data"]))
        await subscription.start()
        reading = asyncio.create_task(subscription.dispatch())
        try:
            server.stop()
            failure = await asyncio.wait_for(asyncio.gather(reading, return_exceptions=True), 5)
            server.start()
            await subscription.recover()
            reading = asyncio.create_task(subscription.dispatch())
            async with aioredis.Redis.from_url(server.url) as publisher:
                assert await publisher.execute_command("SPUBLISH", "ch", "again") == 1
            await wait_for_async(lambda: seen, 10, "the message after the restart")
        finally:
            reading.cancel()
            await subscription.close()
            await client.aclose()
        return failure[0], seen

    try:
        failure, seen = uvloop.run(scenario())
    finally:
        server.stop()
    assert isinstance(failure, RedisConnectionError)
    assert seen == [b"again"]
