"""What a handler gets and returns.

A handler is ``async def handler(app, caller, data) -> dict``: ``app`` gives the worker's
services (config, Redis, keys, routes), ``caller`` says who asks on which connection, ``data``
is the request's ``data`` object. It returns the reply's ``data`` or raises
:class:`pmq.errors.ActionError` with a reply code and a message naming the bad field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import redis.asyncio as aioredis

from pmq.auth import Identity
from pmq.config import Config
from pmq.keys import Keys
from pmq.routing import Routes


class App(Protocol):
    """The services a socket worker offers to handlers."""

    @property
    def config(self) -> Config: ...
    @property
    def redis(self) -> aioredis.Redis: ...
    @property
    def keys(self) -> Keys: ...
    @property
    def routes(self) -> Routes: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    identity: Identity
    conn_id: str

    @property
    def uid(self) -> str:
        return self.identity.uid


Handler = Callable[[App, Caller, dict[str, Any]], Awaitable[dict[str, Any]]]
