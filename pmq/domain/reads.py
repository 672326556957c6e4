"""Read state: which items of their notification centre a user opened
(docs/notification-centre.md).

Beside the delivery ack and the badge counters (pmq.domain.unread: "not yet seen"), every
unicast message and every broadcast has, per user, a read state. It is kept compact in
Redis, in the user's bucket:

- ``reads(uid)``: marks, kind -> the id up to which every item of that kind is read, and
  ``*`` -> the same for every kind (``msg.read`` by kinds, or of everything, moves them);
- ``read_ids(uid)``: the items read one by one above the marks (``msg.read`` by ids),
  scored by their time and trimmed to the retention.

An item is read when its id is among the ids, or at or below the mark of its kind or ``*``.
Every change is one script (centre_read) that counts the items it turns read, moves the
state and queues a ``read`` storage operation with what changed, so the count is exact
however many devices read at once, and the state is in SQL (``pmq_read``,
``pmq_read_mark``) a moment later. A read of many items (``msg.read {}`` of a long unread
feed) is READ_CHUNK items a script, oldest first, each raising the marks no higher than its
newest item: everything unread at or below that is in the chunks done, so the marks make
read nothing that was not counted, and the count stays exact; Redis is held one chunk at a
time, not for the whole feed (25,000 items were one 105 ms script).

The Redis state is loaded from storage when it is missing (never read, expired, or Redis
lost it) and, while the user's bucket is not known complete in Redis (pmq.domain.epochs:
Redis was emptied and recovery runs), merged from storage again before each use: marks only
rise and ids are only added, so a merge never makes read what was not, nor unread what was.
A read whose storage operation went with an emptied Redis, and which the socket worker's
journal queued again, is merged back into Redis by the journal as well (:meth:`Reads.restore`):
a load from storage between the loss and the writer's write of it would miss it, and once
the bucket is known complete again, that load would be kept as the whole state.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pmq.domain.epochs import RedisMarks
from pmq.domain.ids import first_id_at, timestamp_ms
from pmq.domain.journal import Entry, StoreJournal
from pmq.redis import scripts
from pmq.redis.keys import Keys
from pmq.store.rows import ReadRows
from pmq.wire import storeops

ALL = "*"  # the mark of every kind
LOADED = "loaded"  # the reads hash's field saying it holds storage's state
READ_OP = b'{"op":"' + storeops.OpName.READ.encode() + b'"'  # how a read op starts
READ_CHUNK = 1000  # items per centre_read script: about 4 ms of Redis

# (uid, since unix ms) -> the user's read state in storage (pmq.store.feed.FeedSql.read_state)
StoredReadState = Callable[[str, int], Awaitable[ReadRows]]


@dataclasses.dataclass(frozen=True, slots=True)
class ReadView:
    """A user's read marks as one read saw them (kind -> id, ``*`` for every kind)."""

    marks: dict[str, int]

    def mark(self, kind: str | None) -> int:
        """The id up to which every item of ``kind`` (any kind: None) is read."""
        every = self.marks.get(ALL, 0)
        return every if kind is None else max(every, self.marks.get(kind, 0))

    def covers(self, item: dict[str, Any]) -> bool:
        """Whether the marks alone make ``item`` (a message as clients see it) read."""
        return int(item["id"]) <= self.mark(item["kind"])


