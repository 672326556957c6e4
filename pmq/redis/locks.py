"""Leases: keys that hold their holder's name, taken, renewed and let go only by their holder.

Each step is one Lua script (pmq/redis/scripts ``lease_*``), so a holder whose lease expired and
was taken by another never renews or deletes the other's: the value is compared and the key
changed in one step. The same compare-and-delete serves any key whose value says who may
delete it (a cold flag's mark). Every key is passed in KEYS, so Redis Cluster sends the call
to the key's slot.
"""

from __future__ import annotations

import dataclasses

import redis.asyncio as aioredis

from pmq.redis import scripts


async def delete_if(redis: aioredis.Redis, key: str, value: str | bytes) -> bool:
    """Delete ``key`` if it still holds ``value``; True if it did."""
    return bool(await scripts.register(redis, "lease_release")(keys=[key], args=[value]))


@dataclasses.dataclass(frozen=True, slots=True)
class Lease:
    """``key`` held by ``owner`` for ``ttl_ms`` after each take or renewal.

    Two ways to keep it: :meth:`hold` (a cluster-wide lock: whoever finds it free takes it,
    the holder renews it with the same call) or :meth:`take` once then :meth:`renew` (a
    number leased for good: a lapsed lease is never taken back silently, the holder learns
    it lost it)."""

    key: str
    owner: str
    ttl_ms: int

    async def take(self, redis: aioredis.Redis) -> bool:
        """Take the lease if nobody holds it; False when someone does (even this owner)."""
        return bool(await redis.set(self.key, self.owner, nx=True, px=self.ttl_ms))

    async def hold(self, redis: aioredis.Redis) -> bool:
        """Take the lease, or renew it if this owner holds it; False while another does."""
        script = scripts.register(redis, "lease_hold")
        return bool(await script(keys=[self.key], args=[self.owner, self.ttl_ms]))

    async def renew(self, redis: aioredis.Redis) -> bool:
        """Renew the lease while this owner holds it; False when it lapsed or another holds
        it (then the caller must take a lease anew)."""
        script = scripts.register(redis, "lease_renew")
        return bool(await script(keys=[self.key], args=[self.owner, self.ttl_ms]))

    async def release(self, redis: aioredis.Redis) -> bool:
        """Let go of the lease if this owner holds it, so another may take it at once; True
        if it did."""
        return await delete_if(redis, self.key, self.owner)
