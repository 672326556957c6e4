"""pmq.redis.locks on a real Redis: only the holder of a lease renews or lets go of it."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from pmq.redis.locks import Lease, delete_if
from tests.helpers import REDIS_URL, wait_for_async


def test_a_lease_held_is_renewed_and_let_go_by_its_holder_only(redis_prefix: str) -> None:
    async def scenario() -> None:
        async with aioredis.Redis.from_url(REDIS_URL) as r:
            key = redis_prefix + "lock"
            mine, theirs = Lease(key, "a:1", 10_000), Lease(key, "b:1", 10_000)
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


def test_a_lease_is_taken_only_when_free_and_renewed_by_its_owner_only(
    redis_prefix: str,
) -> None:
    async def scenario() -> None:
        async with aioredis.Redis.from_url(REDIS_URL) as r:
            key = redis_prefix + "lease"
            mine, theirs = Lease(key, "a:1", 10_000), Lease(key, "b:1", 10_000)
            assert not await mine.renew(r)  # nobody holds it: a renewal takes nothing
            assert not await r.exists(key)
            assert await mine.take(r)
            assert not await mine.take(r)  # held, even by its owner: take is for a free one
            assert not await theirs.take(r)
            assert not await theirs.renew(r)  # not theirs: the owner's ttl is left alone
            await r.pexpire(key, 500)
            assert not await theirs.renew(r)
            assert await r.pttl(key) <= 500
            assert await mine.renew(r)
            assert 500 < await r.pttl(key) <= 10_000
            assert await r.get(key) == b"a:1"

    asyncio.run(scenario())


def test_an_expired_lease_is_free_and_never_renewed_by_its_former_owner(
    redis_prefix: str,
) -> None:
    async def scenario() -> None:
        async with aioredis.Redis.from_url(REDIS_URL) as r:
            key = redis_prefix + "lease"
            mine, theirs = Lease(key, "a:1", 50), Lease(key, "b:1", 10_000)
            assert await mine.take(r)

            async def expired() -> bool:
                return not await r.exists(key)

            await wait_for_async(expired, what="the lease to expire")
            assert not await mine.renew(r)  # lapsed: renewing never takes it back
            assert await theirs.take(r)
            assert not await mine.renew(r)
            assert not await mine.release(r)
            assert not await mine.hold(r)
            assert await r.get(key) == b"b:1"
            assert await theirs.release(r)
            assert not await r.exists(key)

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
