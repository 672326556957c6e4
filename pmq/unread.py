"""Unread counters (SPEC 4): per kind in a Redis hash, and ``system`` counted from broadcasts.

``system`` is never stored per user: it is the number of broadcasts to the user's groups
since their last clear of ``system`` (a last-read time, kept in Redis and in SQL like the
seed's REPLACE INTO table), within retention.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis

from pmq.broadcast import groups_of
from pmq.keys import Keys
from pmq.protocol import UNREAD_KINDS, Kind

# KEYS: unread hash, last-read hash, then the group zsets; ARGV: retention floor (ms).
# Returns the hash's field/value pairs followed by 'system' and the broadcast count.
COUNT = """
local counts = redis.call('HGETALL', KEYS[1])
local last = tonumber(redis.call('HGET', KEYS[2], 'system') or '0')
local since = math.max(tonumber(ARGV[1]), last + 1)
local system = 0
for i = 3, #KEYS do
    system = system + redis.call('ZCOUNT', KEYS[i], since, '+inf')
end
counts[#counts + 1] = 'system'
counts[#counts + 1] = system
return counts
"""


class Unread:
    def __init__(self, redis: aioredis.Redis, keys: Keys, retention_seconds: int) -> None:
        self.redis = redis
        self.keys = keys
        self.retention_ms = retention_seconds * 1000
        self._count = redis.register_script(COUNT)

    def _call(self, uid: str, groups: Sequence[str], client: Any = None) -> Any:
        keys = [self.keys.unread(uid), self.keys.last_read(uid)]
        keys += [self.keys.broadcasts(g) for g in groups_of(groups)]
        floor = int(time.time() * 1000) - self.retention_ms
        return self._count(keys=keys, args=[floor], client=client)

    async def counts(self, uid: str, groups: Sequence[str]) -> dict[str, int]:
        """Every kind's count (0 when unset), ``system`` included, and ``total``."""
        return _counts(await self._call(uid, groups))

    async def counts_many(self, users: Sequence[tuple[str, Sequence[str]]]) -> list[dict[str, int]]:
        """counts() for many users in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for uid, groups in users:
            # Awaiting a script on a pipeline only queues it (AsyncScript is a coroutine).
            await self._call(uid, groups, client=pipe)
        return [_counts(flat) for flat in await pipe.execute()]

    async def clear(self, uid: str, kinds: Sequence[str] | None) -> list[str]:
        """Set the named counters (all when None) to 0; returns the kinds cleared.

        Clearing ``system`` records the time (in Redis, and queued for SQL).
        """
        key = self.keys.unread(uid)
        if kinds is None:
            present = [k.decode() for k in await self.redis.hkeys(key)]  # type: ignore[union-attr]
            kinds = sorted(set(UNREAD_KINDS) | set(present))
        pipe = self.redis.pipeline(transaction=True)
        if kinds:
            pipe.hdel(key, *kinds)
        if Kind.SYSTEM in kinds:
            now = int(time.time() * 1000)
            pipe.hset(self.keys.last_read(uid), Kind.SYSTEM, now)
            pipe.expire(self.keys.last_read(uid), self.retention_ms // 1000)
            op = {"op": "last_read", "uid": uid, "kind": Kind.SYSTEM.value, "ts": now}
            pipe.rpush(self.keys.store_queue(), orjson.dumps(op))
        await pipe.execute()
        return list(kinds)


def _counts(flat: list[Any]) -> dict[str, int]:
    counts = dict.fromkeys(UNREAD_KINDS, 0)
    for i in range(0, len(flat), 2):
        name = flat[i].decode() if isinstance(flat[i], bytes) else str(flat[i])
        counts[name] = max(0, int(flat[i + 1]))
    counts["total"] = sum(counts.values())
    return counts
