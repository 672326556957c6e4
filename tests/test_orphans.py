"""Orphaned work: the taken lists of dead storage writers are taken over by live ones, once,
whatever the node's name or task_workers (owner leases, pmq.tasks.owners).

Real Redis, a real MariaDB database of the test's own behind a TCP proxy the test cuts, and
real nodes killed with -9.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

import orjson
import pytest
import redis

from pmq.redis.keys import Keys
from pmq.tasks.fanout import BroadcastFanout
from pmq.tasks.owners import OwnerLease, legacy_owners
from tests.helpers import (
    Ingest,
    MysqlDatabase,
    Node,
    TcpProxy,
    wait_for,
    wait_for_async,
    ws_client,
)
from tests.test_redis_loss import sqlite_rows
from tests.test_tasks import connect, msg_op

SHARDS = 4


@pytest.fixture
def keys(redis_prefix: str) -> Keys:
    return Keys(redis_prefix)


def test_exactly_one_of_many_live_writers_takes_over_an_expired_owner(keys: Keys) -> None:
    ops = [op for _, op in (msg_op(to=n % 5 + 1) for n in range(1000))]
    queued = [op for _, op in (msg_op(to=9) for _ in range(10))]

    async def scenario() -> list[int]:
        async with connect() as r:
            await r.rpush(keys.store_taken("gone-node:3:pid7", "b0"), *ops)
            await r.zadd(keys.store_owners("b0"), {"gone-node:3:pid7": 1})  # expired long ago
            await r.rpush(keys.store_queue("b0"), *queued)
            live = [OwnerLease(r, keys, f"live:{n}", lease=30) for n in range(6)]
            moved = await asyncio.gather(*(lease.reclaim() for lease in live))
            # In order, ahead of what was queued meanwhile; the dead owner is gone for good.
            assert await r.lrange(keys.store_queue("b0"), 0, -1) == ops + queued
            assert not await r.exists(keys.store_taken("gone-node:3:pid7", "b0"))
            assert not await r.exists(keys.store_owners("b0"))
            return moved

    moved = asyncio.run(scenario())
    assert sorted(moved) == [0, 0, 0, 0, 0, 1000]


def test_a_live_owner_keeps_its_list_until_it_stops_renewing(keys: Keys) -> None:
    ops = [op for _, op in (msg_op(to=2) for _ in range(50))]

    async def scenario() -> None:
        async with connect() as r:
            owner = OwnerLease(r, keys, "busy:1", lease=1.0)
            other = OwnerLease(r, keys, "other:1", lease=1.0)
            assert not await owner.renew()  # the first registration
            await r.rpush(keys.store_taken("busy:1", "b0"), *ops)
            for _ in range(6):  # three leases long, renewed every third of one
                assert await owner.renew()
                assert await other.reclaim() == 0
                await asyncio.sleep(0.5)
            assert await r.llen(keys.store_taken("busy:1", "b0")) == 50
            await wait_for_async(other.reclaim, 5, "the take-over once busy:1 stopped renewing")
            assert await r.lrange(keys.store_queue("b0"), 0, -1) == ops
            assert not await owner.renew()  # it learns that its lease had lapsed

    asyncio.run(scenario())


def test_a_slot_named_list_is_adopted_with_one_lease_then_taken_over(keys: Keys) -> None:
    """A list of the version before owner leases (NODE:INDEX) is registered with a lease
    from its adoption: its owner, if still draining, may give it back meanwhile; then a
    live worker takes it over. Slots without a list are not registered."""
    ops = [op for _, op in (msg_op(to=2) for _ in range(5))]

    async def scenario() -> None:
        async with connect() as r:
            await r.rpush(keys.store_taken("old-node:2", "b0"), *ops)
            live = OwnerLease(r, keys, "new-node:task1:9:aa", lease=1.0)
            legacy = legacy_owners("old-node", 1)
            assert "old-node:2" in legacy
            assert await live.adopt(legacy) == 1
            assert await live.adopt(legacy) == 0  # registered once, its lease not extended
            assert await r.zrange(keys.store_owners("b0"), 0, -1) == [b"old-node:2"]
            assert await live.reclaim() == 0  # within its lease
            await wait_for_async(live.reclaim, 5, "the take-over once the lease expired")
            assert await r.lrange(keys.store_queue("b0"), 0, -1) == ops
            assert not await r.exists(keys.store_owners("b0"), keys.broadcast_owners())

    asyncio.run(scenario())


def test_a_broadcast_taken_by_a_dead_worker_is_published_by_a_live_one(keys: Keys) -> None:
    """The fan-out's taken list is covered by the same lease: a broadcast a killed worker
    took but never published is put back and published by a live task worker."""
    message = {"id": "123456789", "kind": "system", "from": None, "body": {"n": 1}, "ts": 1}
    item = orjson.dumps({"group": "all", "msg": message})

    async def scenario() -> None:
        async with connect() as r:
            await r.rpush(keys.broadcast_taken("gone-node:task1:77:aa"), item)
            await r.zadd(keys.broadcast_owners(), {"gone-node:task1:77:aa": 1})  # expired
            pubsub = r.pubsub()
            await pubsub.ssubscribe(keys.broadcast_channel())
            owners = OwnerLease(r, keys, "live:task1:78:bb", lease=30)
            fanout = BroadcastFanout(r, keys, owners)
            tasks = [asyncio.create_task(owners.run()), asyncio.create_task(fanout.run())]
            try:
                await wait_for_async(lambda: fanout.published == 1, 20, "the broadcast published")
                for _ in range(10):  # the subscription's confirmation comes first
                    heard = await pubsub.get_sharded_message(True, timeout=1)
                    if heard is not None:
                        break
                assert heard is not None and b"123456789" in heard["data"]
                assert not await r.exists(
                    keys.broadcast_queue(),
                    keys.broadcast_taken("gone-node:task1:77:aa"),
                    keys.broadcast_taken("live:task1:78:bb"),
                )
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await pubsub.aclose()

    asyncio.run(scenario())


def taken_lists(client: redis.Redis, keys: Keys) -> dict[str, int]:
    """Every storage taken list under this prefix with its length."""
    pattern = keys.store_taken("*", "b0").replace("{", "\\{").replace("}", "\\}")
    return {key: int(client.llen(key)) for key in client.scan_iter(pattern, count=1000)}


@pytest.mark.e2e
@pytest.mark.mysql
def test_batch_of_a_killed_task_worker_is_stored_once_by_a_renamed_smaller_node(
    make_node: Callable[..., Node], redis_client: redis.Redis
) -> None:
    """A task worker killed with -9 while storage is cut leaves its batch taken; its whole
    node dies; the node comes back under another name with fewer task workers (a new
    container). Every accepted message reaches storage exactly once."""
    db = MysqlDatabase()
    proxy = TcpProxy(db.host, db.port)
    storage = {"url": db.url(proxy.port), "shards": SHARDS}
    try:
        first = make_node(server={"task_workers": 2}, storage=storage)
        assert first.ctl("db", "init").returncode == 0
        first.start()
        keys = Keys(first.prefix)
        site = Ingest(first)
        sent: list[int] = []
        code, reply = site.publish({"to": 1, "kind": "notice", "body": {"n": 0}})
        assert code == 202, reply
        sent += map(int, reply["data"]["ids"])
        wait_for(lambda: db.message_ids(SHARDS) == sent, 20, "the first row stored")
        proxy.cut()
        for n in range(1, 301):
            code, reply = site.publish({"to": [n % 7 + 1, n % 5 + 10], "kind": "notice",
                                        "body": {"n": n}})
            assert code == 202, reply
            sent += map(int, reply["data"]["ids"])
        site.close()
        lists = wait_for(lambda: {k: n for k, n in taken_lists(redis_client, keys).items() if n},
                         20, "a batch taken by a task worker")
        # The batch is stuck in its writer's taken list while storage is cut: kill -9 the
        # task workers, then the whole container.
        for proc in first.processes():
            if "task worker" in proc.cmdline()[0]:
                os.kill(proc.pid, signal.SIGKILL)
        first.kill_all()
        assert sum(taken_lists(redis_client, keys).values()) >= sum(lists.values())
        proxy.restore()

        second = make_node(server={"task_workers": 1}, storage=storage).start()
        assert second.name != first.name
        wait_for(lambda: len(db.message_ids(SHARDS)) >= len(sent), 60, "every message stored")
        stored = db.message_ids(SHARDS)
        assert sorted(stored) == sorted(sent)  # each exactly once
        # The writer empties its taken list just after the write commits.
        wait_for(lambda: not any(taken_lists(redis_client, keys).values()), 10,
                 "the taken lists to empty")

        def only_the_second_node_registered() -> bool:
            owners = redis_client.zrange(keys.store_owners("b0"), 0, -1)
            return all(o.startswith(f"{second.name}:") for o in owners)

        # The first node's writers leave the registry as their leases run out.
        wait_for(only_the_second_node_registered, 30, "the dead owners to be unregistered")
    finally:
        proxy.close()
        db.drop()


@pytest.mark.e2e
def test_lists_of_the_version_before_owner_leases_are_taken_over_by_the_node(
    make_node: Callable[..., Node], redis_client: redis.Redis
) -> None:
    """Before owner leases a task worker named its taken lists by its slot, NODE:INDEX, and
    no registry listed them: after a kill -9 they waited forever. The node started again
    under its name adopts them, slots beyond its task_workers included: every item reaches
    storage, and the broadcast is published."""
    node = make_node()
    keys = Keys(node.prefix)
    ops = dict(msg_op(to=n % 3 + 1) for n in range(30))
    items = list(ops.values())
    redis_client.rpush(keys.store_taken(f"{node.name}:1", "b0"), *items[:20])
    redis_client.rpush(keys.store_taken(f"{node.name}:3", "b0"), *items[20:])
    message = {"id": "987654321", "kind": "system", "from": None, "body": {"n": 1}, "ts": 1}
    broadcast = orjson.dumps({"group": "all", "msg": message})
    redis_client.rpush(keys.broadcast_taken(f"{node.name}:1"), broadcast)
    node.start()
    with ws_client(node, 5) as user:
        assert user.next("push", timeout=40)["msg"]["id"] == "987654321"
    wait_for(lambda: set(sqlite_rows(node)) == set(ops), 40, "every item stored")
    left = [
        keys.store_taken(f"{node.name}:1", "b0"),
        keys.store_taken(f"{node.name}:3", "b0"),
        keys.broadcast_taken(f"{node.name}:1"),
        keys.store_queue("b0"),
        keys.store_dead("b0"),
    ]
    assert not redis_client.exists(*left)
    owners = redis_client.zrange(keys.store_owners("b0"), 0, -1)
    assert not [o for o in owners if o in (f"{node.name}:1", f"{node.name}:3")]
