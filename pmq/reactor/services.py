"""What handlers and the ingest routes are given: the socket worker's services, by name.

A :class:`Services` is built once per worker (pmq.reactor.main) and handed to the gateway,
which passes it to every handler (pmq.handlers.base.App), and to the ingest routes
(pmq.reactor.ingest.IngestApp), instead of the worker itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis

from pmq.auth import Authenticator
from pmq.broadcast import Broadcasts
from pmq.chat import Chat
from pmq.config import Config
from pmq.inbox import Inbox
from pmq.keys import Keys
from pmq.reactor.stored import StoredReads
from pmq.routing import Routes
from pmq.store import Store
from pmq.unread import Unread

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class Services:
    config: Config
    redis: aioredis.Redis
    keys: Keys
    routes: Routes
    inbox: Inbox
    unread: Unread
    broadcasts: Broadcasts
    chat: Chat
    authenticator: Authenticator
    stored: StoredReads

    @property
    def store(self) -> Store:
        return self.stored.store

    async def cold_messages(self, uid: str, after: int, limit: int) -> list[dict[str, Any]]:
        return await self.stored.cold_messages(uid, after, limit)

    async def in_thread(self, func: Callable[..., T], *args: Any) -> T:
        """The worker's in_thread (pmq.workers.base.Worker.in_thread)."""
        return await self.stored.in_thread(func, *args)
