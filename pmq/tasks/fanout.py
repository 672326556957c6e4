"""Broadcast fan-out planning in a task worker: publish each broadcast once, and store it.

Broadcasts wait in ``broadcast_queue`` (put there atomically with the broadcast itself by
pmq.broadcast, which also keeps it in Redis for later replay). One task worker takes one at
a time into its own ``broadcast_taken`` list, publishes the push frame once on the sharded
broadcast channel (SPUBLISH), which every socket worker of every node reads
(pmq.reactor.fanout), and writes it to the SQL broadcasts table. It publishes before
storing so that an SQL outage never holds an announcement back; the item leaves the taken
list only once stored. A worker killed in between leaves the item in its taken list and its
successor finishes the job: a broadcast may then be published twice, and clients drop the
duplicate by id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson
import redis.asyncio as aioredis

from pmq.broadcast import encode_fanout
from pmq.errors import StorageError
from pmq.keys import Keys
from pmq.store import Store
from pmq.store.base import StoredBroadcast
from pmq.tasks.writer import raise_if_cancelled

log = logging.getLogger(__name__)

TAKE_TIMEOUT = 1
MAX_BACKOFF = 5.0

InThread = Callable[..., Awaitable[Any]]


class BroadcastFanout:
    def __init__(
        self, redis: aioredis.Redis, keys: Keys, store: Store, owner: str, in_thread: InThread
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.store = store
        self.in_thread = in_thread
        self.taken = keys.broadcast_taken(owner)
        self.published = 0

    async def run(self) -> None:
        """Finish what a predecessor left, then serve the queue until cancelled."""
        while True:
            raise_if_cancelled()
            item = cast(bytes | None, await self.redis.lindex(self.taken, 0))
            if item is None:
                item = cast(
                    bytes | None,
                    await self.redis.blmove(
                        self.keys.broadcast_queue(), self.taken, TAKE_TIMEOUT, "LEFT", "RIGHT"
                    ),
                )
            if item is not None:
                await self.handle(item)
                await self.redis.lpop(self.taken)

    async def handle(self, item: bytes) -> None:
        try:
            parsed = orjson.loads(item)
            group, message = parsed["group"], parsed["msg"]
            row = StoredBroadcast(
                id=int(message["id"]),
                group=group,
                kind=message["kind"],
                body=orjson.dumps(message["body"]).decode(),
                ts=int(message["ts"]),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.error("dropped a malformed broadcast: %r", item[:200])
            return
        frame = b'{"type":"push","msg":' + orjson.dumps(message) + b"}"
        receivers = await self.redis.spublish(
            self.keys.broadcast_channel(), encode_fanout(group, frame)
        )
        self.published += 1
        log.info("broadcast %s to %r published to %d socket workers", row.id, group, receivers)
        await self.store_with_retry(row)

    async def store_with_retry(self, row: StoredBroadcast) -> None:
        """Store the broadcast; on a storage outage retry with back-off, never skip it."""
        delay = 0.2
        while True:
            try:
                await self.in_thread(self.store.write_broadcasts, [row])
                return
            except StorageError as exc:
                log.warning(
                    "storing broadcast %s failed, retrying in %.1fs: %s", row.id, delay, exc
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)
