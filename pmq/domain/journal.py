"""A socket worker's journal of the storage operations it queued lately, for an emptied Redis.

A message is answered 202 once it is in Redis, with its storage operation on a storage queue;
the storage writer moves it into SQL a moment later (about a second, more under load). Were
Redis emptied meanwhile (restarted without its files, failed over to an empty replica,
FLUSHALL), the queue would go with everything else and the message be lost, whatever
``redis.durability`` said: the AOF that vouched for it went too.

So the worker that queued an operation also keeps it, in memory, for KEEP_SECONDS. Once a
second it reads the Redis marks of its buckets (pmq.domain.epochs): a bucket whose epoch it saw
vanish or change has lost data, and so has one whose first epoch seen is a recovery's
(above 1). The worker then queues again every operation it kept for that bucket, together
with the cold flag of each user concerned, so the inbox reads storage for them once the
writer has written the operations back. Until it sees the recovery's new epoch, it keeps a
field of its own in the mark of that bucket: the field gone, Redis lost the bucket's data
again (emptied twice before the recovery was done), and the operations are queued again
once more, those queued since the first loss with them. What an operation also keeps in
Redis for its users meanwhile is put back by whoever registered for it
(:meth:`StoreJournal.restore_with`: a read, pmq.domain.reads), so that nothing loaded from
storage before the writer has written the operation again can hide it. Writes are
idempotent by id (a row that is already stored is left as it is, acked or not), so
queueing again what had reached storage, or what the emptied Redis never lost, writes
nothing twice. The shared queues (broadcasts, chat) have no mark of their own: their
operations are queued again when any bucket lost data.

What it does not cover: operations older than KEEP_SECONDS when Redis is emptied (storage
behind by more than that: an outage, or a writer that cannot keep up), and those of a worker
that died too. Acks are not kept: one lost with Redis leaves its message unacked in storage,
replayed again, which at-least-once delivery allows.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

import redis.asyncio as aioredis

from pmq.domain.epochs import RedisMarks
from pmq.redis.keys import Keys
from pmq.store.rows import Mark

log = logging.getLogger(__name__)

KEEP_SECONDS = 30.0  # far above the storage lag of a writer that keeps up (about 1 to 3 s)
MAX_ENTRIES = 200_000  # bound on memory when storage falls behind: the oldest go first
WATCH_SECONDS = 1.0
SHARED = -1  # the bucket of operations on the shared queues (broadcasts, chat)
REQUEUE_CHUNK = 1000  # operations per pipeline when queueing again


class Entry(NamedTuple):
    at: float  # time.monotonic() when queued
    bucket: int  # the user's bucket, or SHARED
    queue: str  # the storage queue it went to
    uid: str | None  # the user to flag cold, None for shared queues
    op: bytes


# Puts back in Redis what kept operations, queued again, also held there for their users.
Restore = Callable[[Sequence[Entry]], Awaitable[object]]


class StoreJournal:
    """Kept storage operations and the watch that queues them again (module docstring).
    ``cold_ttl`` is the cold flag's TTL (the retention). ``lost(whole_at)`` is called once
    they are queued again, with the time (unix seconds) Redis was last seen whole: messages
    accepted since then may have lost their live push with it (pmq.reactor.catchup)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        cold_ttl: int,
        keep_seconds: float = KEEP_SECONDS,
        max_entries: int = MAX_ENTRIES,
        lost: Callable[[float], None] | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.cold_ttl = cold_ttl
        self.keep_seconds = keep_seconds
        self.marks = RedisMarks(redis, keys)
        self.entries: collections.deque[Entry] = collections.deque(maxlen=max_entries)
        self.epochs: dict[int, int] = {}  # bucket -> the epoch seen last, or NONE_YET, HANDLED
        self.requeued = 0  # operations queued again, for stats and tests
        self.lost = lost
        self.whole_at = time.time()  # when a look last found no bucket lost
        self.restorers: list[Restore] = []
        self.field = f"journal:{secrets.token_hex(8)}"  # in the marks of HANDLED buckets

    def note(self, bucket: int, queue: str, uid: str | None, op: bytes) -> None:
        """Keep ``op``, just queued on ``queue`` (``bucket`` SHARED for a shared queue)."""
        self.entries.append(Entry(time.monotonic(), bucket, queue, uid, op))

    def restore_with(self, restore: Restore) -> None:
        """Have ``restore`` called with the operations of every bucket that lost data, once
        they are queued again."""
        self.restorers.append(restore)

    def trim(self) -> None:
        horizon = time.monotonic() - self.keep_seconds
        while self.entries and self.entries[0].at < horizon:
            self.entries.popleft()

    async def watch(self) -> None:
        """Forever: drop what is older than keep_seconds, look at the marks, queue again
        what a bucket that lost data had."""
        while True:
            self.trim()
            await self.check()
            await asyncio.sleep(WATCH_SECONDS)

    async def check(self) -> int:
        """One look at the marks; returns the operations queued again."""
        looked_at = time.time()
        marks = await self.marks.read(range(self.keys.buckets))
        handled = [b for b, seen in self.epochs.items() if seen == HANDLED]
        kept = await self.marks.witnessed(self.field, handled) if handled else {}
        lost = {
            b for b, mark in marks.items() if _lost(self.epochs.get(b), mark, kept.get(b, False))
        }
        epochs = {b: _seen(self.epochs.get(b), mark, b in lost) for b, mark in marks.items()}
        add = [b for b in lost if epochs[b] == HANDLED]
        remove = [b for b in handled if epochs.get(b) != HANDLED]
        if add or remove:  # before queueing again: a loss from now on takes the field too
            await self.marks.witness(self.field, add, remove)
        if not lost:
            self.epochs = epochs
            self.whole_at = looked_at
            return 0
        requeued = await self.requeue(lost)
        self.epochs = epochs  # only now: a look that failed sees the same loss again
        if self.lost is not None:
            self.lost(self.whole_at)
        return requeued

    async def requeue(self, buckets: set[int]) -> int:
        """Queue again the kept operations of ``buckets`` and the shared queues, flagging
        their users cold first (the flag must be there when the rows are written)."""
        kept = [e for e in self.entries if e.bucket in buckets or e.bucket == SHARED]
        if not kept:
            return 0
        uids = sorted({e.uid for e in kept if e.uid is not None})
        await self.marks.flag_cold(uids, self.cold_ttl)
        for start in range(0, len(kept), REQUEUE_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for entry in kept[start : start + REQUEUE_CHUNK]:
                pipe.rpush(entry.queue, entry.op)
            await pipe.execute()
        for restore in self.restorers:
            await restore(kept)
        self.requeued += len(kept)
        log.warning(
            "redis buckets %s lost data: queued again the %d storage operations of the last "
            "%g s (%d users flagged cold)",
            sorted(buckets), len(kept), self.keep_seconds, len(uids),
        )
        return len(kept)


# What a bucket's entry in StoreJournal.epochs says besides an epoch (epochs start at 1).
NONE_YET = 0  # looked, and the bucket has had no epoch since: the worker started before any
HANDLED = -1  # its epoch went, and the loss was handled: the recovery's new one is that loss


def _lost(seen: int | None, now: Mark | None, kept: bool) -> bool:
    """Whether the bucket lost its Redis data since the last look (``seen``: its entry in
    StoreJournal.epochs, None before the first look; ``kept``: whether the journal's field
    is still in a HANDLED bucket's mark)."""
    if seen is None:
        return False
    if seen == HANDLED:
        return not kept  # emptied again, recovered since or not
    epoch = now[0] if now is not None else None
    if seen == NONE_YET:
        # A first epoch above 1 is a recovery's: the bucket lost its data before the worker
        # first saw an epoch (Redis emptied within a second of the first one, say). Epoch 1
        # is a new deployment's first.
        return epoch is not None and epoch > 1
    return epoch != seen


def _seen(seen: int | None, now: Mark | None, lost: bool) -> int:
    """The bucket's next entry in StoreJournal.epochs."""
    if now is not None:
        return now[0]
    return HANDLED if lost or seen == HANDLED else NONE_YET
