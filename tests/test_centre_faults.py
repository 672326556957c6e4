"""The notification centre through faults (docs/notification-centre.md, docs/reliability.md):
nothing read comes back unread and nothing retracted comes back, after a kill -9 of every
worker, and after Redis is emptied while the read state, retractions and edits were still
on the storage queue (storage locked meanwhile).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from pmq.domain.amend import Amends
from pmq.domain.broadcast import Broadcasts
from pmq.domain.ids import IdGenerator
from pmq.domain.routing import Routes
from pmq.redis.keys import Keys
from pmq.tasks.fanout import BroadcastFanout
from pmq.tasks.owners import OwnerLease
from tests.helpers import REDIS_URL, Ingest, Node, RedisServer, wait_for, ws_client
from tests.test_redis_loss import epoch_of, publish, restart, storage_locked


def count(node: Node, sql: str) -> Any:
    with sqlite3.connect(node.tmp / "pmq.db") as db:
        return db.execute(sql).fetchone()[0]


def check(node: Node, ids: list[str]) -> None:
    """ids[0:3] read, ids[3:5] retracted, ids[5] edited, as a new connection sees them."""
    with ws_client(node, 7) as user:
        replayed = [m for m in user.pushes(8)]
        assert [m["id"] for m in replayed] == [*ids[:3], *ids[5:]]
        assert replayed[3]["body"] == {"edited": True}
        assert not [f for f in user.quiet(0.3) if f.get("type") == "push"]
        reply = user.request("msg.list", {"unread_only": True})
        assert [m["id"] for m in reply["data"]["messages"]] == ids[:4:-1]
        reply = user.request("msg.list")
        assert [(m["id"], m["read"]) for m in reply["data"]["messages"]] == [
            *((i, False) for i in ids[:4:-1]),
            *((i, True) for i in ids[2::-1]),
        ]


def kill_9(node: Node, *kinds: str) -> None:
    """kill -9 every worker of ``kinds``; returns once the master has respawned them all."""
    before = {w["pid"] for kind in kinds for w in node.workers(kind)}
    for pid in before:
        os.kill(pid, signal.SIGKILL)

    def respawned() -> bool:
        workers = [w for kind in kinds for w in node.workers(kind)]
        return len(workers) == len(before) and all(
            w["ready"] and w["pid"] not in before for w in workers
        )

    wait_for(respawned, 30, "every worker respawned")


def change(node: Node, site: Ingest, ids: list[str]) -> None:
    with ws_client(node, 7) as user:
        assert user.request("msg.read", {"ids": ids[:3]})["data"] == {"read": 3}
    for gone in ids[3:5]:
        assert site.call("DELETE", f"/api/v1/messages/{gone}")[0] == 200
    assert site.call("PATCH", f"/api/v1/messages/{ids[5]}", {"body": {"edited": True}})[0] == 200


@pytest.mark.e2e
def test_reads_and_retractions_survive_kill_9_of_every_worker(
    make_node: Callable[..., Node],
) -> None:
    node = make_node().start()
    site = Ingest(node)
    ids = publish(site, 7, 10, "kept")
    change(node, site, ids)
    kill_9(node, "socket", "task")
    check(node, ids)
    wait_for(lambda: count(node, "SELECT COUNT(*) FROM pmq_read") == 3, 20, "reads stored")
    assert count(node, "SELECT COUNT(*) FROM pmq_msg_3 WHERE revoked = 1") == 2
    site.close()


@pytest.mark.e2e
def test_reads_and_retractions_survive_redis_emptied_before_storage_had_them(
    make_node: Callable[..., Node], own_redis: RedisServer, redis_prefix: str
) -> None:
    node = make_node(redis={"url": own_redis.url}).start()
    wait_for(lambda: epoch_of(own_redis, redis_prefix) == 1, 20, "the first epoch")
    site = Ingest(node)
    ids = publish(site, 7, 10, "kept")
    wait_for(lambda: count(node, "SELECT COUNT(*) FROM pmq_msg_3") == 10, 20, "stored")
    with storage_locked(node):
        change(node, site, ids)
        restart(own_redis)  # empty: the storage queue goes with the rest
    wait_for(lambda: "queued again" in node.log(), 30, "the journal to queue them again")
    wait_for(lambda: count(node, "SELECT COUNT(*) FROM pmq_read") == 3, 30, "reads stored")
    wait_for(
        lambda: count(node, "SELECT COUNT(*) FROM pmq_msg_3 WHERE revoked = 1") == 2,
        30,
        "retractions stored",
    )
    check(node, ids)  # while the bucket may not be complete again: read from storage
    wait_for(lambda: epoch_of(own_redis, redis_prefix) == 2, 20, "a new epoch")
    check(node, ids)
    site.close()


def test_a_broadcast_retracted_while_queued_is_never_published(redis_prefix: str) -> None:
    """The task worker's fan-out skips a broadcast retracted before it took it."""

    class NoArchive:
        async def find_message(self, message_id: int) -> None:
            return None

        async def find_broadcast(self, broadcast_id: int) -> None:
            return None

    async def scenario() -> int:
        client = aioredis.Redis.from_url(REDIS_URL)
        keys = Keys(redis_prefix)
        try:
            broadcasts = Broadcasts(client, keys, IdGenerator(1), 900, 20, 3600)
            routes = Routes(client, keys, "w", 25)
            amends = Amends(client, keys, routes, NoArchive(), 3600)
            fanout = BroadcastFanout(client, keys, OwnerLease(client, keys, "t", 10))
            gone = await broadcasts.publish("all", "system", {"n": 1}, None)
            await broadcasts.publish("all", "system", {"n": 2}, None)
            assert await amends.revoke_broadcast(int(gone.id))
            for item in await client.lrange(keys.broadcast_queue(), 0, -1):
                await fanout.handle(item)
            return fanout.published
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == 1  # the other one


