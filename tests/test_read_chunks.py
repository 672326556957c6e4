"""A read of many items (msg.read of a long unread feed) goes to Redis a chunk at a time,
oldest first, each chunk raising the marks no higher than its newest item
(pmq.domain.reads.READ_CHUNK): the count stays exact, a read by ids of a later item between
two chunks is counted once, and each chunk queues its own message.read event. On a real
Redis; one script held it 105 ms for 25,000 items before."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pmq.config import WebhooksConfig
from pmq.domain import reads as reads_module
from pmq.domain.events import Events
from pmq.domain.ids import first_id_at
from pmq.domain.reads import ALL, Reads
from pmq.redis.batching import Batcher
from pmq.redis.keys import Keys
from pmq.store.rows import ReadRows
from pmq.wire.events import EventType
from tests.helpers import REDIS_URL

UID = "77"
SITE = WebhooksConfig(url="http://127.0.0.1:9/events", secret="s" * 40)


async def nothing_stored(uid: str, since_ms: int) -> ReadRows:
    return ReadRows(int(uid), [], {})


def unread_items(count: int) -> list[dict[str, Any]]:
    """``count`` items a second apart, newest first as the feed gives them, two kinds."""
    now = int(time.time() * 1000)
    return [
        {"id": str(first_id_at(now - 1000 * n)), "kind": ("notice", "letter")[n % 2]}
        for n in range(count)
    ]


def test_a_read_of_everything_goes_in_chunks_and_counts_each_item_once(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reads_module, "READ_CHUNK", 3)
    items = unread_items(10)
    newest = max(int(m["id"]) for m in items)

    async def scenario() -> None:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            keys = Keys(redis_prefix, 8)
            await client.hset(keys.redis_mark(keys.bucket(UID)), "epoch", "1")  # complete
            reads = Reads(client, keys, 3600, nothing_stored)
            outbox = keys.hook_outbox(keys.bucket(UID))
            events = Events(Batcher(client), keys, SITE)

            def hook() -> tuple[list[str], list[Any]]:
                return events.queued_by(EventType.READ, outbox)

            script, calls = reads._read, []
            by_ids: list[str] = []

            async def counted(**kwargs: Any) -> Any:
                calls.append(kwargs["args"][2])  # the op
                if len(calls) == 2:  # between two chunks another device reads the newest
                    reads._read = script
                    by_ids.extend(await reads.mark_read(UID, [items[0]], {}, hook))
                    reads._read = counted
                return await script(**kwargs)

            await reads.view(UID)  # loaded: every script below is one chunk
            reads._read = counted
            chunked = await reads.mark_read(UID, items, {ALL: newest}, hook)

            assert len(calls) == 4  # 10 items, 3 a script
            marks_asked = [orjson.loads(op)["marks"] for op in calls]
            assert [int(m.get(ALL, 0)) for m in marks_asked[:3]] == sorted(
                int(m["id"]) for m in items
            )[2:9:3]  # each chunk raises the mark to its own newest item
            assert marks_asked[3] == {ALL: str(newest)}
            assert by_ids == [items[0]["id"]]
            assert sorted(chunked + by_ids) == sorted(m["id"] for m in items)
            assert not set(chunked) & set(by_ids)  # counted once
            assert (await reads.view(UID)).mark(None) == newest
            reads._read = script
            assert await reads.mark_read(UID, items, {ALL: newest}, hook) == []
            queued = [orjson.loads(raw) for raw in await client.lrange(outbox, 0, -1)]
            read_events = [e for e in queued if e["type"] == EventType.READ]
            # three chunks and the read by ids; the last chunk, the newest item alone, found it
            # read already and told nothing
            assert len({e["id"] for e in read_events}) == len(read_events) == 4
            told = [i for e in read_events for i in e["data"]["ids"]]
            assert sorted(told) == sorted(m["id"] for m in items)
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_a_read_state_redis_keeps_losing_is_redis_unavailable(redis_prefix: str) -> None:
    """A read whose state Redis lost again at every try (it is being emptied) fails as
    Redis away does, which callers answer 503 (it was a RuntimeError: a 500)."""

    async def scenario() -> None:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            reads = Reads(client, Keys(redis_prefix, 8), 3600, nothing_stored)

            async def lost(**kwargs: Any) -> int:
                return -1  # the script's answer when the state is not loaded

            reads._read = lost
            with pytest.raises(RedisError, match="would not load"):
                await reads.mark_read(UID, unread_items(2), {}, lambda: ([], []))
        finally:
            await client.aclose()

    asyncio.run(scenario())

