"""The task worker: runs jobs that need the SQL store, on a thread pool beside one loop.

Jobs: the storage writer (pmq.tasks.writer) drains the storage queues into the store; the
broadcast fan-out (pmq.tasks.fanout) publishes each broadcast once to every socket worker;
with ``webhooks.url`` set, the webhook sender (pmq.tasks.webhooks) sends the events to the site;
the sweeper (pmq.tasks.sweep) moves stored messages out of Redis and applies retention, on
one task worker of the cluster at a time; the recovery (pmq.tasks.recovery) checks the Redis
marks and recovers from a Redis data loss. Clients (Redis, the store's pool) are created
here, after fork.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any

from redis.exceptions import RedisError

from pmq import metrics
from pmq.config import Config
from pmq.redis import conn as redisconn
from pmq.redis.keys import Keys
from pmq.store import open_store
from pmq.tasks.fanout import BroadcastFanout
from pmq.tasks.owners import OwnerLease, legacy_owners
from pmq.tasks.recovery import BatchGuard, Recovery
from pmq.tasks.sweep import Sweeper
from pmq.tasks.webhooks import Poster, WebhookSender
from pmq.tasks.writer import StorageWriter
from pmq.workers.base import BootError, Worker

log = logging.getLogger(__name__)

QUEUE_WATCH_SECONDS = 2.0
# Seconds of the graceful deadline kept for closing clients after the writer's drain.
CLOSE_MARGIN = 1.0


class TaskWorker(Worker):
    kind = "task"
    thread_prefix = "pmq-task"

    def __init__(self, config: Config, index: int, status_fd: int, ppid: int) -> None:
        super().__init__(config, index, status_fd, ppid)
        self.keys = Keys(config.redis.prefix, config.redis.buckets)
        self.jobs: list[asyncio.Task[Any]] = []
        self.queue_depths: dict[str, int] = {}
        self.writer: StorageWriter | None = None
        self.sweeper: Sweeper | None = None
        self.sweeper_job: asyncio.Task[None] | None = None
        self.fanout_job: asyncio.Task[None] | None = None
        self.webhooks: WebhookSender | None = None

    async def start(self) -> None:
        """Connect, build the jobs, then run each under supervision, in that order; the
        queues' depths are read once first, for the stats sent with the ready."""
        await self.connect()
        writer, sweeper = self.assemble()
        with contextlib.suppress(RedisError, OSError):  # watch_queues reads them again
            await self.read_queues()
        self.run_jobs(writer, sweeper)

    async def connect(self) -> None:
        """Redis (answering a ping, else BootError) and the store's pool, after fork."""
        self.redis = redisconn.connect(self.config.redis)
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            raise BootError(f"redis at {self.config.redis.url}: {exc}") from exc
        self.store = open_store(self.config.storage)

    def assemble(self) -> tuple[StorageWriter, Sweeper]:
        """The jobs, not yet running: owner lease, writer, sweeper, fan-out, recovery.
        Returns the writer and the sweeper, also kept for the stop."""
        owner = f"{self.config.server.node}:{self.index}"  # stable across respawns of the slot
        inbox = self.config.inbox
        # The writer's and the fan-out's taken lists are this process's, new with each (never
        # the slot's: the node's name and task_workers may differ next time); the lease is
        # the worker timeout, after which the master would have replaced a stuck worker.
        # Lists this node's slots left before owner leases are adopted.
        self.owners = OwnerLease(
            self.redis,
            self.keys,
            f"{self.id}:{secrets.token_hex(4)}",
            self.config.server.worker_timeout,
            legacy=legacy_owners(self.config.server.node, self.config.server.task_workers),
        )
        self.writer = writer = StorageWriter(
            self.redis,
            self.keys,
            self.store,
            self.owners,
            self.in_thread,
            guard=BatchGuard(
                self.redis, self.keys, self.store, self.in_thread, inbox.retention_seconds
            ),
        )
        self.sweeper = sweeper = Sweeper(
            self.redis,
            self.keys,
            self.store,
            self.in_thread,
            hot_seconds=inbox.hot_seconds,
            retention_seconds=inbox.retention_seconds,
            interval=inbox.sweep_seconds,
            owner=owner,
        )
        self.fanout = BroadcastFanout(self.redis, self.keys, self.owners)
        self.recovery = Recovery(
            self.redis, self.keys, self.store, self.in_thread, owner, inbox.retention_seconds
        )
        if self.config.webhooks.url:
            self.webhooks = WebhookSender(
                self.redis, self.keys, self.config.webhooks, self.owners.owner,
                self.config.heartbeat.interval, Poster(self.config.webhooks),
            )
        return writer, sweeper

    def run_jobs(self, writer: StorageWriter, sweeper: Sweeper) -> None:
        """Each job under the worker's supervisor (restarted on expected errors)."""
        inbox = self.config.inbox
        # Sooner at first, then no more often than the sweeps it stands for.
        self.sweeper_job = self.supervise("sweeper", sweeper.run, cap=inbox.sweep_seconds)
        self.fanout_job = self.supervise("broadcast-fanout", self.fanout.run)
        self.jobs += [
            self.supervise("queue-depths", self.watch_queues),
            self.supervise("storage-writer", writer.run),
            self.supervise("task-lease", self.owners.run),
            self.fanout_job,
            self.supervise("redis-recovery", self.recovery.run),
            self.sweeper_job,
        ]
        if self.webhooks is not None:
            self.jobs.append(self.supervise("webhooks", self.webhooks.run))

    async def watch_queues(self) -> None:
        """Publish the queues' depths (pmqctl status, /metrics) every few seconds."""
        while True:
            await self.read_queues()
            await asyncio.sleep(QUEUE_WATCH_SECONDS)

    async def read_queues(self) -> None:
        queues = {
            "store": [self.keys.store_queue(tag) for tag in self.keys.store_tags()],
            "broadcast": [self.keys.broadcast_queue()],
            "dead": [self.keys.store_dead(tag) for tag in self.keys.store_tags()],
        }
        if self.webhooks is not None:
            queues["webhooks"] = [
                *(self.keys.hook_outbox(b) for b in range(self.keys.buckets)),
                self.keys.hook_chat_outbox(),
            ]
        for name, keys in queues.items():
            pipe = self.redis.pipeline(transaction=False)
            for key in keys:
                pipe.llen(key)
            self.queue_depths[name] = sum(await pipe.execute())
            metrics.QUEUE_DEPTH.labels(name).set(self.queue_depths[name])

    async def reload(self, fresh: Config) -> None:
        if self.sweeper is not None:  # the one reloadable setting a task worker keeps
            self.sweeper.hot_ms = fresh.inbox.hot_seconds * 1000

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.writer.stats() if self.writer else {}
        if self.webhooks is not None:
            stats["webhooks"] = self.webhooks.stats()
        return {**stats, "queues": dict(self.queue_depths)}

    async def shutdown(self, fast: bool) -> None:
        """Stop the sweeper (a sweep is idempotent: cut it anywhere) and hand its lock over;
        on a graceful stop let the writer finish its batch within the deadline (a fast stop
        cancels it: the taken lists keep the batch until a live task worker takes them over
        when this one's lease expires); then cancel what remains and close the clients."""
        left = 0
        if self.sweeper_job is not None and self.sweeper is not None:
            self.sweeper_job.cancel()
            await asyncio.gather(self.sweeper_job, return_exceptions=True)
            try:
                await self.sweeper.release()
            except (RedisError, OSError) as exc:
                log.warning("%s: could not release the sweep lock: %s", self.title, exc)
        if self.writer is not None and not fast:
            if self.fanout_job is not None:  # the drain gives the fan-out's taken list back too
                self.fanout_job.cancel()
                await asyncio.gather(self.fanout_job, return_exceptions=True)
            timeout = max(0.1, self.config.server.graceful_timeout - CLOSE_MARGIN)
            try:
                left = await self.writer.drain(timeout)
            except (RedisError, OSError) as exc:
                log.warning("%s: storage writer drain failed: %s", self.title, exc)
                left = -1
            if left:
                log.warning(
                    "%s: %s storage items stay taken until this writer's lease expires",
                    self.title,
                    "some" if left < 0 else left,
                )
        for job in self.jobs:
            job.cancel()
        await asyncio.gather(*self.jobs, return_exceptions=True)
        if self.webhooks is not None:  # the next holder of a bucket need not wait for its lease
            try:
                await self.webhooks.release()
            except (RedisError, OSError) as exc:
                log.warning("%s: could not release the webhook leases: %s", self.title, exc)
            await self.webhooks.poster.close()
        await self.redis.aclose()
        # A store call still running in a thread (a retention delete, a write cut off by the
        # deadline) is not waited for: the sweep is idempotent and an unfinished batch is
        # still in Redis. Closing the store makes such a call fail or end on its own.
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.store.close()


def run(config: Config, index: int, status_fd: int, ppid: int) -> int:
    """Entry point called by the master in the forked child."""
    return TaskWorker(config, index, status_fd, ppid).run()
