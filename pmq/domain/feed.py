"""A user's notification centre feed: their messages, acked or not, and the broadcasts to
their groups, newest first, within retention, with their read state (docs/notification-centre.md).

A page merges five sources below a cursor id: the hot inbox (Redis: unacked messages not yet
moved to storage), the messages acked before the writer stored them (Redis, for that moment),
the stored messages (acked or not), and the broadcasts in Redis and in storage (after Redis
lost data, storage still has them). Each source is asked for as many items as the page
still wants; the merge is exact down to the deepest id every source that
had more answered for, and the next round starts there, so no item is skipped or repeated
whichever source holds it (one held by two is listed once). Storage's rows are corrected by
what Redis knows and the writer may not have written yet: the user's amends (retracted
messages left out, edited ones with their new body) and the broadcasts retracted.

An unread-only page leaves out what is read (pmq.domain.reads) and starts no lower than the
read mark of the kind asked, so a user who read everything pages through nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol, cast

import orjson
import redis.asyncio as aioredis

from pmq.domain.broadcast import Broadcasts, groups_of
from pmq.domain.ids import first_id_at, timestamp_ms
from pmq.domain.reads import Reads
from pmq.redis.keys import Keys
from pmq.wire.client import MAX_ID, Kind

SYSTEM = Kind.SYSTEM.value

Item = dict[str, Any]


class FeedArchive(Protocol):
    """Storage's part of the feed, read off the event loop (pmq.reactor.stored)."""

    def feed(
        self, uid: str, before: int, after: int, kind: str | None, limit: int
    ) -> Awaitable[list[Item]]: ...

    def feed_broadcasts(
        self, groups: Sequence[str], before: int, after: int, kind: str | None, limit: int
    ) -> Awaitable[list[Item]]: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Query:
    """What a page asks: whose, which kind (None: all), below which id, how many, and
    whether only the unread."""

    uid: str
    groups: Sequence[str]
    kind: str | None = None
    before: int = 0
    limit: int = 20
    unread_only: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Page:
    messages: list[Item]  # newest first, each with "read"
    next: str | None  # the id to pass as ``before`` for the next page, None at the end


@dataclasses.dataclass(slots=True)
class _Round:
    """One source's answer below the cursor: its items, and the id it is complete down to
    (None: it holds nothing further down)."""

    items: list[Item]
    bound: int | None


