"""Redis marks: whether a bucket's Redis data is known complete, and whether it went back.

Redis can lose data while PMQ runs: restarted without persistence, restored from an old
snapshot, failed over to an empty or lagging replica. Storage then holds unacked messages
that Redis no longer knows as hot nor flags cold, and the inbox, which reads storage only
for users flagged cold, would no longer replay them. Each user bucket therefore has a mark
in Redis, ``keys.redis_mark(bucket)``, in the bucket's slot so that it is lost with the data
it vouches for:

* ``epoch``: set by a recovery (pmq.tasks.recovery) once every user of the bucket with
  unacked stored messages is flagged cold. Without it the bucket is not known complete and
  the inbox reads storage for every user of the bucket. An emptied Redis has no epoch, so
  this holds from the first request after the loss. Epochs only grow: a new one is one above
  the highest stored.
* ``gen``: moved up by :meth:`RedisMarks.advance` each time a storage writer takes a batch of
  the bucket's messages; once the batch is written the writer records the mark in storage
  (the highest per bucket). Redis restored from an old snapshot or a lagging replica holds a
  mark below the stored one: the next advance, or the recovery's periodic check, sees it and
  removes the epoch.
* ``recovering``: the token of the recovery under way; the recovery sets the epoch only if
  its token is still there, so a Redis emptied again meanwhile is recovered again.
* ``journal:<token>``: set by a socket worker's journal (pmq.domain.journal) that handled
  the bucket's loss, until it sees the recovery's epoch: gone before then, Redis lost the
  bucket's data again.

Marks compare as pairs ``(epoch, gen)``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis

from pmq.redis import scripts
from pmq.redis.keys import Keys
from pmq.store.rows import Mark

EPOCH = "epoch"  # the mark's field whose presence says the bucket is complete


class RedisMarks:
    """The Redis side of the marks (module docstring)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._advance = scripts.register(redis, "epochs_advance")
        self._begin = scripts.register(redis, "epochs_begin")
        self._establish = scripts.register(redis, "epochs_establish")

    def complete_on(self, pipe: Any, uid: str) -> None:
        """Queue on ``pipe`` the read of whether the user's bucket is complete (a boolean
        reply): a caller reads it with its other replies, in the same round trip."""
        pipe.hexists(self.keys.redis_mark(self.keys.bucket(uid)), EPOCH)

    async def advance(self, known: Mapping[int, Mark]) -> dict[int, Mark | None]:
        """Move up the generation of each bucket of ``known`` (the highest stored mark the
        caller knows, (0, 0) for none); returns each bucket's mark now, None when the bucket
        is not complete (no epoch: emptied, recovering, or found behind ``known`` now)."""
        replies = await asyncio.gather(  # one script per bucket: each in its own slot
            *(
                self._advance(keys=[self.keys.redis_mark(bucket)], args=[epoch, gen])
                for bucket, (epoch, gen) in known.items()
            )
        )
        return {
            bucket: (int(reply[1]), int(reply[0])) if int(reply[1]) else None
            for bucket, reply in zip(known, replies, strict=True)
        }

    async def read(self, buckets: Iterable[int]) -> dict[int, Mark | None]:
        """Each bucket's mark, None where it has no epoch."""
        wanted = list(buckets)
        pipe = self.redis.pipeline(transaction=False)
        for bucket in wanted:
            pipe.hmget(self.keys.redis_mark(bucket), EPOCH, "gen")
        found: dict[int, Mark | None] = {}
        for bucket, (epoch, gen) in zip(wanted, await pipe.execute(), strict=True):
            found[bucket] = (int(epoch), int(gen or 0)) if epoch else None
        return found

    async def begin(self, bucket: int, token: str) -> None:
        """Mark the bucket incomplete (storage is read for all its users from now on) and
        recovering under ``token``."""
        await self._begin(keys=[self.keys.redis_mark(bucket)], args=[token])

    async def establish(self, bucket: int, token: str, epoch: int) -> bool:
        """Set the bucket's new ``epoch`` if the recovery ``token`` is still under way there;
        False when Redis lost it meanwhile (the bucket must be recovered again)."""
        done = await self._establish(keys=[self.keys.redis_mark(bucket)], args=[token, epoch])
        return bool(done)

    async def witness(self, field: str, add: Iterable[int], remove: Iterable[int]) -> None:
        """Set ``field`` in the marks of the buckets ``add``, remove it from those of
        ``remove``: a field gone with its mark tells of a loss that left no other trace."""
        pipe = self.redis.pipeline(transaction=False)
        for bucket in add:
            pipe.hset(self.keys.redis_mark(bucket), field, 1)
        for bucket in remove:
            pipe.hdel(self.keys.redis_mark(bucket), field)
        await pipe.execute()

    async def witnessed(self, field: str, buckets: Iterable[int]) -> dict[int, bool]:
        """Whether the mark of each of ``buckets`` still has ``field``."""
        wanted = list(buckets)
        pipe = self.redis.pipeline(transaction=False)
        for bucket in wanted:
            pipe.hexists(self.keys.redis_mark(bucket), field)
        return dict(zip(wanted, map(bool, await pipe.execute()), strict=True))

    async def flag_cold(self, uids: Sequence[str], ttl: int) -> None:
        """Flag ``uids`` cold (storage holds unacked messages of theirs), for ``ttl`` s."""
        if not uids:
            return
        mark = str(time.time_ns())  # new, so no reader that saw an older flag deletes it
        pipe = self.redis.pipeline(transaction=False)
        for uid in uids:
            pipe.set(self.keys.cold(uid), mark, ex=ttl)
        await pipe.execute()
