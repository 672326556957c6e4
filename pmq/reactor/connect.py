"""A connection's open and close on this worker, in order: registration, presence, hello,
replay; then the registry entry leaves, before the client's close completes.

The gateway (pmq.reactor.gateway) calls :meth:`Connects.opened` once the handshake is
authenticated, :meth:`Connects.leaving` when the client closed (before the TCP connection
ends) and :meth:`Connects.closed` when the socket is gone. Each step lives in the
module named after it: pmq.reactor.registration, pmq.reactor.replay, pmq.reactor.presence.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pmq.reactor.connections import Client
from pmq.reactor.presence import Presence, is_agent
from pmq.reactor.registration import Registration
from pmq.reactor.replay import ConnectReplay
from pmq.reactor.unread import UnreadPusher
from pmq.wire.client import encode_hello


class Connects:
    """``heartbeat_interval`` reads ``heartbeat.interval``, told to the client in hello."""

    def __init__(
        self,
        registration: Registration,
        replay: ConnectReplay,
        presence: Presence,
        unread: UnreadPusher,
        heartbeat_interval: Callable[[], float],
    ) -> None:
        self.registration = registration
        self.replay = replay
        self.presence = presence
        self.unread = unread
        self.heartbeat_interval = heartbeat_interval

    async def opened(self, client: Client) -> None:
        """Register (closing the user's oldest connections past the bound), bring an agent
        online, say hello, replay the inbox in id order, then let live frames through.
        Live frames wait (Client.hold) until the replay is out: a session handed to an
        agent coming online reaches it after its hello and replay, and a user who sees the
        agent's hello finds it online."""
        client.hold()
        registered = await self.registration.register(client)
        if registered is None:  # kicked since its handshake: closed
            return
        await self.unread.watch(client.identity.groups)  # a round trip only for a new group
        await self.presence.opened(client)
        client.write(encode_hello(client.conn_id, client.uid, self.heartbeat_interval()))
        await self.replay.run(client, registered.look, registered.broadcast_ids)

    async def leaving(self, client: Client) -> None:
        """The client closed: its entry leaves the registry before the close completes, so
        that a site asking right after it sees the connection gone."""
        await self._leave(client)

    async def closed(self, client: Client) -> None:
        self.replay.stop(client)
        left = self._leave(client)
        if is_agent(client):
            await left
        # Another's entry leaves with the next batch of departures, unless leaving() saw
        # it go: not waited for here, so a Redis away holds no close.

    def _leave(self, client: Client) -> asyncio.Future[None]:
        """The entry of ``client`` leaves the registry, once however often asked."""
        if client.left is None:
            client.left = (
                # An agent's online check reads the registry: its entry leaves now.
                asyncio.ensure_future(self._agent_left(client))
                if is_agent(client)
                else self.registration.leave(client)
            )
        return client.left

    async def _agent_left(self, client: Client) -> None:
        await self.registration.unregister(client)
        await self.presence.closed(client)