class Feed:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        broadcasts: Broadcasts,
        reads: Reads,
        archive: FeedArchive,
        retention_seconds: int,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.broadcasts = broadcasts
        self.reads = reads
        self.archive = archive
        self.retention_ms = retention_seconds * 1000

    async def page(self, query: Query) -> Page:
        """One page of the user's feed (module docstring). Raises StorageError when storage
        does not answer."""
        view = await self.reads.view(query.uid)
        floor = first_id_at(int(time.time() * 1000) - self.retention_ms)
        if query.unread_only:
            floor = max(floor, view.mark(query.kind))
        amends = {
            int(k): v
            for k, v in cast(
                dict[bytes, bytes], await self.redis.hgetall(self.keys.amends(query.uid))
            ).items()
        }
        cursor, found = query.before or MAX_ID, cast(list[Item], [])
        while len(found) <= query.limit:
            items, bound = await self._round(query, cursor, floor, query.limit + 1, amends)
            if query.unread_only:
                read = await self.reads.read_among(query.uid, view, items)
                items = [m for m in items if int(m["id"]) not in read]
            found += items
            if bound is None:
                break
            cursor = bound
        messages = found[: query.limit]
        read = await self.reads.read_among(query.uid, view, messages)
        for m in messages:
            m["read"] = int(m["id"]) in read
        more = len(found) > query.limit
        return Page(messages, messages[-1]["id"] if more and messages else None)

    async def _round(
        self, query: Query, cursor: int, floor: int, want: int, amends: dict[int, bytes]
    ) -> tuple[list[Item], int | None]:
        """The items of every source with ``floor`` < id < ``cursor`` down to the deepest
        id all sources answered for, newest first, and that id (None: no source has more)."""
        sources = [
            self._hot(query.uid, cursor, floor, want),
            self._acked(query.uid, cursor, floor),
            self._stored(query, cursor, floor, want, amends),
        ]
        if query.kind in (None, SYSTEM):  # broadcasts are in the feed of all and of system
            sources.append(self._broadcasts(query, cursor, floor, want))
        rounds = await asyncio.gather(*sources)
        bound = max((r.bound for r in rounds if r.bound is not None), default=None)
        merged: dict[int, Item] = {}
        for r in rounds:
            for m in r.items:
                merged.setdefault(int(m["id"]), m)
        ids = sorted((i for i in merged if bound is None or i >= bound), reverse=True)
        items = [merged[i] for i in ids]
        if query.kind is not None:
            items = [m for m in items if m["kind"] == query.kind]
        return items, bound

    def _below_on(self, pipe: Any, key: str, cursor: int, floor: int, want: int) -> None:
        """Queue the reads of the ids of ZSET ``key`` (scored by the ids' millisecond)
        below ``cursor``: the cursor's own millisecond whole (a few ids), then ``want``
        below it, newest first; _below() reads their replies."""
        at = timestamp_ms(cursor)
        pipe.zrangebyscore(key, at, at)
        pipe.zrevrangebyscore(key, f"({at}", timestamp_ms(floor), start=0, num=want)

    @staticmethod
    def _below(
        same: list[bytes], older: list[bytes], cursor: int, floor: int, want: int
    ) -> tuple[list[int], int | None]:
        """The ids below ``cursor`` and above ``floor``, newest first, and the bound they
        are complete down to (None: none further down)."""
        ids = sorted((i for i in map(int, same) if i < cursor), reverse=True)
        ids += [i for i in map(int, older) if i > floor]
        return ids, int(older[-1]) if len(older) == want else None

    async def _hot(self, uid: str, cursor: int, floor: int, want: int) -> _Round:
        """The hot inbox's messages below ``cursor``."""
        pipe = self.redis.pipeline(transaction=False)
        self._below_on(pipe, self.keys.inbox(uid), cursor, floor, want)
        same, older = await pipe.execute()
        ids, bound = self._below(same, older, cursor, floor, want)
        if not ids:
            return _Round([], bound)
        bodies = await self.redis.hmget(self.keys.inbox_bodies(uid), [str(i) for i in ids])
        items = [orjson.loads(b) for b in cast(list[bytes | None], bodies) if b is not None]
        return _Round(items, bound)

    async def _acked(self, uid: str, cursor: int, floor: int) -> _Round:
        """The messages acked before storage had them (a few, for a moment: all of them)."""
        held = cast(dict[bytes, bytes], await self.redis.hgetall(self.keys.acked_unstored(uid)))
        return _Round([orjson.loads(b) for i, b in held.items() if floor < int(i) < cursor], None)

    async def _stored(
        self, query: Query, cursor: int, floor: int, want: int, amends: dict[int, bytes]
    ) -> _Round:
        rows = await self.archive.feed(query.uid, cursor, floor, query.kind, want)
        items = []
        for m in rows:
            amend = amends.get(int(m["id"]))
            if amend is None:
                items.append(m)
            elif amend:  # edited: the new body
                items.append(orjson.loads(amend))
        # Bound by the rows read, not those kept: a page of retracted rows has more below.
        return _Round(items, int(rows[-1]["id"]) if len(rows) == want else None)

    async def _broadcasts(self, query: Query, cursor: int, floor: int, want: int) -> _Round:
        """The broadcasts to the user's groups, from Redis and storage, not retracted."""
        groups = groups_of(query.groups)
        pipe = self.redis.pipeline(transaction=False)
        for group in groups:
            self._below_on(pipe, self.keys.broadcasts(group), cursor, floor, want)
        replies, stored = await asyncio.gather(
            pipe.execute(),
            self.archive.feed_broadcasts(groups, cursor, floor, query.kind, want),
        )
        parts = [
            self._below(replies[i], replies[i + 1], cursor, floor, want)
            for i in range(0, len(replies), 2)
        ]
        bounds = [b for _, b in parts if b is not None]
        if len(stored) == want:
            bounds.append(int(stored[-1]["id"]))
        bound = max(bounds, default=None)
        ids = sorted({i for found, _ in parts for i in found if bound is None or i >= bound})
        items = {int(m["id"]): m for m in await self.broadcasts.bodies(ids)} if ids else {}
        stored = [m for m in stored if bound is None or int(m["id"]) >= bound]
        if stored:
            revoked = await self.redis.zmscore(
                self.keys.broadcast_revoked(), [m["id"] for m in stored]
            )
            for m, score in zip(stored, revoked, strict=True):
                if score is None:
                    items.setdefault(int(m["id"]), m)
        return _Round(list(items.values()), bound)
