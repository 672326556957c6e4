"""The one way PMQ opens Redis: a single server or a Redis Cluster, and sharded pub/sub.

On a single server, a bounded pool that makes callers wait for a free connection: redis-py's
default pool refuses the 101st concurrent command ("Too many connections"); a burst of
connects or publishes must queue for a moment instead, never fail. A command is never sent
twice: a pooled connection that Redis closed (restarted since it was opened) is opened again
when it is taken from the pool, before anything is written to it, so the first command after
a restart succeeds; a connection that drops once a command was written fails that command
with ConnectionError, since Redis may have run it (a script run twice would count or
deduplicate twice). A request answers 503 for it; a background loop tries again later.

On a Redis Cluster (``redis.cluster`` or a ``redis+cluster://`` URL naming any one node),
redis-py's asyncio ``RedisCluster``, which routes each command, script call and pipeline
entry by its keys' slot. PMQ's keys are hash-tagged (pmq.redis.keys) so that each script touches
one slot. The cluster client is handed out as ``aioredis.Redis``: it offers the same
commands for everything PMQ calls, except pub/sub, which goes through :func:`subscribe`.
It never sends a command again either: one whose connection to a node failed fails with
ConnectionError, and the client refreshes its slots map before a later command (at most
once a second), so the commands after a failover reach the new master.

Pub/sub is sharded (SSUBSCRIBE/SPUBLISH, Redis 7) in both modes, so on a cluster a publish
reaches only the shard owning its channel, not every node. On one server the channel is read
by pmq.redis.pipe, which parses in C and runs the handlers without a task per message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, Protocol, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from pmq.config import CLUSTER_URL, RedisConfig
from pmq.redis import pipe as redispipe

MAX_CONNECTIONS = 256
WAIT_SECONDS = 5.0
RESUBSCRIBE_SECONDS = 0.2
DISPATCH_BATCH = 64  # cluster pub/sub messages handled between two yields to the loop


def connect(config: RedisConfig, max_connections: int = MAX_CONNECTIONS) -> aioredis.Redis:
    """A client for ``config.url``; create it after fork, one per process (and one more for
    a loop that must never wait behind the others for a pooled connection, with a few)."""
    if config.cluster or config.url.startswith(CLUSTER_URL):
        url = config.url.replace(CLUSTER_URL, "redis://", 1)
        # max_connections is per cluster node here. No resend (the node connections never
        # retry either): a command or pipeline whose connection failed may have run. The
        # failure still asks for a refresh of the slots map, which a later command runs, and
        # MOVED/ASK redirects are followed whatever the retries.
        cluster = RedisCluster.from_url(
            url, max_connections=max_connections, retry=Retry(NoBackoff(), 0)
        )
        return cast(aioredis.Redis, cluster)
    pool = aioredis.BlockingConnectionPool.from_url(
        config.url,
        max_connections=max_connections,
        timeout=WAIT_SECONDS,
        # No resend: the pool's check of a connection it hands out (did Redis close it?)
        # already replaces a dead one before the write; a retry would also resend commands
        # whose connection dropped after Redis ran them.
        retry=Retry(NoBackoff(), 0),
    )
    return aioredis.Redis(connection_pool=pool)


Handler = Callable[[dict[str, Any]], None]


class Subscription(Protocol):
    """One sharded channel and its handler, on its own connection.

    Call :meth:`start` once, then :meth:`dispatch` in a loop: it handles messages as they
    come (handlers run inside the read) and returns now and then, or raises when the
    connection failed. After it raised, call :meth:`recover` (which may raise too) and go
    on."""

    channel: str

    async def start(self) -> None: ...

    async def dispatch(self) -> None: ...

    async def recover(self) -> None: ...

    async def close(self) -> None: ...


def subscribe(client: aioredis.Redis, channel: str, handler: Handler) -> Subscription:
    """A subscription to ``channel`` (not yet started): on one server pmq.redis.pipe's lean
    reader, on a cluster redis-py's, following the channel's slot."""
    if redispipe.supports(client):
        return redispipe.Subscription(client, channel, handler)
    return ClusterSubscription(cast(RedisCluster, client), channel, handler)


class ClusterSubscription:
    """A sharded channel through redis-py, at the node owning the channel's slot (followed
    when the slot moves)."""

    def __init__(self, client: RedisCluster, channel: str, handler: Handler) -> None:
        self.client = client
        self.channel = channel
        self.handler = handler
        self.pubsub = client.pubsub()

    async def start(self) -> None:
        await self.pubsub.ssubscribe(**{self.channel: self.handler})

    async def dispatch(self) -> None:
        """Handle up to DISPATCH_BATCH messages, waiting for each."""
        if not self.pubsub.node_pubsub_mapping:
            # The shard dropped our subscription (its slot moved) and nothing listens now:
            # subscribe again, at the slot's current owner, rather than spin on nothing.
            await asyncio.sleep(RESUBSCRIBE_SECONDS)
            await self.start()
            return
        for _ in range(DISPATCH_BATCH):
            await self.pubsub.get_sharded_message(
                ignore_subscribe_messages=True, timeout=None  # type: ignore[arg-type]
            )

    async def recover(self) -> None:
        """After a read failed: a fresh subscription at the slot's current owner (the old
        node may be gone)."""
        old, self.pubsub = self.pubsub, self.client.pubsub()
        with contextlib.suppress(RedisError, OSError):
            await old.aclose()
        await self.start()

    async def close(self) -> None:
        await self.pubsub.aclose()
