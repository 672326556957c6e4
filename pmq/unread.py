"""Unread counters (SPEC 4): per kind in a Redis hash, and ``system`` counted from broadcasts.

``system`` is never stored per user: it is the number of broadcasts to the user's groups
since their last clear of ``system`` (a last-read time, kept in Redis and in SQL like the
seed's REPLACE INTO table), within retention.

On a single Redis a count is one Lua call. On a Redis Cluster the user's keys ({bN}) and
the broadcast indexes ({bc}) live in different slots, so it is two pipelined round trips:
the user's counters and last clear, then the broadcasts since.
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
from pmq.redisconn import is_cluster

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


# KEYS: unread hash, last-read hash, storage queue (one bucket). ARGV: '1' when system is
# cleared, now ms, last-read ttl, storage op, then the kinds to clear.
CLEAR = """
if #ARGV > 4 then redis.call('HDEL', KEYS[1], unpack(ARGV, 5)) end
if ARGV[1] == '1' then
    redis.call('HSET', KEYS[2], 'system', ARGV[2])
    redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
    redis.call('RPUSH', KEYS[3], ARGV[4])
end
return 1
"""


class Unread:
    def __init__(self, redis: aioredis.Redis, keys: Keys, retention_seconds: int) -> None:
        self.redis = redis
        self.keys = keys
        self.retention_ms = retention_seconds * 1000
        self._count = redis.register_script(COUNT)
        self._clear = redis.register_script(CLEAR)
        self.split = is_cluster(redis)

    def _call(self, uid: str, groups: Sequence[str], client: Any = None) -> Any:
        keys = [self.keys.unread(uid), self.keys.last_read(uid)]
        keys += [self.keys.broadcasts(g) for g in groups_of(groups)]
        floor = int(time.time() * 1000) - self.retention_ms
        return self._count(keys=keys, args=[floor], client=client)

    async def counts(self, uid: str, groups: Sequence[str]) -> dict[str, int]:
        """Every kind's count (0 when unset), ``system`` included, and ``total``."""
        if self.split:
            return (await self._counts_split([(uid, groups)]))[0]
        return _counts(await self._call(uid, groups))

    async def counts_many(self, users: Sequence[tuple[str, Sequence[str]]]) -> list[dict[str, int]]:
        """counts() for many users in one round trip (two on a cluster)."""
        if self.split:
            return await self._counts_split(users)
        pipe = self.redis.pipeline(transaction=False)
        for uid, groups in users:
            # Awaiting a script on a pipeline only queues it (AsyncScript is a coroutine).
            await self._call(uid, groups, client=pipe)
        return [_counts(flat) for flat in await pipe.execute()]

    async def _counts_split(
        self, users: Sequence[tuple[str, Sequence[str]]]
    ) -> list[dict[str, int]]:
        """COUNT without a script across slots: the users' hashes, then the broadcasts."""
        pipe = self.redis.pipeline(transaction=False)
        for uid, _ in users:
            pipe.hgetall(self.keys.unread(uid))
            pipe.hget(self.keys.last_read(uid), Kind.SYSTEM)
        found = await pipe.execute()
        floor = int(time.time() * 1000) - self.retention_ms
        pipe = self.redis.pipeline(transaction=False)
        per_user = []
        for n, (_, groups) in enumerate(users):
            since = max(floor, int(found[2 * n + 1] or 0) + 1)
            names = groups_of(groups)
            per_user.append(len(names))
            for group in names:
                pipe.zcount(self.keys.broadcasts(group), since, "+inf")
        zcounts = iter(await pipe.execute())
        result = []
        for n, width in enumerate(per_user):
            flat: list[Any] = [v for pair in found[2 * n].items() for v in pair]
            flat += [b"system", sum(next(zcounts) for _ in range(width))]
            result.append(_counts(flat))
        return result

    async def clear(self, uid: str, kinds: Sequence[str] | None) -> list[str]:
        """Set the named counters (all when None) to 0; returns the kinds cleared.

        Clearing ``system`` records the time (in Redis, and queued for SQL).
        """
        key = self.keys.unread(uid)
        if kinds is None:
            present = [k.decode() for k in await self.redis.hkeys(key)]  # type: ignore[union-attr]
            kinds = sorted(set(UNREAD_KINDS) | set(present))
        now = int(time.time() * 1000)
        system = Kind.SYSTEM in kinds
        op = {"op": "last_read", "uid": uid, "kind": Kind.SYSTEM.value, "ts": now}
        keys = [key, self.keys.last_read(uid), self.keys.store_queue(self.keys.user_tag(uid))]
        args = ["1" if system else "0", now, self.retention_ms // 1000, orjson.dumps(op)]
        await self._clear(keys=keys, args=[*args, *kinds])
        return list(kinds)


def _counts(flat: list[Any]) -> dict[str, int]:
    counts = dict.fromkeys(UNREAD_KINDS, 0)
    for i in range(0, len(flat), 2):
        name = flat[i].decode() if isinstance(flat[i], bytes) else str(flat[i])
        counts[name] = max(0, int(flat[i + 1]))
    counts["total"] = sum(counts.values())
    return counts
