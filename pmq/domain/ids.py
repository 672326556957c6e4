"""Message ids: 63-bit, time-ordered, unique across nodes and workers.

Layout (most significant first): 41 bits of milliseconds since EPOCH_MS (about 69 years),
12 bits of generator number, 10 bits of sequence within the millisecond. Each worker leases
its generator number in Redis at start (pmq.domain.routing keeps the lease alive), so ids need no
coordination afterwards: one generator makes up to 1,024 ids per millisecond.

Ids travel as decimal strings (JSON numbers lose precision past 2**53).
"""

from __future__ import annotations

import random
import time

import redis.asyncio as aioredis

from pmq.redis.keys import Keys
from pmq.redis.locks import Lease

EPOCH_MS = 1704067200000  # 2024-01-01T00:00:00Z
GENERATOR_BITS = 12
SEQUENCE_BITS = 10
MAX_GENERATOR = (1 << GENERATOR_BITS) - 1
MAX_SEQUENCE = (1 << SEQUENCE_BITS) - 1
TIME_SHIFT = GENERATOR_BITS + SEQUENCE_BITS


class IdGenerator:
    """Makes increasing ids for one generator number; not thread-safe (one per loop).

    A worker makes one and hands that object to everything that makes ids, so that
    :meth:`renumber` (after its lease was lost) reaches every one of them."""

    def __init__(self, generator: int) -> None:
        self.last_ms = 0
        self.sequence = 0
        self.generator = 0
        self.renumber(generator)

    def renumber(self, generator: int) -> None:
        """Make the next ids with ``generator`` (a newly leased number). Ids keep increasing
        across the change: the clock and sequence carry on."""
        if not 0 <= generator <= MAX_GENERATOR:
            raise ValueError(f"generator must be 0..{MAX_GENERATOR}")
        self.generator = generator

    def next(self) -> int:
        now = max(int(time.time() * 1000) - EPOCH_MS, self.last_ms)  # never step back
        if now == self.last_ms:
            self.sequence = (self.sequence + 1) & MAX_SEQUENCE
            if self.sequence == 0:  # 1,024 ids this millisecond: borrow the next one
                now += 1
        else:
            self.sequence = 0
        self.last_ms = now
        return (now << TIME_SHIFT) | (self.generator << SEQUENCE_BITS) | self.sequence


def timestamp_ms(message_id: int) -> int:
    """Unix milliseconds at which ``message_id`` was made."""
    return (message_id >> TIME_SHIFT) + EPOCH_MS


def first_id_at(unix_ms: int) -> int:
    """The smallest id made at or after ``unix_ms`` (for time-window queries)."""
    return max(0, unix_ms - EPOCH_MS) << TIME_SHIFT


class GeneratorLease:
    """Holds one generator number for ``owner`` while it renews within ``ttl`` seconds.

    Each number is a :class:`pmq.redis.locks.Lease` taken once and then renewed: a renewal never
    takes a lapsed number again (another worker may have it now), the holder must acquire
    anew."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, owner: str, ttl: int) -> None:
        self.redis = redis
        self.keys = keys
        self.owner = owner
        self.ttl = ttl
        self.number = -1

    def _lease(self, number: int) -> Lease:
        return Lease(self.keys.id_lease(number), self.owner, self.ttl * 1000)

    async def acquire(self) -> int:
        start = random.randrange(MAX_GENERATOR + 1)
        for step in range(MAX_GENERATOR + 1):
            number = (start + step) & MAX_GENERATOR
            if await self._lease(number).take(self.redis):
                self.number = number
                return number
        raise RuntimeError("every message-id generator number is leased")

    async def renew(self) -> bool:
        """Extend the lease; False when it was lost (the caller must acquire a new one)."""
        return await self._lease(self.number).renew(self.redis)

    async def release(self) -> None:
        await self._lease(self.number).release(self.redis)
