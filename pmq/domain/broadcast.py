"""Broadcasts: one message to every user of a group, never copied per user (docs/protocol.md).

A broadcast is kept once in Redis (``broadcasts(group)`` ids by time, ``broadcast_bodies``),
queued for a task worker, which publishes it once on the broadcast channel (every socket
worker writes it to its own connections of the group), and queued apart for the storage
writer, which stores it in SQL: a storage outage never holds the fan-out back. Users who were
offline get it on their next connect: each user has a watermark (the newest broadcast id
they acked), and connect replays the newest ``broadcast.replay_max`` above it.

Retention (``inbox.retention_seconds``): every publish sets the TTL of the bodies, the index
and the group's ids to the retention, so they go whole once no broadcast is younger; the
sweep (pmq.tasks.sweep) removes the older broadcasts from them meanwhile with
:class:`BroadcastTrim`, and from storage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, cast

import orjson
import redis.asyncio as aioredis

from pmq.domain.ids import IdGenerator, timestamp_ms
from pmq.domain.journal import SHARED, StoreJournal
from pmq.redis import scripts
from pmq.redis.batching import Batcher
from pmq.redis.durability import Confirm, run_script
from pmq.redis.keys import BROADCAST_TAG, Keys, key_template
from pmq.wire import relay, storeops
from pmq.wire.client import Message

ALL = "all"


@dataclasses.dataclass(frozen=True, slots=True)
class Published:
    id: str
    duplicate: bool


def id_key(explicit: str) -> str:
    """The dedupe key of a broadcast the site sent with an ``id`` of its own."""
    return "id:" + explicit


def content_key(group: str, kind: str, body: Any) -> str:
    """A dedupe key made of what is sent (same group, kind and body = same): for the old
    site's system messages, which carry no id and were sent again on a retry."""
    canonical = orjson.dumps([group, kind, body], option=orjson.OPT_SORT_KEYS)
    return "body:" + hashlib.sha256(canonical).hexdigest()


def groups_of(groups: Iterable[str]) -> list[str]:
    """The groups whose broadcasts reach a user: theirs and "all"."""
    return [ALL, *sorted(set(groups) - {ALL})]


class Broadcasts:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        ids: IdGenerator,
        dedupe_seconds: int,
        replay_max: int,
        retention_seconds: int,
        confirm: Confirm | None = None,
        journal: StoreJournal | None = None,
        batch: Batcher | None = None,
    ) -> None:
        self.redis = redis
        self.batch = batch or Batcher(redis)  # acks: on the lean connection
        self.keys = keys
        self.ids = ids
        self.confirm = confirm  # redis.durability = "aof": publish waits for WAITAOF
        self.journal = journal  # a socket worker's, so an emptied Redis loses no 202
        self.dedupe_seconds = dedupe_seconds
        self.replay_max = replay_max
        self.retention_seconds = retention_seconds
        self.retention_ms = retention_seconds * 1000
        self._publish = scripts.register(redis, "broadcast_publish")
        self._raise_mark = scripts.register(redis, "broadcast_raise_mark")

    async def publish(self, group: str, kind: str, body: Any, key: str | None) -> Published:
        """Keep and queue one broadcast; a repeat of its dedupe ``key`` (:func:`id_key`,
        :func:`content_key`) within the window is a duplicate. Without a key, never."""
        message_id = self.ids.next()
        now = int(time.time() * 1000)
        wire = Message(message_id, kind, None, None, body, now, group).encode()
        item = relay.encode_broadcast_item(group, wire)
        storage_op = storeops.encode_broadcast(group, wire)
        keys = [
            self.keys.broadcast_dedupe(key or ""),  # "": unused, for the script's first key
            self.keys.broadcasts(group),
            self.keys.broadcast_index(),
            self.keys.broadcast_bodies(),
            self.keys.broadcast_queue(),
            self.keys.store_queue(BROADCAST_TAG),
        ]
        args = [self.dedupe_seconds if key else 0, message_id, now, wire, item, storage_op]
        result = await run_script(
            self.redis, self._publish, keys, [*args, self.retention_seconds], self.confirm
        )
        if result[0] == 0:
            return Published(result[1].decode(), True)
        if self.journal is not None:
            self.journal.note(SHARED, keys[5], None, storage_op)
        return Published(str(message_id), False)

    def floor_ms(self) -> int:
        return int(time.time() * 1000) - self.retention_ms

    async def above(self, groups: Sequence[str], after: int, limit: int) -> list[dict[str, Any]]:
        """Broadcasts to ``groups`` with id > ``after``, within retention, id order."""
        low = max(self.floor_ms(), timestamp_ms(after) if after else 0)
        pipe = self.redis.pipeline(transaction=False)
        for group in groups_of(groups):
            pipe.zrangebyscore(self.keys.broadcasts(group), low, "+inf")
        found = sorted({int(i) for ids in await pipe.execute() for i in ids if int(i) > after})
        if not found:
            return []
        return await self.bodies(found[:limit])

    async def bodies(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        raw = await self.redis.hmget(self.keys.broadcast_bodies(), [str(i) for i in ids])
        return [orjson.loads(b) for b in cast(list[bytes | None], raw) if b is not None]

    def replay_on(
        self, pipe: Any, uid: str, groups: Sequence[str]
    ) -> Callable[[Iterator[Any]], list[int]]:
        """Queue the reads of a connect's replay on the caller's ``pipe``: the user's
        watermark and each group's newest ``replay_max``. What it returns, called with an
        iterator over the replies, gives the newest ``replay_max`` ids above the watermark,
        in id order (their bodies come from bodies())."""
        if not self.replay_max:
            return lambda replies: []
        names = groups_of(groups)
        pipe.get(self.keys.broadcast_mark(uid))
        for group in names:  # newest first; those above the watermark are among them
            pipe.zrevrangebyscore(
                self.keys.broadcasts(group), "+inf", self.floor_ms(), 0, self.replay_max
            )

        def read(replies: Iterator[Any]) -> list[int]:
            mark = int(next(replies) or 0)
            newest = {int(i) for _ in names for i in next(replies) if int(i) > mark}
            return sorted(newest)[-self.replay_max :]

        return read

    async def acknowledge(self, uid: str, groups: Sequence[str], ids: Sequence[int]) -> list[int]:
        """Move the watermark to the newest of ``ids`` that is a broadcast to the user's
        ``groups``; returns those. (A broadcast to another group moved it past the user's
        own, which then no connect replayed.)"""
        if not ids:
            return []
        present = await self.batch.call("HMGET", self.keys.broadcast_bodies(), *map(str, ids))
        reach = set(groups_of(groups))
        known = [
            i
            for i, body in zip(ids, present, strict=True)
            if body is not None and orjson.loads(body).get("group") in reach
        ]
        if known:
            await self.batch.script(
                self._raise_mark,
                [self.keys.broadcast_mark(uid)],
                [str(max(known)), self.retention_ms // 1000],
                confirmed=False,
            )
        return known


class BroadcastTrim:
    """Takes the broadcasts older than retention out of Redis (the sweep's job)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.group_key = key_template(keys.broadcasts)
        self._trim = scripts.register(redis, "broadcast_trim")

    async def older_than(self, cutoff_ms: int, most: int) -> int:
        """Remove at most ``most`` broadcasts published before ``cutoff_ms`` (unix ms), the
        oldest first, in one script; returns how many (fewer than ``most``: none is left)."""
        keys = [self.keys.broadcast_index(), self.keys.broadcast_bodies()]
        return int(await self._trim(keys=keys, args=[*self.group_key, cutoff_ms, most]))
