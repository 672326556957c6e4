"""Unread counters (SPEC 4): per kind in a Redis hash, and ``system`` counted from broadcasts.

``system`` is never stored per user: it is the number of broadcasts to the user's groups
since their last clear of ``system`` (a last-read time, kept in Redis and in SQL like the
seed's REPLACE INTO table), within retention.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis

from pmq.broadcast import groups_of
from pmq.keys import Keys
from pmq.protocol import UNREAD_KINDS, Kind

# KEYS: per user, the unread hash then the last-read hash. Returns per user a list: the
# unread hash's field/value pairs, then the time of the user's last clear of system (or 0).
COUNTERS = """
local result = {}
for i = 1, #KEYS, 2 do
    local counts = redis.call('HGETALL', KEYS[i])
    counts[#counts + 1] = redis.call('HGET', KEYS[i + 1], 'system') or '0'
    result[#result + 1] = counts
end
return result
"""


class Unread:
    def __init__(self, redis: aioredis.Redis, keys: Keys, retention_seconds: int) -> None:
        self.redis = redis
        self.keys = keys
        self.retention_ms = retention_seconds * 1000
        self._counters = redis.register_script(COUNTERS)

    async def counts(self, uid: str, groups: Sequence[str]) -> dict[str, int]:
        """Every kind's count (0 when unset), ``system`` included, and ``total``."""
        return (await self.counts_many([(uid, groups)]))[0]

    async def counts_many(
        self, users: Sequence[tuple[str, Sequence[str]]], chunk: int = 500
    ) -> list[dict[str, int]]:
        """counts() for many users in one round trip: one script call per ``chunk`` users
        for their counters, and each group's broadcast times read once for all of them
        (``system`` is then counted here, so a broadcast to thousands costs no per-user
        Redis work)."""
        floor = int(time.time() * 1000) - self.retention_ms
        reached = [groups_of(theirs) for _, theirs in users]
        groups = sorted({g for each in reached for g in each})
        pipe = self.redis.pipeline(transaction=False)
        for group in groups:
            pipe.zrangebyscore(self.keys.broadcasts(group), floor, "+inf", withscores=True)
        for start in range(0, len(users), chunk):
            keys = []
            for uid, _ in users[start : start + chunk]:
                keys += [self.keys.unread(uid), self.keys.last_read(uid)]
            # Awaiting a script on a pipeline only queues it (AsyncScript is a coroutine).
            await self._counters(keys=keys, client=pipe)
        replies = await pipe.execute()
        timelines, scripts = replies[: len(groups)], replies[len(groups) :]
        times = {g: sorted(s for _, s in r) for g, r in zip(groups, timelines, strict=True)}
        counters = [flat for reply in scripts for flat in reply]
        result = []
        for each, flat in zip(reached, counters, strict=True):
            since = max(floor, int(flat[-1]) + 1)
            system = sum(len(times[g]) - bisect.bisect_left(times[g], since) for g in each)
            result.append(_counts(flat[:-1], system))
        return result

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


def _counts(flat: list[Any], system: int) -> dict[str, int]:
    counts = dict.fromkeys(UNREAD_KINDS, 0)
    for i in range(0, len(flat), 2):
        name = flat[i].decode() if isinstance(flat[i], bytes) else str(flat[i])
        counts[name] = max(0, int(flat[i + 1]))
    counts[Kind.SYSTEM.value] = system
    counts["total"] = sum(counts.values())
    return counts
