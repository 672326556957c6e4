"""Unread counters: per kind in a Redis hash, and ``system`` counted from broadcasts.

``system`` is never stored per user: it is the number of broadcasts to the user's groups
since their last clear of ``system`` (a last-read time, kept in Redis and in SQL like the
seed's REPLACE INTO table), within retention.

Counting many users (a badge flush after a broadcast) costs one script call per 500 users
of one bucket for their counters, and each group's broadcast times read once; ``system`` is
then counted here. Every call names keys of one slot, as a Redis Cluster requires (the
users' keys are in their bucket, {bN}, the broadcasts in {bc}).
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Sequence
from typing import Any, cast

import redis.asyncio as aioredis

from pmq.domain.broadcast import groups_of
from pmq.redis import scripts
from pmq.redis.keys import Keys
from pmq.wire import storeops
from pmq.wire.client import UNREAD_KINDS, Kind
from pmq.wire.relay import UnreadState

# The counts frame's key of the broadcasts' count, as text: Kind.SYSTEM.value is an enum
# property, a Python call on every badge.
SYSTEM = Kind.SYSTEM.value


class Unread:
    def __init__(self, redis: aioredis.Redis, keys: Keys, retention_seconds: int) -> None:
        self.redis = redis
        self.keys = keys
        self.retention_ms = retention_seconds * 1000
        self._counters = scripts.register(redis, "unread_counters")
        self._clear = scripts.register(redis, "unread_clear")

    async def counts(self, uid: str, groups: Sequence[str]) -> dict[str, int]:
        """Every kind's count (0 when unset), ``system`` included, and ``total``."""
        return (await self.counts_many([(uid, groups)]))[0]

    async def counts_many(
        self, users: Sequence[tuple[str, Sequence[str]]], chunk: int = 500
    ) -> list[dict[str, int]]:
        """counts() for many users: one script call per ``chunk`` users of a bucket, and
        each group's broadcast times read once for all of them, all at once."""
        reached = [groups_of(theirs) for _, theirs in users]
        groups = sorted({g for each in reached for g in each})
        parts: list[list[int]] = []  # indexes into users, one bucket and chunk each
        for indexes in self.keys.by_bucket([uid for uid, _ in users]).values():
            parts += [indexes[i : i + chunk] for i in range(0, len(indexes), chunk)]
        # Separate calls, not one pipeline: a cluster pipeline cannot carry a script.
        times, *scripts = await asyncio.gather(
            self.timelines(groups),
            *(self._counters(keys=self._counter_keys(users, part)) for part in parts),
        )
        result: list[dict[str, int]] = [{}] * len(users)
        for part, reply in zip(parts, scripts, strict=True):
            for i, flat in zip(part, reply, strict=True):
                state = UnreadState.of_reply(flat)
                system = self.system_count(state.last_clear, reached[i], times)
                result[i] = counts_of(state.counts, system)
        return result

    async def timelines(self, groups: Sequence[str]) -> dict[str, list[float]]:
        """The times of each group's broadcasts within retention, in order."""
        floor = int(time.time() * 1000) - self.retention_ms
        replies = await asyncio.gather(
            *(
                self.redis.zrangebyscore(self.keys.broadcasts(g), floor, "+inf", withscores=True)
                for g in groups
            )
        )
        return {
            g: sorted(float(s) for _, s in cast(list[tuple[bytes, float]], r))
            for g, r in zip(groups, replies, strict=True)
        }

    def system_count(
        self, last_read: int, groups: Sequence[str], times: dict[str, list[float]]
    ) -> int:
        """Broadcasts to ``groups`` (groups_of a user's) since ``last_read`` (ms), within
        retention, counted in ``times`` (from timelines())."""
        since = max(int(time.time() * 1000) - self.retention_ms, last_read + 1)
        return sum(len(times[g]) - bisect.bisect_left(times[g], since) for g in groups)

    def _counter_keys(
        self, users: Sequence[tuple[str, Sequence[str]]], part: list[int]
    ) -> list[str]:
        keys = []
        for i in part:
            keys += [self.keys.unread(users[i][0]), self.keys.last_read(users[i][0])]
        return keys

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
        op = storeops.encode_last_read(uid, Kind.SYSTEM.value, now)
        keys = [key, self.keys.last_read(uid), self.keys.store_queue(self.keys.user_tag(uid))]
        args = ["1" if system else "0", now, self.retention_ms // 1000, op]
        await self._clear(keys=keys, args=[*args, *kinds])
        return list(kinds)


def counts_of(flat: Sequence[Any], system: int) -> dict[str, int]:
    """The counts frame's data from an unread hash's field/value pairs and ``system``."""
    counts = dict.fromkeys(UNREAD_KINDS, 0)
    for i in range(0, len(flat), 2):
        name = flat[i].decode() if isinstance(flat[i], bytes) else str(flat[i])
        counts[name] = max(0, int(flat[i + 1]))
    counts[SYSTEM] = system
    counts["total"] = sum(counts.values())
    return counts
