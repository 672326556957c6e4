"""Closed connections leave the registry in batches (Routes.leave / remove_departed), on a
real Redis: a mass disconnect is a few round trips, and a Redis outage only delays it (the
remover runs under the worker's loop supervisor, as a socket worker runs it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import uvloop

from pmq.domain.routing import DEPARTURE_BATCH, Routes
from pmq.redis.keys import Keys
from pmq.workers.base import supervise
from tests.helpers import (
    REDIS_URL,
    RedisServer,
    TcpProxy,
    counting_pipelines,
    wait_for_async,
)

WORKER = "node1:socket1:100"


async def registered(routes: Routes, users: int) -> None:
    pipe = routes.redis.pipeline(transaction=False)
    for uid in range(1, users + 1):
        routes.register_on(pipe, str(uid), f"c{uid}")
    await pipe.execute()


async def left_behind(routes: Routes, users: int) -> int:
    """Registry entries of the users still there, the worker's own list included (read on a
    client of its own, so it is not counted as the routes' round trips)."""
    reader = aioredis.Redis(connection_pool=routes.redis.connection_pool)
    pipe = reader.pipeline(transaction=False)
    for uid in range(1, users + 1):
        pipe.hlen(routes.keys.user_conns(str(uid)))
    pipe.hlen(routes.keys.worker_conns(WORKER))
    return sum(await pipe.execute())


async def left_behind_directly(url: str, users: int) -> int:
    """left_behind() read straight from the Redis at ``url``, past any proxy."""
    routes = Routes(aioredis.Redis.from_url(url), Keys("pmqtest:"), WORKER, 25)
    try:
        return await left_behind(routes, users)
    finally:
        await routes.redis.aclose()


async def gone(routes: Routes, users: int) -> bool:
    """Whether none of ``users``' registry entries is left."""
    return not await left_behind(routes, users)


def test_a_mass_disconnect_is_a_few_round_trips(redis_prefix: str) -> None:
    users = 5000

    async def scenario() -> int:
        client = aioredis.Redis.from_url(REDIS_URL)
        routes = Routes(client, Keys(redis_prefix), WORKER, 25)
        await registered(routes, users)
        assert await left_behind(routes, users) == 2 * users
        made = counting_pipelines(client)
        remover = asyncio.create_task(routes.remove_departed())
        for uid in range(1, users + 1):
            routes.leave(str(uid), f"c{uid}")
        await wait_for_async(lambda: gone(routes, users), 10, "every departure removed")
        remover.cancel()
        await client.aclose()
        return len(made)

    round_trips = uvloop.run(scenario())
    assert round_trips == users // DEPARTURE_BATCH


def test_departures_wait_out_a_redis_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The outage is a cut proxy, not a stopped Redis: the entries survive it, as they would
    # a network fault, and nothing has to write them back while the remover is retrying.
    own = RedisServer(tmp_path).start()
    proxy = TcpProxy("127.0.0.1", own.port)
    users = 50

    async def scenario() -> None:
        client = aioredis.Redis(host="127.0.0.1", port=proxy.port)
        routes = Routes(client, Keys("pmqtest:"), WORKER, 25)
        await registered(routes, users)
        died: list[Exception] = []
        remover = asyncio.create_task(
            supervise("departures", routes.remove_departed, lambda _, exc: died.append(exc))
        )
        proxy.cut()
        for uid in range(1, users + 1):
            routes.leave(str(uid), f"c{uid}")
        await wait_for_async(  # the remover fails against the cut, and restarts
            lambda: caplog.text.count("loop departures failed") >= 2, 20, "two failed runs"
        )
        assert not died
        assert not remover.done()
        assert await left_behind_directly(own.url, users) == 2 * users  # nothing removed
        proxy.restore()
        # The departures were kept, not dropped.
        await wait_for_async(lambda: gone(routes, users), 20, "every departure removed")
        remover.cancel()
        await client.aclose()

    try:
        uvloop.run(scenario())
    finally:
        proxy.close()
        own.stop()
