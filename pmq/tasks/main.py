"""The task worker: runs jobs that need the SQL store, on a thread pool beside one loop.

Clients (Redis, the store's pool) are created here, after fork.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pmq.config import Config
from pmq.keys import Keys
from pmq.store import open_store
from pmq.workers.base import BootError, Worker

log = logging.getLogger(__name__)


class TaskWorker(Worker):
    kind = "task"

    def __init__(self, config: Config, index: int, status_fd: int, ppid: int) -> None:
        super().__init__(config, index, status_fd, ppid)
        self.keys = Keys(config.redis.prefix)
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pmq-task")
        self.jobs: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        self.redis = aioredis.Redis.from_url(self.config.redis.url)
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            raise BootError(f"redis at {self.config.redis.url}: {exc}") from exc
        self.store = open_store(self.config.storage)

    async def shutdown(self, fast: bool) -> None:
        for job in self.jobs:
            job.cancel()
        await asyncio.gather(*self.jobs, return_exceptions=True)
        await self.redis.aclose()
        self.executor.shutdown(wait=not fast, cancel_futures=fast)
        self.store.close()


def run(config: Config, index: int, status_fd: int, ppid: int) -> int:
    """Entry point called by the master in the forked child."""
    return TaskWorker(config, index, status_fd, ppid).run()
