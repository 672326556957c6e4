"""Customer-service agents' presence, as their connections open and close on this worker.

An agent is online while it has a connection: pmq.domain.chat keeps the online set, reading the
registry, and hands queued sessions to an agent that comes online. Other users have no
presence.
"""

from __future__ import annotations

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
