"""A connection's entry in the registry: written on open, in one round trip, and left on close.

Registering is on every connect's path, so the one pipeline that writes the entry also reads
what the connect does next (a connect rate is bounded by its round trips), on the worker's
lean connection where there is one (pmq.redis.batching.Batcher.pipeline): the user's
connections (to close those past ``server.max_connections_per_user``), the first look at the
inbox and the broadcasts to replay (pmq.reactor.replay), and whether the user was kicked
since the handshake checked (pmq.domain.kicks.Kicks.kicked_since_on).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

from pmq.domain.broadcast import Broadcasts
from pmq.domain.inbox import Inbox, Look
from pmq.domain.kicks import Kicks
from pmq.domain.routing import Routes, oldest_beyond
from pmq.reactor.connections import Client
from pmq.reactor.replay import LOOK as REPLAY_LOOK
from pmq.redis.batching import Batcher
from pmq.wire.client import CloseCode


@dataclasses.dataclass(frozen=True, slots=True)
class Registered:
    """What the registration read for the connect's replay: the inbox's first look and the
    ids of the broadcasts above the user's watermark, in id order."""

    look: Look
    broadcast_ids: list[int]


class Registration:
    """Registers and unregisters this worker's connections; ``most`` reads
    ``server.max_connections_per_user``."""

    def __init__(
        self,
        batch: Batcher,
        routes: Routes,
        inbox: Inbox,
        broadcasts: Broadcasts,
        kicks: Kicks,
        most: Callable[[], int],
    ) -> None:
        self.batch = batch
        self.routes = routes
        self.inbox = inbox
        self.broadcasts = broadcasts
        self.kicks = kicks
        self.most = most

    async def register(self, client: Client) -> Registered | None:
        """Register ``client`` (one round trip with the reads of the connect) and close the
        user's oldest connections past the bound, cluster-wide (the registry holds them
        all). None when the user was kicked since the handshake's check: ``client`` is
        closed with 4001 and nothing more is due."""
        uid, groups = client.uid, client.identity.groups
        pipe = self.batch.pipeline()  # one round trip: register, then read
        registered = self.routes.register_on(pipe, uid, client.conn_id, groups)
        counted = self.routes.connections_on(pipe, uid)
        looked = self.inbox.look_on(pipe, uid, limit=REPLAY_LOOK)
        replayable = self.broadcasts.replay_on(pipe, uid, groups)
        kicked = self.kicks.kicked_since_on(pipe, uid, client.checked_ms)
        replies = iter(await pipe.execute())
        registered(replies)
        connections = counted(replies)
        look = looked(replies)
        broadcast_ids = replayable(replies)
        if kicked(replies):  # between its handshake's check and now (Kicks.kicked_since_on)
            client.close(CloseCode.KICKED, "kicked")
            return None
        await self.routes.evict(uid, oldest_beyond(connections, self.most(), client.conn_id))
        await self.routes.events.online(uid)  # user.online for the site, when it takes it
        return Registered(look, broadcast_ids)

    def leave(self, client: Client) -> asyncio.Future[None]:
        """``client`` closed: its entry leaves in the next batch of departures; the future is
        done when it has left."""
        return self.routes.leave(client.uid, client.conn_id)

    async def unregister(self, client: Client) -> None:
        """``client`` closed: its entry leaves now (for readers that must not see it)."""
        await self.routes.unregister(client.uid, client.conn_id)
