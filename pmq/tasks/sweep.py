"""The sweep: keeps Redis memory bounded by letting stored messages leave it, and
applies retention to everything kept, in Redis and storage (docs/security.md, "Retention").

Every ``interval`` seconds one task worker of the whole cluster (the holder of a Redis lock)
looks at the users whose oldest hot message is older than ``hot_seconds``
(``keys.inbox_index(bucket)``, one index per user bucket, visited in turn). Of those
messages, the ones the store confirms it holds leave the user's hot inbox and
``keys.cold(uid)`` is set, so replay reads them from storage; the ones
the storage writer has not written yet stay hot until a later sweep. Then retention: rows
older than ``retention_seconds`` are deleted from storage (messages, broadcasts, chat
messages and closed chat sessions), hot entries that old are dropped from Redis whether
stored or not (storage no longer keeps them either), and so are broadcasts and the messages
of chat histories that old (pmq.domain.broadcast.BroadcastTrim,
pmq.domain.chattrim.ChatTrim: one script of one hash tag per batch). Chat sessions leave
Redis by their TTL, the retention after they close.

Removing messages, setting the cold flag and updating the index is one Lua call per user,
so a message is always either hot or flagged cold, and a message published meanwhile never
loses its index entry.
"""

from __future__ import annotations

import logging
import math
import time
from typing import cast

import redis.asyncio as aioredis

from pmq.domain.broadcast import BroadcastTrim
from pmq.domain.chattrim import ChatTrim
from pmq.redis import scripts
from pmq.redis.keys import Keys
from pmq.redis.locks import Lease
from pmq.store import Store
from pmq.tasks.clusterjob import ClusterJob
from pmq.tasks.writer import InThread
from pmq.wire.client import is_uid

log = logging.getLogger(__name__)

PAGE = 500  # users read from the index per call
USER_CHUNK = 1000  # messages of one user moved per Lua call (Lua's unpack() has a limit)
PASS_BUDGET = 1.0  # seconds one sweep spends on each Redis pass; the next one goes on
TRIM_BATCH = 500  # broadcasts, or chat sessions, trimmed per Lua call

Counts = dict[str, int]


