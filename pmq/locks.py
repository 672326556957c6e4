"""Keys that hold their holder's name: a lock is taken, renewed and let go only by its holder.

Each step is one Lua script, so a holder whose lock expired and was taken by another never
renews or deletes the other's: the value is compared and the key changed in one step. The
same compare-and-delete serves any key whose value says who may delete it (a cold flag's
mark). Every key is passed in KEYS, so Redis Cluster sends the call to the key's slot.
"""

from __future__ import annotations

import dataclasses

import redis.asyncio as aioredis

# KEYS: the lock; ARGV: owner, ttl ms. Takes the lock when free, renews it when the caller
# holds it; returns 1 when the caller holds it now, 0 when another does.
TAKE_OR_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: the key; ARGV: value. Deletes the key if it holds the value; returns 1 if deleted.
DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


async def delete_if(redis: aioredis.Redis, key: str, value: str | bytes) -> bool:
    """Delete ``key`` if it still holds ``value``; True if it did."""
    return bool(await redis.register_script(DELETE_IF)(keys=[key], args=[value]))


@dataclasses.dataclass(frozen=True, slots=True)
class Lock:
    """``key`` held by ``owner`` for ``ttl_ms`` after each :meth:`hold`."""

    key: str
    owner: str
    ttl_ms: int

    async def hold(self, redis: aioredis.Redis) -> bool:
        """Take the lock, or renew it if this owner holds it; False while another does."""
        script = redis.register_script(TAKE_OR_RENEW)
        return bool(await script(keys=[self.key], args=[self.owner, self.ttl_ms]))

    async def release(self, redis: aioredis.Redis) -> bool:
        """Let go of the lock if this owner holds it, so another may take it at once; True
        if it did."""
        return await delete_if(redis, self.key, self.owner)
