"""The notification centre's actions, for the client (``msg.list``, ``msg.read``) and the
site (pmq.reactor.centre): a page of the feed (pmq.domain.feed), marking read
(pmq.domain.reads), retracting and editing (pmq.domain.amend) (docs/notification-centre.md).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis

from pmq.domain.amend import AmendArchive, Amends
from pmq.domain.broadcast import Broadcasts, groups_of
from pmq.domain.events import NO_EVENTS, Events
from pmq.domain.feed import Feed, FeedArchive, Item, Page, Query
from pmq.domain.journal import StoreJournal
from pmq.domain.reads import ALL, Reads
from pmq.domain.routing import Routes
from pmq.redis.keys import Keys
from pmq.store.rows import ReadRows
from pmq.wire.events import EventType

READ_PAGE = 500  # unread items read per page when marking kinds, or everything, read


class CentreArchive(FeedArchive, AmendArchive, Protocol):
    """What the centre reads of storage, off the loop (pmq.reactor.stored.StoredReads)."""

    def messages_by_ids(self, uid: str, ids: Sequence[int]) -> Awaitable[list[Item]]: ...

    def broadcasts_by_ids(self, ids: Sequence[int]) -> Awaitable[list[Item]]: ...

    def read_state(self, uid: str, since_ms: int) -> Awaitable[ReadRows]: ...


class UnknownItem(ValueError):
    """An id that is not an item of the user's feed, where one must be (``before``)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Centre:
    redis: aioredis.Redis
    keys: Keys
    feed: Feed
    reads: Reads
    amends: Amends
    archive: CentreArchive
    events: Events = NO_EVENTS

    async def page(self, query: Query) -> Page:
        """A page of the feed; UnknownItem when ``before`` is not an item of the user's."""
        before = query.before
        if (
            before
            and not await self.items(query.uid, query.groups, [before])
            and not await self.retracted(query.uid, before)
        ):
            raise UnknownItem(str(before))
        return await self.feed.page(query)

    async def read(
        self, uid: str, groups: Sequence[str], ids: list[int] | None, kinds: list[str] | None
    ) -> int:
        """Mark read the items ``ids``, or every item of ``kinds``, or (both None) every item
        of the feed; returns how many were unread. Ids not of the user's feed count nothing."""
        if ids is not None:
            return await self.marked(uid, await self.items(uid, groups, ids), {})
        unread: list[Item] = []
        marks: dict[str, int] = {}
        for kind in kinds if kinds is not None else [None]:
            found = await self._unread(uid, groups, kind)
            if found:
                marks[kind or ALL] = max(int(m["id"]) for m in found)
            unread += found
        return await self.marked(uid, list({m["id"]: m for m in unread}.values()), marks)

    async def marked(self, uid: str, items: list[Item], marks: dict[str, int]) -> int:
        """Reads.mark_read, with message.read for the site (the ids that were unread) queued
        by the same script; returns how many were unread."""
        outbox = self.keys.hook_outbox(self.keys.bucket(uid))
        hook = functools.partial(self.events.queued_by, EventType.READ, outbox)
        return len(await self.reads.mark_read(uid, items, marks, hook))

    async def _unread(self, uid: str, groups: Sequence[str], kind: str | None) -> list[Item]:
        """Every unread item of ``kind`` (None: all) in the feed."""
        found: list[Item] = []
        before = 0
        while True:
            query = Query(uid, groups, kind, before, READ_PAGE, unread_only=True)
            page = await self.feed.page(query)
            found += page.messages
            if page.next is None:
                return found
            before = int(page.next)

    async def items(self, uid: str, groups: Sequence[str], ids: Sequence[int]) -> list[Item]:
        """Those of ``ids`` that are items of the user's feed now, as the user sees them."""
        wanted = [str(i) for i in dict.fromkeys(ids)]
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(self.keys.inbox_bodies(uid), wanted)
        pipe.hmget(self.keys.acked_unstored(uid), wanted)
        pipe.hmget(self.keys.amends(uid), wanted)
        pipe.hmget(self.keys.broadcast_bodies(), wanted)
        hot, acked, amends, broadcasts = await pipe.execute()
        reached = set(groups_of(groups))
        found: dict[str, Item] = {}
        for key, body, amend, broadcast in zip(
            wanted, map(_either, hot, acked), amends, broadcasts, strict=True
        ):
            if amend is not None:  # retracted (b""), or edited
                if amend:
                    found[key] = orjson.loads(amend)
            elif body is not None:
                found[key] = orjson.loads(body)
            elif broadcast is not None and orjson.loads(broadcast).get("group") in reached:
                found[key] = orjson.loads(broadcast)
        others = [
            int(k) for k, a in zip(wanted, amends, strict=True) if k not in found and a is None
        ]
        for m in await self.archive.messages_by_ids(uid, others):
            found[m["id"]] = m
        for m in await self.archive.broadcasts_by_ids([i for i in others if str(i) not in found]):
            if m["group"] in reached and not await self._broadcast_retracted(m["id"]):
                found[m["id"]] = m
        return [found[k] for k in wanted if k in found]

    async def retracted(self, uid: str, item_id: int) -> bool:
        """Whether ``item_id`` was the user's message, or a broadcast, and was retracted."""
        return await self.redis.hget(self.keys.amends(uid), str(item_id)) == b"" or (
            await self._broadcast_retracted(str(item_id))
        )

    async def _broadcast_retracted(self, item_id: Any) -> bool:
        score = await self.redis.zscore(self.keys.broadcast_revoked(), str(item_id))
        return score is not None


def _either(first: bytes | None, second: bytes | None) -> bytes | None:
    return first if first is not None else second


def make_centre(
    redis: aioredis.Redis,
    keys: Keys,
    routes: Routes,
    broadcasts: Broadcasts,
    archive: CentreArchive,
    retention_seconds: int,
    journal: StoreJournal | None = None,
    events: Events = NO_EVENTS,
) -> Centre:
    """A worker's notification centre over its Redis, routes, broadcasts and storage."""
    reads = Reads(redis, keys, retention_seconds, archive.read_state, journal)
    feed = Feed(redis, keys, broadcasts, reads, archive, retention_seconds)
    amends = Amends(redis, keys, routes, archive, retention_seconds, journal)
    return Centre(redis, keys, feed, reads, amends, archive, events)