class Sweeper(ClusterJob):
    """Sweeps inboxes every ``interval`` seconds while it holds the cluster's sweep lock
    (module docstring): the holder stays the sweeper, one sweep per interval in the cluster,
    until it stops renewing. ``owner`` names this worker slot in the lock; ``in_thread(func,
    *args)`` runs blocking store calls off the event loop. Counters ``sweeps`` and ``moved``
    are for stats."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        store: Store,
        in_thread: InThread,
        hot_seconds: int,
        retention_seconds: int,
        interval: float,
        owner: str,
    ) -> None:
        # Twice the interval: a holder that misses one sweep keeps the lock; a dead one
        # hands it over within two intervals.
        lock_ms = max(1, math.ceil(interval * 2)) * 1000
        super().__init__(
            redis, keys, store, in_thread, Lease(keys.sweep_lock(), owner, lock_ms), interval
        )
        self.hot_ms = hot_seconds * 1000
        self.retention_seconds = retention_seconds
        self._evict = scripts.register(redis, "sweep_evict")
        self.broadcast_trim = BroadcastTrim(redis, keys)
        self.chat_trim = ChatTrim(redis, keys)
        self.sweeps = self.moved = 0

    async def once(self) -> None:
        """One sweep (idempotent: one cut short is simply done again), logged if it did
        anything."""
        counts = await self.sweep_once()
        changed = ("moved", "expired", "broadcasts", "cs_messages", "deleted")
        if counts["ran"] and any(counts[k] for k in changed):
            log.info("inbox sweep: %s", counts)

    async def sweep_once(self, now_ms: int | None = None) -> Counts:
        """One sweep if this sweeper gets the lock. Returns counts: ``ran`` (0 when another
        worker holds the lock, and then nothing else), ``users`` looked at, messages
        ``moved`` to storage only, ``kept`` hot because storage does not hold them yet,
        hot entries ``expired`` past retention, ``broadcasts`` and chat messages
        (``cs_messages``) past retention taken out of Redis, and storage rows ``deleted``.
        ``now_ms`` (unix ms, default the clock) is for tests."""
        if not await self.hold_lock():
            return {"ran": 0}
        now = int(time.time() * 1000) if now_ms is None else now_ms
        counts: Counts = {"ran": 1, "users": 0, "moved": 0, "kept": 0, "expired": 0}
        await self._sweep_hot(now, counts)
        before = now - self.retention_seconds * 1000
        await self._trim_shared(before, counts)
        counts["deleted"] = await self.in_thread(self.store.delete_before, before)
        self.sweeps += 1
        self.moved += counts["moved"]
        return counts

    async def _trim_shared(self, before: int, counts: Counts) -> None:
        """Take broadcasts and chat messages older than ``before`` out of Redis, TRIM_BATCH
        per script call, within PASS_BUDGET seconds each; a later sweep goes on."""
        counts["broadcasts"] = counts["cs_messages"] = 0
        deadline = time.monotonic() + PASS_BUDGET
        while time.monotonic() < deadline:
            trimmed = await self.broadcast_trim.older_than(before, TRIM_BATCH)
            counts["broadcasts"] += trimmed
            if trimmed < TRIM_BATCH:
                break
        deadline = time.monotonic() + PASS_BUDGET
        while time.monotonic() < deadline:
            sessions, removed = await self.chat_trim.older_than(before, TRIM_BATCH)
            counts["cs_messages"] += removed
            if sessions < TRIM_BATCH:
                break

    async def _sweep_hot(self, now: int, counts: Counts) -> None:
        """Visit the users with hot messages past the hot or retention cutoff, oldest first
        in each bucket's index, every bucket in turn, within PASS_BUDGET seconds."""
        upper = now - min(self.hot_ms, self.retention_seconds * 1000)
        deadline = time.monotonic() + PASS_BUDGET
        # Start at a different bucket each sweep, so a short budget still reaches them all.
        first = self.sweeps % self.keys.buckets
        for step in range(self.keys.buckets):
            if time.monotonic() >= deadline:
                break
            bucket = (first + step) % self.keys.buckets
            counts["users"] += await self._sweep_bucket(bucket, upper, now, deadline, counts)

    async def _sweep_bucket(
        self, bucket: int, upper: int, now: int, deadline: float, counts: Counts
    ) -> int:
        """Sweep the users of one bucket's index; returns how many were looked at."""
        index = self.keys.inbox_index(bucket)
        visited: set[bytes] = set()
        offset = 0  # users of the range that stay in it: the next page starts after them
        while time.monotonic() < deadline:
            page = cast(
                list[bytes],
                await self.redis.zrangebyscore(index, "-inf", upper, start=offset, num=PAGE),
            )
            fresh = [uid for uid in page if uid not in visited]
            if not fresh:
                break
            for uid in fresh:
                visited.add(uid)
                oldest = await self._sweep_user(uid.decode(), now, deadline, counts)
                if 0 <= oldest <= upper:
                    offset += 1
                if time.monotonic() >= deadline:
                    break
        return len(visited)

    async def _sweep_user(self, uid: str, now: int, deadline: float, counts: Counts) -> int:
        """Move the user's old stored messages out of Redis and drop the expired ones,
        USER_CHUNK at a time. Returns the new oldest hot message's ms, or -1 if none."""
        hot_cutoff = now - self.hot_ms
        expire_before = now - self.retention_seconds * 1000
        upper = max(hot_cutoff, expire_before)
        keys = [
            self.keys.inbox(uid),
            self.keys.inbox_bodies(uid),
            self.keys.cold(uid),
            self.keys.inbox_index(self.keys.bucket(uid)),
        ]
        while True:
            entries = cast(
                list[tuple[bytes, float]],
                await self.redis.zrangebyscore(
                    keys[0], "-inf", upper, start=0, num=USER_CHUNK, withscores=True
                ),
            )
            expired = [m for m, score in entries if score < expire_before]
            young = [int(m) for m, score in entries if expire_before <= score <= hot_cutoff]
            confirmed: set[int] = set()
            if young and is_uid(uid):
                confirmed = await self.in_thread(self.store.existing, int(uid), young)
            remove: list[bytes | str] = [*expired, *map(str, confirmed)]
            args: list[bytes | str | int] = [
                uid,
                self.retention_seconds,
                str(time.time_ns()) if confirmed else "0",
                *remove,
            ]
            oldest = int(await self._evict(keys=keys, args=args))
            counts["moved"] += len(confirmed)
            counts["expired"] += len(expired)
            if len(entries) < USER_CHUNK or not remove or time.monotonic() >= deadline:
                counts["kept"] += len(young) - len(confirmed)
                return oldest
