"""Broadcast fan-out in a task worker: publish each broadcast once.

Broadcasts wait in ``broadcast_queue`` (put there atomically with the broadcast itself by
pmq.broadcast, which also keeps it in Redis for later replay and queues its storage
operation for the storage writer). One task worker takes one at a time into its own
``broadcast_taken`` list and publishes the push frame once on the sharded broadcast channel
(SPUBLISH), which every socket worker of every node reads (pmq.reactor.fanout); the item
then leaves the taken list. The fan-out never touches SQL, so a storage outage never holds
an announcement back. A worker killed in between leaves the item in its taken list and its
successor publishes it: a broadcast may then be published twice, and clients drop the
duplicate by id.
"""

from __future__ import annotations

import logging
from typing import cast

import orjson
import redis.asyncio as aioredis

from pmq.broadcast import encode_fanout
from pmq.keys import Keys
from pmq.tasks.writer import raise_if_cancelled

log = logging.getLogger(__name__)

TAKE_TIMEOUT = 1


class BroadcastFanout:
    def __init__(self, redis: aioredis.Redis, keys: Keys, owner: str) -> None:
        self.redis = redis
        self.keys = keys
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
        """Publish one queued broadcast to every socket worker (a malformed one is dropped)."""
        try:
            parsed = orjson.loads(item)
            group, message = parsed["group"], parsed["msg"]
            message_id = int(message["id"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.error("dropped a malformed broadcast: %r", item[:200])
            return
        frame = b'{"type":"push","msg":' + orjson.dumps(message) + b"}"
        receivers = await self.redis.spublish(
            self.keys.broadcast_channel(), encode_fanout(group, frame)
        )
        self.published += 1
        log.info("broadcast %s to %r published to %d socket workers", message_id, group, receivers)
