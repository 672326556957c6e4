"""The storage writer: moves the queued storage operations into the SQL store.

It is a reliable-queue consumer (the Redis LMOVE pattern), over several queues: one per user
bucket and the chat's (``keys.store_tags()``; each queue shares a Redis Cluster slot with
the keys of the scripts that fill it). A batch is first moved atomically from each
``keys.store_queue(tag)`` into this writer's own list ``keys.store_taken(owner, tag)`` beside
it, written, and only then are the taken lists deleted. When every queue was empty the
writer waits for the first one (a BLMOVE of its tail onto itself, which moves nothing) for
TAKE_TIMEOUT, or only IDLE_WAIT when there are others to look at again. After a batch that
emptied the queues it lingers a moment (LINGER) so that the next one gathers many rows.

The taken lists are covered by the writer's owner lease (pmq.tasks.owners): a writer killed
mid-batch leaves its batch in its taken lists, and once its lease expires a live writer of any
node takes them over and puts them back on their queues. A writer stopped gracefully hands what
it could not write back to the queue. Store writes are idempotent by id, so writing an item
twice never duplicates a row.

While the store fails (an outage: it cannot be reached, a lock times out), the writer retries
the same batch with back-off and the queue simply grows; nothing is dropped. When the store
refuses the data itself (StorageDataError), retrying cannot help: the batch is split in halves,
and halves again, until what can be written is written and each refused item is alone; those
go to the queue's dead-letter list (pmq.tasks.deadletter) with the store's reason, as do items
that are not storage operations at all, and the queue moves on.

Within a batch, messages are written before acks. Several writers drain one queue, though,
so an ack can reach the store before another writer's batch holding its message commits;
such acks are retried a few times (ACK_RETRY_DELAYS) before giving up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pmq import metrics
from pmq.cancel import raise_if_cancelled
from pmq.errors import StorageDataError, StorageError
from pmq.redis import scripts
from pmq.redis.keys import Keys
from pmq.store import Store
from pmq.tasks import deadletter
from pmq.tasks.owners import OwnerLease
from pmq.tasks.queueops import Batch, parse_batch
from pmq.wire import storeops

if TYPE_CHECKING:  # recovery imports this module
    from pmq.tasks.recovery import BatchGuard

log = logging.getLogger(__name__)

TAKE_TIMEOUT = 1  # seconds BLMOVE waits for the first item of a batch (one queue)
IDLE_WAIT = 0.2  # the same with several queues: then the others are looked at again
# After a batch smaller than ``batch`` (the queues ran dry), the writer waits this long before
# taking the next, so a steady stream is written in batches of many rows instead of a
# transaction per handful (2,400 msg/s came in batches of 6 and cost the task worker 0.15 ms
# of CPU per message). With 128 shards a commit writes every table's and index's last pages
# to the WAL, so rows are cheaper the more of them share it: in SQLite 26 us of CPU each in
# batches of 100, 15 us in batches of 500, 7 us in batches of 2,000. The messages are durable
# in Redis meanwhile; only storage lags, by at most this much plus one batch's write.
LINGER = 0.25
BATCH = 2000  # items per batch at most (a full batch is written at once, without linger)
RETRY_FIRST = 0.2  # back-off after a failed write, doubling up to RETRY_MAX
RETRY_MAX = 5.0
ACK_RETRY_DELAYS = (1.0, 5.0, 30.0)  # seconds before each retry of an ack that found no row
MAX_DEFERRED_ACKS = 10_000  # ack items held for retry; beyond this they are dropped

InThread = Callable[..., Awaitable[Any]]


@dataclasses.dataclass(slots=True)
class _DeferredAck:
    uid: int
    ids: list[int]
    attempt: int  # index into ACK_RETRY_DELAYS of the next retry
    due: float  # time.monotonic() of the next retry


class StorageWriter:
    """Drains the storage queue into ``store``, ``batch`` items at a time (module docstring).

    ``owners`` is the task worker's owner lease: its owner names the taken lists, and its
    :meth:`~pmq.tasks.owners.OwnerLease.run` must run beside :meth:`run` to keep them this
    worker's and to take over the lists of workers that died. ``in_thread(func, *args)``
    runs blocking store calls off the event loop. ``guard`` moves the Redis marks of each
    batch's buckets up and records them once the batch is written (pmq.tasks.recovery).
    Counters ``written`` (rows newly inserted), ``acked`` (rows newly marked acked),
    ``batches``, ``errors`` (failed store attempts), ``malformed``, ``dead`` (items moved to
    the dead-letter list, malformed ones included) and ``dropped_acks`` (acks past
    MAX_DEFERRED_ACKS) are for stats.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        store: Store,
        owners: OwnerLease,
        in_thread: InThread,
        batch: int = BATCH,
        linger: float = LINGER,
        guard: BatchGuard | None = None,
    ) -> None:
        self.redis = redis
        self.store = store
        self.in_thread = in_thread
        self.batch = batch
        self.linger = linger
        self.keys = keys
        self.owners = owners
        self.owner = owner = owners.owner
        self.guard = guard  # keeps the Redis marks (pmq.tasks.recovery); None in some tests
        # (tag, queue, taken) per queue; the first is the one an idle writer waits on.
        self.queues = [
            (t, keys.store_queue(t), keys.store_taken(owner, t)) for t in keys.store_tags()
        ]
        self._top_up = scripts.register(redis, "writer_top_up")
        self._finish = scripts.register(redis, "writer_finish")
        self.written = self.acked = self.batches = self.errors = self.malformed = self.dead = 0
        self.dropped_acks = 0
        self._deferred: list[_DeferredAck] = []
        self._leftover = True  # look at the queues (and taken lists) at once, without waiting
        self._busy = False  # a batch is being written; drain lets it finish
        self._stopping = False
        self._outage = 0  # failed attempts in the current storage outage
        self._task: asyncio.Task[None] | None = None

    def stats(self) -> dict[str, int]:
        return {
            "written": self.written,
            "acked": self.acked,
            "errors": self.errors,
            "dead": self.dead,
            "reclaimed": self.owners.reclaimed,
        }

    @property
    def deferred(self) -> int:
        """Ack items waiting for a retry because their message was not stored yet."""
        return len(self._deferred)

    async def run(self) -> None:
        """Write batches until cancelled or drained. Errors other than the store's (Redis
        down, a bug) end the run; the task worker supervises it (starting it again after a
        pause, or exiting), and the next run takes up what is still in the taken list."""
        self._task = asyncio.current_task()
        while not self._stopping:
            raise_if_cancelled()
            try:
                await self._retry_deferred()
                await self._cycle()
            except BaseException:
                self._leftover = True  # whatever was taken is still in the taken list
                self._busy = False
                raise

    async def drain(self, timeout: float) -> int:
        """Stop the run, then write what is queued, batch after batch without lingering,
        until a pass finds the queues empty or ``timeout`` seconds are up (a batch still
        being written then is cancelled). What is still taken then goes back to the head of
        the queue, in order, for any writer (writes are idempotent, so even a batch whose
        write was cut off mid-way is safe to hand over), the owner leaves the registries (with
        the owner lease's other taken lists: stop whoever else takes into them first), and
        deferred acks go to the queue's tail. Returns the number of items left in this
        writer's taken list (0 unless Redis failed)."""
        deadline = asyncio.get_running_loop().time() + timeout
        self._stopping = True
        task = self._task
        if task is not None and not task.done():
            if not self._busy:
                task.cancel()  # waiting on the queue: nothing to finish
            await asyncio.wait({task}, timeout=timeout)
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        self.linger, self._leftover = 0.0, True
        while self._leftover and (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                await asyncio.wait_for(self._cycle(), left)
            except TimeoutError:
                break
            except (StorageError, RedisError, OSError) as exc:
                log.warning("storage writer: the last writes before the stop failed: %s", exc)
                break
        returned = await self.owners.release()
        if returned:
            log.warning("storage writer: put %d unwritten items back on the queue", returned)
        for d in self._deferred:
            op = storeops.encode_ack(str(d.uid), d.ids)
            await self.redis.rpush(self.keys.store_queue(self.keys.user_tag(str(d.uid))), op)
        self._deferred.clear()
        left = 0
        for _, _, taken in self.queues:
            left += int(await self.redis.llen(taken))
        return left

    async def _cycle(self) -> None:
        """Take one batch from every queue (after waiting for a first item when the last
        pass found none), write it, and end it: dead letters out, taken lists deleted."""
        if not self._leftover:
            _, queue, _ = self.queues[0]
            wait = TAKE_TIMEOUT if len(self.queues) == 1 else IDLE_WAIT
            # Waits without taking: only writer_top_up moves items, registering their owner.
            first = await self.redis.blmove(queue, queue, wait, "RIGHT", "RIGHT")  # type: ignore[arg-type]
            if first is None and len(self.queues) == 1:
                return
        self._busy = True
        args = [self.batch, *self.owners.script_args()]
        parts: list[list[bytes]] = await asyncio.gather(
            *(
                self._top_up(keys=[q, t, self.keys.store_owners(tag)], args=args)
                for tag, q, t in self.queues
            )
        )
        items = [item for part in parts for item in part]
        self._leftover = bool(items)  # found work: look again at once
        if not items:
            self._busy = False
            return
        metrics.STORAGE_BATCH.observe(len(items))
        refused = await self._write(items)
        start = 0
        for (tag, _, taken), part in zip(self.queues, parts, strict=True):
            if part:
                dead = [
                    deadletter.entry(part[i - start], reason)
                    for i, reason in sorted(refused.items())
                    if start <= i < start + len(part)
                ]
                await self._finish(keys=[taken, self.keys.store_dead(tag)], args=dead)
            start += len(part)
        self.batches += 1
        self._busy = False
        if len(items) < self.batch:  # the queues ran dry: let the next batch gather
            await asyncio.sleep(self.linger)

    async def _write(self, items: Sequence[bytes]) -> dict[int, str]:
        """Write every item the store takes; returns why each of the others (by position)
        cannot be written: malformed, or refused by the store when written alone."""
        batch = parse_batch(items)
        refused = dict(batch.malformed)
        self.malformed += len(batch.malformed)
        positions = [i for i in range(len(items)) if i not in refused]
        seen = await self.guard.taken(batch.rows) if self.guard else {}
        await self._bisect(items, positions, batch, refused)
        await self._stored(batch)
        if self.guard:
            await self.guard.written(seen, batch.rows)
        for i, reason in refused.items():
            log.error("storage writer: dead-lettered (%s): %r", reason, items[i][:200])
        self.dead += len(refused)
        return refused

    async def _stored(self, batch: Batch) -> None:
        """Forget the owners (pmq.redis.keys.Keys.owners) of the messages now stored: a
        retraction finds those in storage."""
        by_bucket: dict[int, list[int]] = {}
        for row in batch.rows:
            by_bucket.setdefault(self.keys.bucket(str(row.uid)), []).append(row.id)
        for bucket, ids in by_bucket.items():
            await self.redis.hdel(self.keys.owners(bucket), *map(str, ids))

    async def _bisect(
        self, items: Sequence[bytes], positions: list[int], batch: Batch, refused: dict[int, str]
    ) -> None:
        """Write ``batch`` (the items at ``positions``); when the store refuses its data,
        write each half of it in turn the same way, down to single items, which are then
        added to ``refused``. An outage is retried inside, never split."""
        try:
            await self._store(batch)
        except StorageDataError as exc:
            if len(positions) == 1:
                refused[positions[0]] = str(exc)
                return
            middle = len(positions) // 2
            for half in (positions[:middle], positions[middle:]):
                await self._bisect(items, half, parse_batch([items[i] for i in half]), refused)

    async def _store(self, batch: Batch) -> None:
        """Write ``batch`` (rows, acks in queue order, last-read times, chat, broadcasts, the
        notification centre's reads, retractions and edits), retrying
        with back-off until the store takes it. A step that succeeded is not repeated.
        Raises StorageDataError when the store refuses the data (retrying cannot help)."""
        rows, acks, last_reads = batch.rows, list(reversed(batch.acks)), batch.last_reads
        chat, broadcasts = (batch.cs_messages, batch.cs_sessions), batch.broadcasts
        centre = (batch.reads, batch.revoked, batch.edited, batch.revoked_broadcasts)
        delay = RETRY_FIRST
        while True:
            try:
                if rows:
                    self.written += await self.in_thread(self.store.write_messages, rows)
                    rows = []
                while acks:
                    await self._ack(*acks[-1])
                    acks.pop()
                if last_reads:
                    await self.in_thread(self.store.set_last_reads, last_reads)
                    last_reads = []
                if chat[0] or chat[1]:
                    self.written += await self.in_thread(self.store.write_cs, *chat)
                    chat = ([], [])
                if broadcasts:
                    self.written += await self.in_thread(self.store.write_broadcasts, broadcasts)
                    broadcasts = []
                if any(centre):
                    await self.in_thread(self.store.write_centre, *centre)
                    centre = ([], [], [], [])
                break
            except StorageDataError:
                self._store_answered()
                raise  # the data, not the store: the caller splits the batch
            except StorageError as exc:
                self.errors += 1
                metrics.STORAGE_ERRORS.inc()
                self._outage += 1
                if self._outage == 1:  # once per outage: a line per retry would be noise
                    log.warning("storage writer: store failed, holding the queue: %s", exc)
                raise_if_cancelled()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
        self._store_answered()

    def _store_answered(self) -> None:
        """The store took a call or refused its data: any outage is over."""
        if self._outage:
            log.warning("storage writer: store is back after %d failed attempts", self._outage)
            self._outage = 0

    async def _ack(self, uid: int, ids: list[int], attempt: int = 0) -> None:
        """Mark ``ids`` acked; those with no row yet are deferred (module docstring)."""
        count = await self.in_thread(self.store.ack, uid, ids)
        self.acked += count
        if count >= len(set(ids)):
            await self._stored_acked(uid, ids)
            return
        # Short: some were acked already (fine) or are not stored yet (their message may be
        # in another writer's batch, or was never a stored message, e.g. a broadcast).
        missing = sorted(set(ids) - await self.in_thread(self.store.existing, uid, ids))
        await self._stored_acked(uid, sorted(set(ids) - set(missing)))
        if not missing or attempt >= len(ACK_RETRY_DELAYS):
            return
        if len(self._deferred) >= MAX_DEFERRED_ACKS:
            self.dropped_acks += 1
            if self.dropped_acks == 1:  # the first says it; stats count the rest
                log.warning("storage writer: %d acks deferred, dropping more", MAX_DEFERRED_ACKS)
            return
        due = time.monotonic() + ACK_RETRY_DELAYS[attempt]
        self._deferred.append(_DeferredAck(uid, missing, attempt + 1, due))

    async def _stored_acked(self, uid: int, ids: list[int]) -> None:
        """Storage holds ``ids`` of ``uid`` acked: the copies inbox_ack kept of those acked
        before they were stored (pmq.redis.keys.Keys.acked_unstored), and its note of those
        whose ack waited in the queue (Keys.acks_queued), are no longer needed."""
        if ids:
            members = [str(i) for i in ids]
            pipe = self.redis.pipeline(transaction=False)
            pipe.hdel(self.keys.acked_unstored(str(uid)), *members)
            pipe.srem(self.keys.acks_queued(str(uid)), *members)
            await pipe.execute()

    async def _retry_deferred(self) -> None:
        """Retry the deferred acks that are due. Each leaves the list only once retried (a
        retry still short defers a new entry), so neither a failing store nor a drain
        cancelling this loses one."""
        now = time.monotonic()
        for item in [d for d in self._deferred if d.due <= now]:
            try:
                await self._ack(item.uid, item.ids, item.attempt)
            except StorageError:
                item.due = now + ACK_RETRY_DELAYS[0]
                continue
            self._deferred.remove(item)
