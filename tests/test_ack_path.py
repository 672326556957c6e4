"""msg.ack's Redis work goes on the socket worker's lean connection (pmq.redis.batching),
as a publish's does: the acks of one loop iteration share one write, each still gets its own
answer, and an ack never waits for a WAITAOF (with redis.durability = "aof"), since an ack
Redis lost comes again with the next replay."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
import uvloop

from pmq.domain.broadcast import Broadcasts
from pmq.domain.ids import IdGenerator
from pmq.domain.inbox import Inbox
from pmq.redis.batching import Batcher
from pmq.redis.durability import Confirm, NotDurable
from pmq.redis.keys import Keys
from tests.helpers import REDIS_URL
from tests.test_batching import writes  # noqa: F401  # the fixture

USERS = ["31", "32", "33"]


def test_the_acks_of_one_iteration_share_one_write_each_with_its_answer(
    redis_prefix: str,
    writes: list[int],  # noqa: F811
) -> None:
    async def scenario() -> tuple[list[int], list[int], int | None, list[int]]:
        client = aioredis.Redis.from_url(REDIS_URL)
        keys = Keys(redis_prefix)
        batch = Batcher(client)
        ids = IdGenerator(1)
        inbox = Inbox(client, keys, ids, 86400, 86400, batch)
        broadcasts = Broadcasts(client, keys, ids, 60, 20, 86400, batch=batch)
        try:
            shout = await broadcasts.publish("all", "system", {"n": 0}, None)
            sent = [await inbox.publish([uid], "notice", None, {"n": 1}) for uid in USERS]
            unicast = [int(a.ids[0]) for a in sent]
            broadcast_id = int(shout.id)
            writes.clear()

            async def ack(uid: str, message_id: int) -> int:  # as pmq.handlers.msg.ack
                known = await broadcasts.acknowledge(uid, (), [message_id])
                acked = await inbox.ack(uid, [i for i in [message_id] if i not in known])
                return len(known) + len(acked.hot) + acked.cold

            counts = await asyncio.gather(
                *(ack(uid, m) for uid, m in zip(USERS, unicast, strict=True)),
                ack(USERS[0], broadcast_id),
            )
            mark = await client.get(keys.broadcast_mark(USERS[0]))
            left = [await client.zcard(keys.inbox(uid)) for uid in USERS]
            return list(counts), list(writes), int(mark) if mark else None, left
        finally:
            batch.close()
            await client.aclose()

    counts, seen, mark, left = uvloop.run(scenario())
    assert counts == [1, 1, 1, 1]
    assert left == [0, 0, 0]  # each ack removed its own message
    assert mark is not None  # the broadcast's ack moved the user's watermark
    # the four HMGETs in one write, then the three inbox acks in one and the mark's script
    assert seen[:2] == [4, 4]


def test_an_ack_never_waits_for_a_confirmation(redis_prefix: str) -> None:
    """With a confirm the shared Redis cannot give (no AOF here), a publish fails NotDurable
    while an ack still goes through."""

    async def scenario() -> tuple[BaseException | None, int]:
        client = aioredis.Redis.from_url(REDIS_URL)
        keys = Keys(redis_prefix)
        batch = Batcher(client, Confirm(timeout_ms=100))
        inbox = Inbox(client, keys, IdGenerator(1), 86400, 86400, batch)
        message_id = 0
        try:
            try:
                accepted = await inbox.publish(["41"], "notice", None, {"n": 1})
                message_id = int(accepted.ids[0])
                refused = None
            except NotDurable as exc:  # applied, not confirmed: the message is there
                refused = exc
                message_id = int((await client.zrange(keys.inbox("41"), 0, 0))[0])
            acked = await inbox.ack("41", [message_id])
            return refused, len(acked.hot)
        finally:
            batch.close()
            await client.aclose()

    refused, hot = uvloop.run(scenario())
    if refused is None:
        pytest.skip("this Redis confirms AOF fsyncs: nothing to show")
    assert hot == 1
