"""pmq.locks on a real Redis: only the holder renews or lets go of a lock."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from pmq.locks import Lock, delete_if
from tests.helpers import REDIS_URL


def test_a_lock_is_renewed_and_let_go_by_its_holder_only(redis_prefix: str) -> None:
    async def scenario() -> None:
        async with aioredis.Redis.from_url(REDIS_URL) as r:
            key = redis_prefix + "lock"
            mine, theirs = Lock(key, "a:1", 10_000), Lock(key, "b:1", 10_000)
            assert await mine.hold(r)
            assert not await theirs.hold(r)
            await r.pexpire(key, 500)
            assert await mine.hold(r)  # renewed: a full ttl again
            assert 500 < await r.pttl(key) <= 10_000
            assert not await theirs.release(r)  # not theirs: still held
            assert await r.get(key) == b"a:1"
            assert await mine.release(r)
            assert await theirs.hold(r)  # free: taken at once

    asyncio.run(scenario())


def test_delete_if_deletes_only_a_key_that_still_holds_the_value(redis_prefix: str) -> None:
    async def scenario() -> None:
        async with aioredis.Redis.from_url(REDIS_URL) as r:
            key = redis_prefix + "flag"
            await r.set(key, b"mark-2")
            assert not await delete_if(r, key, b"mark-1")  # set again since: kept
            assert await r.exists(key)
            assert await delete_if(r, key, b"mark-2")
            assert not await r.exists(key)
            assert not await delete_if(r, key, b"mark-2")

    asyncio.run(scenario())
