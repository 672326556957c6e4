"""What handlers and the ingest routes are given: the socket worker's services, by name.

A :class:`Services` is built once per worker (pmq.workers.socket) and handed to the gateway,
which passes it to every handler (pmq.handlers.base.App), and to the ingest routes
(pmq.reactor.ingest.IngestApp), instead of the worker itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis

from pmq.config import Config
from pmq.domain.auth import Authenticator
from pmq.domain.broadcast import Broadcasts
from pmq.domain.centre import Centre
from pmq.domain.chat import Chat
from pmq.domain.inbox import Inbox
from pmq.domain.routing import Routes
from pmq.domain.unread import Unread
from pmq.reactor.stored import StoredReads
from pmq.redis.keys import Keys
from pmq.store import Store

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
    centre: Centre

    @property
    def store(self) -> Store:
        return self.stored.store

    async def cold_messages(self, uid: str, after: int, limit: int) -> list[dict[str, Any]]:
        return await self.stored.cold_messages(uid, after, limit)

    async def in_thread(self, func: Callable[..., T], *args: Any) -> T:
        """The worker's in_thread (pmq.workers.base.Worker.in_thread)."""
        return await self.stored.in_thread(func, *args)
