"""Broadcast fan-out in a task worker: publish each broadcast once.

Broadcasts wait in ``broadcast_queue`` (put there atomically with the broadcast itself by
pmq.domain.broadcast, which also keeps it in Redis for later replay and queues its storage
operation for the storage writer). One task worker takes one at a time into its own
``broadcast_taken`` list and publishes the push frame once on the sharded broadcast channel
(SPUBLISH), which every socket worker of every node reads (pmq.reactor.fanout); the item
then leaves the taken list. The fan-out never touches SQL, so a storage outage never holds
an announcement back. The taken list is covered by the task worker's owner lease
(pmq.tasks.owners): a worker killed in between leaves the item in its taken list, and once
its lease expires a live task worker of any node puts it back on the queue and publishes it.
A broadcast may then be published twice, and clients drop the duplicate by id.
"""

from __future__ import annotations

import logging
from typing import cast

import orjson
import redis.asyncio as aioredis

from pmq.cancel import raise_if_cancelled
from pmq.redis.keys import Keys
from pmq.tasks.owners import OwnerLease
from pmq.wire import relay
from pmq.wire.client import push_frame

log = logging.getLogger(__name__)

TAKE_TIMEOUT = 1


class BroadcastFanout:
    """Publishes queued broadcasts, taking each into the taken list of ``owners`` (the task
    worker's owner lease, whose run() must go on beside this one's)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, owners: OwnerLease) -> None:
        self.redis = redis
        self.keys = keys
        self.owners = owners
        self.taken = keys.broadcast_taken(owners.owner)
        self.published = 0

    async def run(self) -> None:
        """Finish what this worker left in its taken list, then serve the queue until
        cancelled."""
        queue = self.keys.broadcast_queue()
        while True:
            raise_if_cancelled()
            item = cast(bytes | None, await self.redis.lindex(self.taken, 0))
            if item is None and await self.wait(queue):
                item = await self.owners.take_one(queue, self.taken, self.keys.broadcast_owners())
            if item is not None:
                await self.handle(item)
                await self.redis.lpop(self.taken)

    async def wait(self, queue: str) -> bool:
        """Wait up to TAKE_TIMEOUT for an item, without taking it (a BLMOVE of the tail onto
        itself moves nothing): only take_one() moves items, registering the owner."""
        tail = await self.redis.blmove(queue, queue, TAKE_TIMEOUT, "RIGHT", "RIGHT")
        return tail is not None

    async def handle(self, item: bytes) -> None:
        """Publish one queued broadcast to every socket worker (a malformed one is dropped)."""
        try:
            group, message = relay.decode_broadcast_item(item)
        except ValueError:
            log.error("dropped a malformed broadcast: %r", item[:200])
            return
        message_id = int(message["id"])
        if await self.redis.zscore(self.keys.broadcast_revoked(), str(message_id)) is not None:
            log.info("broadcast %s retracted before its fan-out: not published", message_id)
            return
        frame = push_frame(orjson.dumps(message))
        receivers = await self.redis.spublish(
            self.keys.broadcast_channel(), relay.encode_broadcast(group, frame)
        )
        self.published += 1
        log.info("broadcast %s to %r published to %d socket workers", message_id, group, receivers)
