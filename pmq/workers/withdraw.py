"""The registry entries of socket workers the master had to kill at a stop, removed.

A worker stopped gracefully removes its own route entries and its cluster entry; one still
alive after ``server.graceful_timeout`` is killed and cannot. Peers of other nodes sweep a
dead worker's entries within two heartbeats, but a node alone in its cluster has no peers,
so the master forks this once more (:func:`pmq.workers.spawn.fork_withdraw`): the master
never imports the code the workers run, and this child imports it after the fork. It does
what a worker's own stop would have (Routes.forget, the cluster entry's removal), within
WITHDRAW_SECONDS.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from redis.exceptions import RedisError

from pmq.config import Config
from pmq.domain.cluster import leave_view
from pmq.domain.routing import Routes
from pmq.redis import conn as redisconn
from pmq.redis.keys import Keys

log = logging.getLogger(__name__)

WITHDRAW_SECONDS = 5.0


def run(config: Config, worker_ids: Sequence[str]) -> int:
    """Forget every entry of ``worker_ids``; 0 once done, 1 if Redis failed or was slow."""
    try:
        asyncio.run(asyncio.wait_for(forget(config, worker_ids), WITHDRAW_SECONDS))
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning("could not remove the killed workers' route entries: %r", exc)
        return 1
    return 0


async def forget(config: Config, worker_ids: Sequence[str]) -> None:
    redis = redisconn.connect(config.redis)
    keys = Keys(config.redis.prefix, config.redis.buckets)
    try:
        for worker_id in worker_ids:
            removed = await Routes(redis, keys, worker_id, config.heartbeat.interval).forget(
                worker_id
            )
            await leave_view(redis, keys.cluster_workers(), worker_id)
            log.info("removed %d route entries of killed worker %s", removed, worker_id)
    finally:
        await redis.aclose()
