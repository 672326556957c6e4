"""The one way PMQ opens Redis: a single server or a Redis Cluster, and sharded pub/sub.

On a single server, a bounded pool that makes callers wait for a free connection: redis-py's
default pool refuses the 101st concurrent command ("Too many connections"); a burst of
connects or publishes must queue for a moment instead, never fail.

On a Redis Cluster (``redis.cluster`` or a ``redis+cluster://`` URL naming any one node),
redis-py's asyncio ``RedisCluster``, which routes each command, script call and pipeline
entry by its keys' slot. PMQ's keys are hash-tagged (pmq.keys) so that each script touches
one slot. The cluster client is handed out as ``aioredis.Redis``: it offers the same
commands for everything PMQ calls, except pub/sub, which goes through :func:`subscribe`.

Pub/sub is sharded (SSUBSCRIBE/SPUBLISH, Redis 7) in both modes, so on a cluster a publish
reaches only the shard owning its channel, not every node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterPubSub, RedisCluster

from pmq.config import CLUSTER_URL, RedisConfig

MAX_CONNECTIONS = 256
WAIT_SECONDS = 5.0


def connect(config: RedisConfig) -> aioredis.Redis:
    """A client for ``config.url``; create it after fork, one per process."""
    if config.cluster or config.url.startswith(CLUSTER_URL):
        url = config.url.replace(CLUSTER_URL, "redis://", 1)
        # max_connections is per cluster node here.
        cluster = RedisCluster.from_url(url, max_connections=MAX_CONNECTIONS)
        return cast(aioredis.Redis, cluster)
    pool = aioredis.BlockingConnectionPool.from_url(
        config.url, max_connections=MAX_CONNECTIONS, timeout=WAIT_SECONDS
    )
    return aioredis.Redis(connection_pool=pool)


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


Handler = Callable[[dict[str, Any]], None]


class Subscription:
    """One sharded channel and its handler, on its own connection (on a cluster: to the
    node owning the channel's slot, followed when the slot moves).

    Call :meth:`start` once, then :meth:`dispatch` in a loop: it waits for the next message
    and runs the handler on it. After a connection error (raised), the next call reconnects
    and subscribes again."""

    def __init__(self, client: aioredis.Redis, channel: str, handler: Handler) -> None:
        self.channel = channel
        self.handler = handler
        self.cluster = is_cluster(client)
        if self.cluster:
            self.pubsub: aioredis.client.PubSub = cast(RedisCluster, client).pubsub()
        else:
            self.pubsub = client.pubsub()

    async def start(self) -> None:
        await self.pubsub.ssubscribe(**{self.channel: self.handler})

    async def dispatch(self) -> None:
        """Wait for one message and handle it (handlers run inside the read)."""
        if self.cluster:
            await cast(ClusterPubSub, self.pubsub).get_sharded_message(
                ignore_subscribe_messages=True, timeout=None  # type: ignore[arg-type]
            )
        else:
            await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=None)

    async def close(self) -> None:
        await self.pubsub.aclose()
