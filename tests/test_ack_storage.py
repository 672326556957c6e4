"""An ack of a message storage holds: its row stays unacked until the storage writer takes the
ack from the queue, and meanwhile msg.pull and replays must not hand the message out again
(SPEC 3: acked messages leave the inbox, for all devices). inbox_ack notes each such id in the
user's set of acks queued (pmq.redis.keys.Keys.acks_queued), Inbox.pending reads storage past
them, and the writer removes them once storage has the ack."""

from __future__ import annotations

import os
import signal
from typing import Any

import redis
import redis.asyncio as aioredis
import uvloop

from pmq.domain.ids import IdGenerator
from pmq.domain.inbox import Inbox
from pmq.redis.batching import Batcher
from pmq.redis.keys import Keys
from tests.helpers import REDIS_URL, Ingest, wait_for, ws_client

UID = "61"


def stored_message(message_id: int) -> dict[str, Any]:
    return {"id": str(message_id), "kind": "notice", "from": None, "to": UID, "body": {}, "ts": 1}


def test_pending_reads_storage_past_the_acks_still_queued(redis_prefix: str) -> None:
    """205 messages only storage holds; the first 200 acked: a page of 201 from the start
    holds the 5 others, read past the acked ones (storage answers them until the writer
    has the acks)."""
    stored = [stored_message(1000 + n) for n in range(205)]

    async def cold(uid: str, after: int, limit: int) -> list[dict[str, Any]]:
        return [m for m in stored if int(m["id"]) > after][:limit]

    async def scenario() -> tuple[int, list[str], int]:
        client = aioredis.Redis.from_url(REDIS_URL)
        keys = Keys(redis_prefix)
        batch = Batcher(client)
        inbox = Inbox(client, keys, IdGenerator(1), 86400, 86400, batch)
        try:
            acked = await inbox.ack(UID, [int(m["id"]) for m in stored[:200]])
            pending = await inbox.pending(UID, cold, 0, 201)
            queued = await client.scard(keys.acks_queued(UID))
            return acked.cold, [m["id"] for m in pending], queued
        finally:
            batch.close()
            await client.aclose()

    cold_acked, pending, queued = uvloop.run(scenario())
    assert cold_acked == 200
    assert pending == [m["id"] for m in stored[200:]]
    assert queued == 200


def test_a_hot_ack_is_noted_while_reads_may_go_to_storage(redis_prefix: str) -> None:
    """A message acked from Redis has its row in storage unacked too until the writer takes
    the ack; while the user's reads may go to storage (here: the bucket not known complete)
    its id waits in the set as well."""

    async def scenario() -> tuple[bool, list[str]]:
        client = aioredis.Redis.from_url(REDIS_URL)
        keys = Keys(redis_prefix)
        batch = Batcher(client)
        inbox = Inbox(client, keys, IdGenerator(1), 86400, 86400, batch)
        try:
            accepted = await inbox.publish([UID], "notice", None, {"n": 1})
            message_id = accepted.ids[0]
            acked = await inbox.ack(UID, [int(message_id)])
            row = stored_message(int(message_id))

            async def cold(uid: str, after: int, limit: int) -> list[dict[str, Any]]:
                return [row] if int(row["id"]) > after else []

            pending = await inbox.pending(UID, cold, 0, 10)
            assert acked.hot == {int(message_id)}
            noted = await client.sismember(keys.acks_queued(UID), message_id)
            return bool(noted), [m["id"] for m in pending]
        finally:
            batch.close()
            await client.aclose()

    noted, pending = uvloop.run(scenario())
    assert noted
    assert pending == []


def test_an_acked_stored_message_is_neither_pulled_nor_replayed_before_storage_has_the_ack(
    make_node: Any, redis_client: redis.Redis, redis_prefix: str
) -> None:
    """The storage writer held (its task worker stopped) after the messages moved to storage:
    the ack answers, and the messages are gone from msg.pull and from the next replay; once
    the writer runs again it acks the rows and the note goes."""
    node = make_node(inbox={"hot_seconds": 1, "sweep_seconds": 1}).start()
    keys = Keys(redis_prefix)
    site = Ingest(node)
    try:
        ids = [
            site.publish({"to": 62, "kind": "notice", "body": {"n": n}})[1]["data"]["ids"][0]
            for n in range(3)
        ]
    finally:
        site.close()
    wait_for(
        lambda: redis_client.zcard(keys.inbox("62")) == 0 and redis_client.exists(keys.cold("62")),
        30,
        "the messages to move from Redis to storage",
    )
    [task] = node.workers("task")
    os.kill(task["pid"], signal.SIGSTOP)
    try:
        with ws_client(node, 62) as user:
            assert [m["id"] for m in user.pushes(3)] == ids
            assert user.request("msg.ack", {"ids": ids})["data"] == {"acked": 3}
            assert user.request("msg.pull", {})["data"] == {"messages": []}
        with ws_client(node, 62) as user:
            assert user.request("msg.pull", {})["data"] == {"messages": []}
            assert not [f for f in user.kept if f.get("type") == "push"], user.kept
        assert redis_client.scard(keys.acks_queued("62")) == 3
    finally:
        os.kill(task["pid"], signal.SIGCONT)
    wait_for(lambda: redis_client.scard(keys.acks_queued("62")) == 0, 30, "the writer's acks")
