"""A job of the task workers that one worker of the whole cluster runs at a time, repeatedly.

The worker that holds the job's Redis lock does the work; the others find it held and wait
for the next turn. A holder that dies stops renewing, and the lock passes on once it expires.
"""

from __future__ import annotations

import abc
import asyncio

import redis.asyncio as aioredis

from pmq.cancel import raise_if_cancelled
from pmq.redis.keys import Keys
from pmq.redis.locks import Lease
from pmq.store import Store
from pmq.tasks.writer import InThread


class ClusterJob(abc.ABC):
    """Runs :meth:`once` now and every ``interval`` seconds. ``lock`` is the cluster's lock
    of the job, held by ``lock.owner`` (this worker slot); ``in_thread(func, *args)`` runs
    blocking store calls off the event loop."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        store: Store,
        in_thread: InThread,
        lock: Lease,
        interval: float,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.store = store
        self.in_thread = in_thread
        self.lock = lock
        self.owner = lock.owner
        self.interval = interval

    async def run(self) -> None:
        """Run :meth:`once` now and every ``interval`` seconds until cancelled. A failed turn
        (Redis or storage unreachable) ends the run: the task worker supervises it, and the
        next run, after a pause, simply does the job again."""
        while True:
            await self.once()
            raise_if_cancelled()
            await asyncio.sleep(self.interval)

    @abc.abstractmethod
    async def once(self) -> None:
        """One turn of the job, which does its work only if :meth:`hold_lock` succeeds."""

    async def hold_lock(self) -> bool:
        """Take the job's lock or renew it; False while another worker holds it."""
        return await self.lock.hold(self.redis)

    async def release(self) -> None:
        """Give up the job's lock if this worker holds it, so another takes over at once."""
        await self.lock.release(self.redis)
