"""Closed connections leave the registry in batches (Routes.leave / remove_departed), on a
real Redis: a mass disconnect is a few round trips, and a Redis outage only delays it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis.asyncio as aioredis
import uvloop

from pmq.keys import Keys
from pmq.routing import DEPARTURE_BATCH, Routes
from tests.helpers import REDIS_URL, NoDelivery, RedisServer, counting_pipelines

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


async def until_gone(routes: Routes, users: int, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while await left_behind(routes, users):
            await asyncio.sleep(0.05)


def test_a_mass_disconnect_is_a_few_round_trips(redis_prefix: str) -> None:
    users = 5000

    async def scenario() -> int:
        client = aioredis.Redis.from_url(REDIS_URL)
        routes = Routes(client, Keys(redis_prefix), WORKER, 25, NoDelivery())
        await registered(routes, users)
        assert await left_behind(routes, users) == 2 * users
        made = counting_pipelines(client)
        remover = asyncio.create_task(routes.remove_departed())
        for uid in range(1, users + 1):
            routes.leave(str(uid), f"c{uid}")
        await until_gone(routes, users, 10)
        remover.cancel()
        await client.aclose()
        return len(made)

    round_trips = uvloop.run(scenario())
    assert round_trips == users // DEPARTURE_BATCH


def test_departures_wait_out_a_redis_outage(tmp_path: Path) -> None:
    own = RedisServer(tmp_path).start()
    users = 50

    async def scenario() -> None:
        client = aioredis.Redis.from_url(own.url)
        routes = Routes(client, Keys("pmqtest:"), WORKER, 25, NoDelivery())
        await registered(routes, users)
        remover = asyncio.create_task(routes.remove_departed())
        own.stop()
        for uid in range(1, users + 1):
            routes.leave(str(uid), f"c{uid}")
        await asyncio.sleep(1.0)  # let the remover fail against the stopped server
        assert len(routes.departures) == users  # kept, not dropped
        own.start()  # empty again: write the entries back, as if they had survived
        await registered(routes, users)
        await until_gone(routes, users, 10)
        remover.cancel()
        await client.aclose()

    try:
        uvloop.run(scenario())
    finally:
        own.stop()