class Reads:
    """Read state of users (module docstring); ``stored`` reads storage's, off the loop."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        retention_seconds: int,
        stored: StoredReadState,
        journal: StoreJournal | None = None,
    ) -> None:
        self.redis = redis
        self.journal = journal  # a socket worker's, so an emptied Redis loses no read
        self.keys = keys
        self.retention_seconds = retention_seconds
        self.stored = stored
        self.marks = RedisMarks(redis, keys)
        self._read = scripts.register(redis, "centre_read")
        self._load = scripts.register(redis, "centre_load")
        if journal is not None:
            journal.restore_with(self.restore)

    def floor_ms(self) -> int:
        return int(time.time() * 1000) - self.retention_seconds * 1000

    async def view(self, uid: str) -> ReadView:
        """The user's marks, loaded from storage first when Redis does not hold them whole."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.reads(uid))
        self.marks.complete_on(pipe, uid)
        found, complete = await pipe.execute()
        if LOADED.encode() not in found or not complete:
            await self.load(uid, bool(complete))
            found = await self.redis.hgetall(self.keys.reads(uid))
        return ReadView({k.decode(): int(v) for k, v in found.items() if k != LOADED.encode()})

    async def load(self, uid: str, complete: bool) -> None:
        """Merge storage's read state of ``uid`` into Redis (marked loaded if ``complete``)."""
        rows = await self.stored(uid, self.floor_ms())
        await self._merge(uid, rows.marks, rows.ids, complete)

    async def restore(self, entries: Sequence[Entry]) -> None:
        """Merge into Redis the ``read`` operations among ``entries``, kept by the journal and
        queued again after Redis lost data (module docstring)."""
        for entry in entries:
            op = storeops.parse(entry.op) if entry.op.startswith(READ_OP) else None
            if isinstance(op, storeops.ReadOp):
                await self._merge(str(op.uid), op.marks, op.ids, False)

    async def _merge(
        self, uid: str, marks: dict[str, int], ids: Sequence[tuple[int, int]], complete: bool
    ) -> None:
        """Raise the user's marks in Redis and add the (id, ms) ``ids`` (centre_load)."""
        args: list[Any] = [self.retention_seconds, "1" if complete else "0", len(marks)]
        for kind, mark in marks.items():
            args += [kind, mark]
        for item_id, ms in ids:
            args += [item_id, ms]
        await self._load(keys=[self.keys.reads(uid), self.keys.read_ids(uid)], args=args)

    async def read_among(
        self, uid: str, view: ReadView, items: Sequence[dict[str, Any]]
    ) -> set[int]:
        """The ids of ``items`` (messages as clients see them) that ``uid`` has read."""
        read = {int(m["id"]) for m in items if view.covers(m)}
        others = [m["id"] for m in items if int(m["id"]) not in read]
        if others:
            scores = await self.redis.zmscore(self.keys.read_ids(uid), others)
            read |= {int(i) for i, score in zip(others, scores, strict=True) if score is not None}
        return read

    async def mark_read(
        self,
        uid: str,
        items: Sequence[dict[str, Any]],
        marks: dict[str, int],
        hook: Callable[[], tuple[list[str], list[Any]]] = lambda: ([], []),
    ) -> list[str]:
        """Mark ``items`` (the user's, as clients see them) read and raise ``marks``; returns
        the ids of those that were unread. ``hook()`` (Events.queued_by), asked once per
        script: the key and arguments that make it queue message.read with its ids."""
        ordered = sorted(items, key=lambda m: int(m["id"]))
        changed: list[str] = []
        for start in range(0, max(len(ordered), 1), READ_CHUNK):
            chunk = ordered[start : start + READ_CHUNK]
            if start + READ_CHUNK < len(ordered):  # the marks wait for the items below them
                newest = int(chunk[-1]["id"])
                raised = {kind: min(mark, newest) for kind, mark in marks.items()}
            else:
                raised = marks
            changed += await self._mark_chunk(uid, chunk, raised, hook())
        return changed

    async def _mark_chunk(
        self,
        uid: str,
        items: Sequence[dict[str, Any]],
        marks: dict[str, int],
        hook: tuple[list[str], list[Any]],
    ) -> list[str]:
        """One centre_read script: ``items`` read and ``marks`` raised."""
        ids = [(int(m["id"]), timestamp_ms(int(m["id"]))) for m in items]
        op = storeops.encode_read(uid, ids, marks)
        keys = [
            self.keys.reads(uid),
            self.keys.read_ids(uid),
            self.keys.store_queue(self.keys.user_tag(uid)),
        ]
        args = [self.retention_seconds, self.floor_ms(), op, *(m["kind"] for m in items)]
        for _ in range(3):  # loaded again if it expired meanwhile
            changed = await self._read(keys=keys + hook[0], args=args + hook[1])
            if changed != -1:
                if self.journal is not None and (changed or marks):
                    # what was asked: storage takes it again without a change (idempotent)
                    self.journal.note(self.keys.bucket(uid), keys[2], uid, op)
                return [i.decode() for i in changed]
            await self.view(uid)
        # Redis lost it again each time (it is being emptied or restarted): as unavailable
        # as when it does not answer, so the caller answers 503, retry.
        raise RedisError(f"read state of uid {uid} would not load")


def newest_id() -> int:
    """An id above every item made until now: a mark that covers them all."""
    return first_id_at(int(time.time() * 1000) + 1) - 1
