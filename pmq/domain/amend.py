"""Retraction and editing of messages PMQ accepted (docs/notification-centre.md).

A message id alone says nothing of its user, so :meth:`Amends.find` looks in two places:
each bucket's ``owners`` hash (id -> uid of the messages accepted and not yet stored; the
storage writer forgets them once written) and then every message shard in storage. A
message acked before the writer stored it is in neither for that moment: the look waits for
storage a little (FIND_WAITS).

A retraction (one script in the user's bucket) takes the message out of the inbox, keeps a
"retracted" amend that corrects storage reads until the writer has its ``revoke`` op, and
counts the badge back by one when the user had not seen the message (it came after their
last clear of its kind); the user's connections, wherever they are, get a ``revoke`` frame
and their badge. A second retraction finds the amend and is refused, so the site gets 404.
An edit replaces the body in the hot inbox, keeps the new message as an amend, and sends an
``update`` frame with it.

A broadcast is retracted once for everyone: out of its group (its ``system`` count follows
from the group's broadcasts), its bodies and index, and a ``revoke`` frame on the broadcast
channel to every socket worker, which writes it to the group's members (pmq.reactor.fanout).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis

from pmq.domain.ids import timestamp_ms
from pmq.domain.journal import SHARED, StoreJournal
from pmq.domain.routing import Routes
from pmq.redis import scripts
from pmq.redis.keys import BROADCAST_TAG, Keys
from pmq.wire import relay
from pmq.wire.client import FrameType, Kind, encode_event
from pmq.wire.storeops import OpName, encode_amend

Item = dict[str, Any]
FIND_WAITS = (0.1, 0.2, 0.4, 0.8, 1.5)  # seconds waited for storage to have an acked message


class AmendArchive(Protocol):
    """Storage's look-ups by id, off the event loop (pmq.reactor.stored): the item as
    clients see it and whether it was retracted, or None."""

    def find_message(self, message_id: int) -> Awaitable[tuple[Item, bool] | None]: ...

    def find_broadcast(self, broadcast_id: int) -> Awaitable[tuple[Item, bool] | None]: ...


def counted_kind(item: Item) -> str:
    """The badge counter a unicast message added to ('' for a comment on one's own content)."""
    if item["kind"] == Kind.COMMENT and item.get("from") == item.get("to"):
        return ""
    return str(item["kind"])


class Amends:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        routes: Routes,
        archive: AmendArchive,
        retention_seconds: int,
        journal: StoreJournal | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.routes = routes
        self.archive = archive
        self.retention_seconds = retention_seconds
        self.journal = journal  # a socket worker's, so an emptied Redis loses no retraction
        self._revoke = scripts.register(redis, "centre_revoke")
        self._edit = scripts.register(redis, "centre_edit")
        self._revoke_broadcast = scripts.register(redis, "broadcast_revoke")

    async def find(self, message_id: int) -> Item | None:
        """The unicast message ``message_id`` as its user sees it now (edits applied), or
        None when PMQ holds no such message or it was retracted."""
        pipe = self.redis.pipeline(transaction=False)
        for bucket in range(self.keys.buckets):
            pipe.hget(self.keys.owners(bucket), str(message_id))
        owner = next((uid.decode() for uid in await pipe.execute() if uid), None)
        if owner is not None:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hget(self.keys.amends(owner), str(message_id))
            pipe.hget(self.keys.inbox_bodies(owner), str(message_id))
            pipe.hget(self.keys.acked_unstored(owner), str(message_id))
            amend, body, acked = await pipe.execute()
            if amend is not None:
                return orjson.loads(amend) if amend else None
            if body is not None or acked is not None:
                return orjson.loads(body or acked)
        for wait in (0.0, *(FIND_WAITS if owner is not None else ())):
            await asyncio.sleep(wait)
            found = await self.archive.find_message(message_id)
            if found is not None:
                return await self._amended(*found)
        return None

    async def _amended(self, item: Item, revoked: bool) -> Item | None:
        if revoked:
            return None
        amend = await self.redis.hget(self.keys.amends(item["to"]), item["id"])
        if amend is None:
            return item
        return orjson.loads(amend) if amend else None

    def _queue(self, uid: str) -> str:
        return self.keys.store_queue(self.keys.user_tag(uid))

    def _note(self, uid: str, op: bytes) -> None:
        if self.journal is not None:
            self.journal.note(self.keys.bucket(uid), self._queue(uid), uid, op)

    async def revoke(self, message_id: int) -> bool:
        """Retract the message (module docstring); False when there is none to retract."""
        item = await self.find(message_id)
        if item is None:
            return False
        uid, key = item["to"], str(message_id)
        op = encode_amend(OpName.REVOKE, orjson.dumps(item))
        keys = [
            self.keys.inbox(uid),
            self.keys.inbox_bodies(uid),
            self.keys.unread(uid),
            self.keys.last_read(uid),
            self.keys.amends(uid),
            self._queue(uid),
            self.keys.acked_unstored(uid),
        ]
        args: list[Any] = [
            key,
            timestamp_ms(message_id),
            counted_kind(item),
            op,
            self.retention_seconds,
        ]
        if not await self._revoke(keys=keys, args=args):
            return False  # retracted meanwhile
        self._note(uid, op)
        await self.routes.deliver(uid, encode_event(FrameType.REVOKE, id=key))
        await self.routes.notify_unread(uid)
        return True

    async def edit(self, message_id: int, body: Any) -> Item | None:
        """Give the message a new ``body``; returns it as clients see it now, or None when
        there is no such message (or it was retracted)."""
        item = await self.find(message_id)
        if item is None:
            return None
        uid = item["to"]
        edited = {**item, "body": body}
        wire = orjson.dumps(edited)
        op = encode_amend(OpName.EDIT, wire)
        keys = [
            self.keys.inbox_bodies(uid),
            self.keys.amends(uid),
            self._queue(uid),
            self.keys.acked_unstored(uid),
        ]
        args: list[Any] = [str(message_id), wire, op, self.retention_seconds]
        if not await self._edit(keys=keys, args=args):
            return None
        self._note(uid, op)
        await self.routes.deliver(uid, encode_event(FrameType.UPDATE, msg=edited))
        return edited

    async def find_broadcast(self, broadcast_id: int) -> Item | None:
        """The broadcast ``broadcast_id``, or None (unknown, or retracted)."""
        body = await self.redis.hget(self.keys.broadcast_bodies(), str(broadcast_id))
        if body is not None:
            return orjson.loads(body)
        found = await self.archive.find_broadcast(broadcast_id)
        return None if found is None or found[1] else found[0]

    async def revoke_broadcast(self, broadcast_id: int) -> bool:
        """Retract a broadcast for everyone (module docstring); False when there is none."""
        item = await self.find_broadcast(broadcast_id)
        if item is None:
            return False
        group, key = item["group"], str(broadcast_id)
        op = encode_amend(OpName.BC_REVOKE, orjson.dumps(item), group)
        floor = int(time.time() * 1000) - self.retention_seconds * 1000
        keys = [
            self.keys.broadcasts(group),
            self.keys.broadcast_index(),
            self.keys.broadcast_bodies(),
            self.keys.broadcast_revoked(),
            self.keys.store_queue(BROADCAST_TAG),
        ]
        args: list[Any] = [key, timestamp_ms(broadcast_id), op, self.retention_seconds, floor]
        if not await self._revoke_broadcast(keys=keys, args=args):
            return False
        if self.journal is not None:
            self.journal.note(SHARED, keys[4], None, op)
        frame = encode_event(FrameType.REVOKE, id=key)
        await self.redis.spublish(
            self.keys.broadcast_channel(), relay.encode_broadcast(group, frame)
        )
        return True