@pytest.mark.e2e
def test_reads_survive_their_state_loaded_before_the_writer_had_them_again(
    make_node: Callable[..., Node], own_redis: RedisServer, redis_prefix: str
) -> None:
    # Redis emptied while a read waited on the storage queue; the journal queued it again,
    # but the recovery made the bucket complete again before the writer wrote it (here: the
    # queue held aside), and a msg.list loaded the read state from storage then.
    node = make_node(redis={"url": own_redis.url}).start()
    wait_for(lambda: epoch_of(own_redis, redis_prefix) == 1, 20, "the first epoch")
    kill_9(node, "socket")  # respawned, their journals see the epoch at their first look
    site = Ingest(node)
    ids = publish(site, 7, 10, "kept")
    wait_for(lambda: count(node, "SELECT COUNT(*) FROM pmq_msg_3") == 10, 20, "stored")
    client = redis.Redis.from_url(own_redis.url)
    queue = Keys(redis_prefix).store_queue()
    with storage_locked(node):
        publish(site, 8, 1, "taken")  # the writer takes it and waits on the lock
        wait_for(lambda: client.llen(queue) == 0, 20, "the writer to take its batch")
        with ws_client(node, 7) as user:
            assert user.request("msg.read", {"ids": ids[:3]})["data"] == {"read": 3}
        restart(own_redis)  # empty: the queued read goes with the rest
        wait_for(
            lambda: any(b'"op":"read"' in op for op in client.lrange(queue, 0, -1)),
            30,
            "the journal of the worker that read to queue the read again",
        )
        pipe = client.pipeline()
        pipe.lrange(queue, 0, -1)
        pipe.delete(queue)
        held = pipe.execute()[0]
        wait_for(
            lambda: client.zcard(Keys(redis_prefix).read_ids("7")) == 3,
            10,
            "the journal to put the reads back in Redis",
        )
    wait_for(lambda: epoch_of(own_redis, redis_prefix) == 2, 20, "a new epoch")
    with ws_client(node, 7) as user:  # read state loaded from storage, which has no read
        reply = user.request("msg.list")
        assert [(m["id"], m["read"]) for m in reply["data"]["messages"]] == [
            *((i, False) for i in ids[:2:-1]),
            *((i, True) for i in ids[2::-1]),
        ]
    client.rpush(queue, *held)
    wait_for(lambda: count(node, "SELECT COUNT(*) FROM pmq_read") == 3, 30, "reads stored")
    with ws_client(node, 7) as user:
        reply = user.request("msg.list", {"unread_only": True})
        assert [m["id"] for m in reply["data"]["messages"]] == ids[:2:-1]
    client.close()
    site.close()
