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

from pmq.config import Config
from pmq.domain.auth import Identity
from pmq.domain.broadcast import Broadcasts
from pmq.domain.centre import Centre
from pmq.domain.chat import Chat
from pmq.domain.inbox import Inbox
from pmq.domain.routing import Routes
from pmq.domain.unread import Unread
from pmq.errors import ActionError
from pmq.redis.keys import Keys
from pmq.wire.client import Code


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
    @property
    def inbox(self) -> Inbox: ...
    @property
    def unread(self) -> Unread: ...
    @property
    def broadcasts(self) -> Broadcasts: ...
    @property
    def chat(self) -> Chat: ...
    @property
    def centre(self) -> Centre: ...

    async def cold_messages(self, uid: str, after: int, limit: int) -> list[dict[str, Any]]:
        """Unacked messages of ``uid`` that left Redis for storage (id order)."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    identity: Identity
    conn_id: str

    @property
    def uid(self) -> str:
        return self.identity.uid

    @property
    def groups(self) -> tuple[str, ...]:
        return self.identity.groups


Handler = Callable[[App, Caller, dict[str, Any]], Awaitable[dict[str, Any]]]


def bad_request(msg: str) -> ActionError:
    return ActionError(Code.BAD_REQUEST, msg)


def int_field(data: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    """An optional integer field within [low, high]; a 400 naming the field otherwise."""
    value = data.get(name, default)
    if value is None:
        return default
    # The length first: int() of a string of 4300+ digits raises (a 500, not a 400).
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 20:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise bad_request(f"{name}: must be an integer from {low} to {high}")
    return value
