"""The one way PMQ opens Redis: a bounded pool that makes callers wait for a free connection.

redis-py's default pool refuses the 101st concurrent command ("Too many connections"); a burst
of connects or publishes must queue for a moment instead, never fail.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from pmq.config import RedisConfig

MAX_CONNECTIONS = 256
WAIT_SECONDS = 5.0


def connect(config: RedisConfig) -> aioredis.Redis:
    """A client for ``config.url``; create it after fork, one per process."""
    pool = aioredis.BlockingConnectionPool.from_url(
        config.url, max_connections=MAX_CONNECTIONS, timeout=WAIT_SECONDS
    )
    return aioredis.Redis(connection_pool=pool)
