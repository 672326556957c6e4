"""Owner leases of the storage writer's taken lists, and taking over the lists of the dead.

Every storage writer has an owner id of its own, new with each process (pmq.tasks.main), and
names its taken lists by it (``keys.store_taken(owner, tag)``). Beside each storage queue,
``keys.store_owners(tag)`` is a ZSET owner -> lease expiry in unix ms on Redis's own clock
(TIME, inside the scripts, so the nodes' clocks never matter). A writer is registered there
by the same script that moves items into its taken list (the writer's TOP_UP), so a taken
list never holds an item while its owner is missing from the registry; while the writer lives
it renews its lease every third of the lease (:meth:`OwnerLease.renew`).

Any live writer, on any node and whatever its index, looks for owners whose lease has expired
(:meth:`OwnerLease.reclaim`) and takes over their lists: one script in the queue's slot checks
that the lease is still expired, moves the taken list back to the head of the queue in order
and removes the owner, so exactly one reclaimer wins and an owner that renewed meanwhile keeps
its list. A writer stopped gracefully gives its lists back and leaves the registry
(:meth:`OwnerLease.release`).

A registry per queue, rather than SCAN for taken lists: SCAN walks the whole key space (every
master of a Redis Cluster) on each pass, while the registry is read with one ZRANGEBYSCORE per
queue, in the queue's slot, and its lease and the list it covers change in one script.

An owner whose lease lapsed while it was still alive (Redis unreachable longer than the
lease) may be taken over in the middle of a batch: its items are then written twice, which
the store's writes by id make harmless, and its next take registers it again.
"""

from __future__ import annotations

import logging
from typing import cast

import redis.asyncio as aioredis

from pmq.keys import Keys

log = logging.getLogger(__name__)

EXPIRED_PAGE = 100  # owners taken over per queue per pass at most (the next pass goes on)

# The current time of Redis in unix ms: every lease is on this one clock.
NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: owners; ARGV: owner, lease ms. Returns 1 when the owner was not registered (first
# renewal, or its lease had lapsed and it was taken over), 0 when it renewed a live lease.
RENEW = NOW + """
return redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
"""

# KEYS: owners; ARGV: limit. The owners whose lease has expired.
EXPIRED = NOW + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, tonumber(ARGV[1]))
"""

# KEYS: owners, taken, queue; ARGV: owner. If the owner's lease is still expired, moves its
# taken list back to the head of the queue in order and unregisters it; returns how many
# items moved, or -1 when the owner is alive again or another reclaimer was first.
RECLAIM = NOW + """
local lease = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not lease or tonumber(lease) >= now then return -1 end
local items = redis.call('LRANGE', KEYS[2], 0, -1)
for i = #items, 1, -1 do
    redis.call('LPUSH', KEYS[3], items[i])
end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
return #items
"""

# KEYS: owners, taken, queue; ARGV: owner. The same, unconditionally: a writer stopping gives
# back its own list and leaves the registry.
RELEASE = """
local items = redis.call('LRANGE', KEYS[2], 0, -1)
for i = #items, 1, -1 do
    redis.call('LPUSH', KEYS[3], items[i])
end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
return #items
"""


class OwnerLease:
    """The lease of one writer ``owner`` on its taken lists of every storage queue, and
    its view of everyone else's (module docstring). ``lease`` is in seconds."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, owner: str, lease: float) -> None:
        self.redis = redis
        self.keys = keys
        self.owner = owner
        self.lease_ms = int(lease * 1000)
        self.tags = keys.store_tags()
        self._renew = redis.register_script(RENEW)
        self._expired = redis.register_script(EXPIRED)
        self._reclaim = redis.register_script(RECLAIM)
        self._release = redis.register_script(RELEASE)
        self.reclaimed = 0  # items taken over from expired owners, for stats

    def script_args(self) -> list[str | int]:
        """What TOP_UP needs to register this owner: its id and the lease in ms."""
        return [self.owner, self.lease_ms]

    async def renew(self) -> bool:
        """Extend this owner's lease on every queue; False when a registration had lapsed
        (a list of it may have been taken over; writing its batch again is harmless)."""
        lapsed = False
        for tag in self.tags:
            keys = [self.keys.store_owners(tag)]
            lapsed |= bool(await self._renew(keys=keys, args=[self.owner, self.lease_ms]))
        return not lapsed

    async def reclaim(self) -> int:
        """Take over the taken lists of every owner whose lease has expired, putting their
        items back at the head of their queue; returns how many items moved."""
        moved = 0
        for tag in self.tags:
            owners_key, queue = self.keys.store_owners(tag), self.keys.store_queue(tag)
            expired = cast(
                list[bytes], await self._expired(keys=[owners_key], args=[EXPIRED_PAGE])
            )
            for raw in expired:
                dead = raw.decode()
                if dead == self.owner:  # our own lapsed lease: renew() registers it again
                    continue
                taken = self.keys.store_taken(dead, tag)
                count = int(await self._reclaim(keys=[owners_key, taken, queue], args=[dead]))
                if count > 0:
                    log.warning(
                        "storage writer %s: took over %d items of %s, whose lease expired",
                        self.owner,
                        count,
                        dead,
                    )
                    moved += count
        self.reclaimed += moved
        return moved

    async def release(self) -> int:
        """Give this owner's taken lists back to the head of their queues, in order, and
        leave the registry; returns how many items went back."""
        returned = 0
        for tag in self.tags:
            keys = [
                self.keys.store_owners(tag),
                self.keys.store_taken(self.owner, tag),
                self.keys.store_queue(tag),
            ]
            returned += int(await self._release(keys=keys, args=[self.owner]))
        return returned
