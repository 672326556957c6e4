"""Customer-service agents' presence, as their connections open and close on this worker.

An agent is online while it has a connection: pmq.domain.chat keeps the online set, reading the
registry, and hands queued sessions to an agent that comes online. Other users have no
presence. When Redis lost the online set with the rest (restarted empty), the agents still
connected here come online again as their route entries are written back (:meth:`restored`).
"""

from __future__ import annotations

from collections.abc import Iterable

from pmq.domain.chat import Chat
from pmq.reactor.connections import Client
from pmq.wire.client import Role


def is_agent(client: Client) -> bool:
    return client.identity.role is Role.AGENT


class Presence:
    def __init__(self, chat: Chat) -> None:
        self.chat = chat

    async def opened(self, client: Client) -> None:
        """Call once ``client`` is registered, before its hello: an agent comes online and
        may be handed queued sessions (their cs.assigned wait until its replay is out)."""
        if is_agent(client):
            await self.chat.agent_online(client.uid)

    async def closed(self, client: Client) -> None:
        """Call once the entry of ``client``, closed, left the registry (an agent's leaves
        at once: Registration.unregister): an agent goes offline with its last connection."""
        if is_agent(client):
            await self.chat.agent_offline(client.uid)

    async def restored(self, clients: Iterable[Client]) -> None:
        """Call once the route entries of ``clients`` were written again after Redis lost
        them: their agents are online again (the set went with the rest) and take queued
        sessions."""
        for agent in sorted({c.uid for c in clients if is_agent(c)}):
            await self.chat.agent_online(agent)

