"""Recovery from a Redis data loss, in the task workers, without a restart.

The marks (pmq.domain.epochs) say when a bucket's Redis data is not known complete; meanwhile the
inbox reads storage for every user of the bucket, so no stored unacked message is missing
from replay or ``msg.pull``. Two parts here keep the marks honest and make buckets complete
again:

* :class:`BatchGuard`, in the storage writer: after taking a batch it moves the generation
  of the batch's buckets up (finding Redis behind the stored mark it knows, it removes the
  epoch at once); after writing the batch it records those marks in storage. A batch taken
  across a loss (the epoch gone or changed between the take and the end of the write) may
  hold messages Redis forgot while the recovery's scan ran before they were stored: its
  users are flagged cold.
* :class:`Recovery`, in every task worker: every CHECK_SECONDS it compares each bucket's
  Redis mark with the stored one. A bucket without an epoch (Redis emptied, or a recovery cut
  short) or behind storage (an old snapshot, a lagging replica) is recovered by one task
  worker of the cluster (a Redis lock): the epoch goes, the users with unacked messages in
  every shard are flagged cold, and a new epoch, one above the highest stored, is recorded in
  storage and then set in Redis.

Unread counters are not recomputed: after a loss they are what Redis kept (zero after an
empty restart, the snapshot's after a restore).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import redis.asyncio as aioredis

from pmq.domain.epochs import RedisMarks
from pmq.redis.keys import Keys
from pmq.redis.locks import Lease
from pmq.store import Store, StoredMessage
from pmq.store.rows import Mark
from pmq.tasks.clusterjob import ClusterJob
from pmq.tasks.writer import InThread

log = logging.getLogger(__name__)

CHECK_SECONDS = 1.0  # how often each task worker compares the Redis marks with storage's
LOCK_SECONDS = 30  # the recovery lock's TTL, renewed at every page of the scan
PAGE = 1000  # users read from one shard per query during a recovery
NO_MARK: Mark = (0, 0)


class BatchGuard:
    """The storage writer's part (module docstring). ``cold_ttl``: the cold flag's TTL (the
    retention), ``in_thread(func, *args)`` runs blocking store calls off the loop."""

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, store: Store, in_thread: InThread, cold_ttl: int
    ) -> None:
        self.marks = RedisMarks(redis, keys)
        self.keys = keys
        self.store = store
        self.in_thread = in_thread
        self.cold_ttl = cold_ttl
        self.known: dict[int, Mark] = {}  # the highest stored marks seen, per bucket

    async def taken(self, rows: Iterable[StoredMessage]) -> dict[int, Mark | None]:
        """Call once the batch holding ``rows`` is taken, before writing it: the marks of
        its buckets, moved up (None where the bucket is not complete)."""
        buckets = {self.keys.bucket(str(row.uid)) for row in rows}
        return await self.marks.advance({b: self.known.get(b, NO_MARK) for b in buckets})

    async def written(self, seen: dict[int, Mark | None], rows: Iterable[StoredMessage]) -> None:
        """Call once the batch is written, with what taken() returned."""
        if not seen:
            return
        # Storage's marks first: they need no Redis, and a Redis restored from an older
        # snapshot is seen as behind only if they were raised (a Redis error below must not
        # skip them: the batch's taken list may be gone with that Redis, never to be redone).
        vouched = {b: mark for b, mark in seen.items() if mark is not None}
        if vouched:
            self.known = await self.in_thread(self.store.raise_redis_marks, vouched)
        now = await self.marks.read(seen)
        doubtful = {b for b, mark in seen.items() if not _same_epoch(mark, now[b])}
        if doubtful:
            uids = sorted({str(r.uid) for r in rows if self.keys.bucket(str(r.uid)) in doubtful})
            await self.marks.flag_cold(uids, self.cold_ttl)


def _same_epoch(before: Mark | None, after: Mark | None) -> bool:
    return before is not None and after is not None and before[0] == after[0]


class Recovery(ClusterJob):
    """The check and the recovery (module docstring); ``owner`` names this worker slot in
    the lock. Counters ``recoveries`` (buckets made complete) and ``flagged`` (users flagged
    cold by a recovery) are for stats and tests."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        store: Store,
        in_thread: InThread,
        owner: str,
        cold_ttl: int,
        interval: float = CHECK_SECONDS,
    ) -> None:
        lock = Lease(keys.recovery_lock(), owner, LOCK_SECONDS * 1000)
        super().__init__(redis, keys, store, in_thread, lock, interval)
        self.cold_ttl = cold_ttl
        self.marks = RedisMarks(redis, keys)
        self.recoveries = self.flagged = 0

    async def once(self) -> None:
        """One check (a recovery cut short is simply done again by a later one)."""
        await self.check_once()

    async def check_once(self) -> list[int]:
        """Recover the buckets found incomplete or behind storage, if this worker gets the
        lock; returns the buckets made complete."""
        if not (await self._look())[0] or not await self.hold_lock():
            return []
        try:
            # Again under the lock: another worker may have recovered these buckets since
            # the first look. Its recovery seen half done (storage's epoch raised, Redis's
            # not yet set) would be recovered again, to an epoch one above.
            lost, stored, in_redis = await self._look()
            for b in lost:
                self._say_why(b, in_redis[b], stored.get(b))
            return await self.recover(lost, stored) if lost else []
        finally:
            await self.release()

    async def _look(self) -> tuple[list[int], dict[int, Mark], dict[int, Mark | None]]:
        """The buckets without an epoch or behind storage, and the marks they were found
        by: storage's and Redis's."""
        # Storage first: a writer records a mark in storage only after moving it up in
        # Redis, so what storage holds is at or below what Redis holds from then on. Read
        # the other way round, a batch recorded in between would look like Redis went back.
        stored = await self.in_thread(self.store.redis_marks)
        in_redis = await self.marks.read(range(self.keys.buckets))
        lost = [
            b for b, mark in in_redis.items() if mark is None or mark < stored.get(b, NO_MARK)
        ]
        return lost, stored, in_redis

    def _say_why(self, bucket: int, in_redis: Mark | None, stored: Mark | None) -> None:
        if stored is None:
            log.info("redis bucket %d has no mark yet: looking for its cold users", bucket)
        elif in_redis is None:
            log.warning("redis bucket %d lost its data (no epoch): recovering", bucket)
        else:
            log.warning(
                "redis bucket %d went back in time (mark %s, storage has %s): recovering",
                bucket, in_redis, stored,
            )

    async def recover(self, buckets: list[int], stored: dict[int, Mark]) -> list[int]:
        """Make ``buckets`` complete again (module docstring); returns those made so."""
        token = f"{self.owner}:{time.time_ns()}"
        for bucket in buckets:
            await self.marks.begin(bucket, token)
        wanted = set(buckets)
        flagged = 0
        for shard in range(self.store.shards):
            after = 0
            while True:
                uids = await self.in_thread(self.store.unacked_users, shard, after, PAGE)
                cold = [str(u) for u in uids if self.keys.bucket(str(u)) in wanted]
                await self.marks.flag_cold(cold, self.cold_ttl)
                flagged += len(cold)
                if not await self.hold_lock():  # expired on a slow page, or Redis emptied
                    log.warning("redis recovery lost its lock: a later check starts over")
                    return []
                if len(uids) < PAGE:
                    break
                after = uids[-1]
        epoch = max((e for e, _ in stored.values()), default=0) + 1
        await self.in_thread(self.store.raise_redis_marks, {b: (epoch, 0) for b in buckets})
        done = [b for b in buckets if await self.marks.establish(b, token, epoch)]
        self.recoveries += len(done)
        self.flagged += flagged
        log.warning(
            "redis buckets %s complete again (epoch %d) after flagging %d users cold",
            done, epoch, flagged,
        )
        return done
