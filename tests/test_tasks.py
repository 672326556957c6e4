"""The task worker's storage jobs against real Redis, SQLite and MariaDB.

Every test has its own Redis key prefix (its keys removed afterwards) and its own SQLite file
or throw-away MariaDB database. Coroutines run under asyncio.run in plain test functions;
conditions are polled with deadlines, never slept for.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from pmq.config import CsConfig, StorageConfig
from pmq.domain.broadcast import Broadcasts
from pmq.domain.chat import Chat
from pmq.domain.ids import IdGenerator
from pmq.domain.inbox import Inbox
from pmq.domain.routing import Routes
from pmq.redis.keys import Keys
from pmq.store import Store, StoredMessage, open_store
from pmq.store.base import RETENTION_TABLES, SCHEMA_VERSION
from pmq.store.rows import StoredBroadcast, StoredCsMessage, StoredCsSession
from pmq.tasks.deadletter import DeadLetter
from pmq.tasks.owners import OwnerLease
from pmq.tasks.sweep import Sweeper
from pmq.tasks.writer import StorageWriter
from pmq.wire import storeops
from pmq.wire.client import Message
from tests.helpers import (
    REDIS_URL,
    Ingest,
    MysqlDatabase,
    Node,
    TcpProxy,
    wait_for,
    wait_for_async,
)

SHARDS = 4
OWNER = "test-node:1"
RETENTION = 3600
IDS = IdGenerator(4000)


# Fixtures and helpers ------------------------------------------------------------------


def make_store(url: str) -> Store:
    store = open_store(StorageConfig(url=url, shards=SHARDS, pool_size=2))
    store.init_schema()
    return store


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh store with its schema: SQLite in tmp_path, or a throw-away MariaDB database."""
    db = MysqlDatabase() if request.param == "mysql" else None
    made = make_store(db.url() if db else f"sqlite:///{tmp_path}/pmq.db")
    yield made
    made.close()
    if db:
        db.drop()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    made = make_store(f"sqlite:///{tmp_path}/pmq.db")
    yield made
    made.close()


@pytest.fixture
def mysql_db() -> Iterator[MysqlDatabase]:
    db = MysqlDatabase()
    yield db
    db.drop()


@pytest.fixture
def keys(redis_prefix: str) -> Keys:
    return Keys(redis_prefix)


def now_ms() -> int:
    return int(time.time() * 1000)


def msg_op(to: int, sender: int | None = 42, ts: int | None = None) -> tuple[int, bytes]:
    """A new message id and its storage op, built as Inbox.publish builds it."""
    message_id = IDS.next()
    message = Message(
        message_id,
        "comment",
        None if sender is None else str(sender),
        str(to),
        {"n": message_id, "text": "héllo"},
        now_ms() if ts is None else ts,
    )
    return message_id, storeops.encode_message(message.encode())


def ack_op(uid: int, ids: list[int]) -> bytes:
    return storeops.encode_ack(str(uid), ids)


def stored(message_id: int, uid: int, ts: int | None = None) -> StoredMessage:
    ts = now_ms() if ts is None else ts
    return StoredMessage(message_id, uid, "comment", 42, "{}", ts)


@asynccontextmanager
async def connect() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


LEASE = 1.0  # seconds: a writer of these tests is taken over this soon after it stops


def new_writer(r: aioredis.Redis, keys: Keys, store: Store, owner: str = OWNER) -> StorageWriter:
    lease = OwnerLease(r, keys, owner, LEASE)
    return StorageWriter(r, keys, store, lease, asyncio.to_thread, batch=500)


async def orphan(
    r: aioredis.Redis, keys: Keys, owner: str, ops: list[bytes], tag: str = "b0"
) -> None:
    """Leave ``ops`` in the taken list of writer ``owner``, dead: its lease expired long ago."""
    await r.rpush(keys.store_taken(owner, tag), *ops)
    await r.zadd(keys.store_owners(tag), {owner: 1})


@asynccontextmanager
async def running(writer: StorageWriter) -> AsyncIterator[asyncio.Task[None]]:
    """The writer running as a task beside its lease, both cancelled (a fast stop) on the
    way out."""
    task = asyncio.create_task(writer.run())
    lease = asyncio.create_task(writer.owners.run())
    try:
        yield task
    finally:
        task.cancel()
        lease.cancel()
        await asyncio.gather(task, lease, return_exceptions=True)


def caught_up(
    r: aioredis.Redis, keys: Keys, store: Store, rows: int, owner: str = OWNER
) -> Callable[[], Awaitable[bool]]:
    """True once the queue and the taken list are empty and the store holds ``rows``."""

    async def check() -> bool:
        return (
            await r.llen(keys.store_queue()) == 0
            and not await r.exists(keys.store_taken(owner))
            and await asyncio.to_thread(store.count_messages) == rows
        )

    return check


# The storage writer --------------------------------------------------------------------


def test_writer_stores_1000_queued_messages(store: Store, keys: Keys) -> None:
    ops = [msg_op(to=1 + n % 10, sender=None if n % 3 else 42) for n in range(1000)]

    async def scenario() -> None:
        async with connect() as r:
            await r.rpush(keys.store_queue(), *[op for _, op in ops])
            writer = new_writer(r, keys, store)
            async with running(writer):
                await wait_for_async(caught_up(r, keys, store, 1000), 20, "1,000 rows in the store")
                await wait_for_async(
                    lambda: writer.batches == 2, 20, "the second batch to be counted"
                )
            assert (writer.written, writer.batches, writer.errors) == (1000, 2, 0)
            assert writer.stats() == {
                "written": 1000, "acked": 0, "errors": 0, "dead": 0, "reclaimed": 0
            }

    asyncio.run(scenario())
    first_id = ops[0][0]
    [row] = [m for m in store.unacked(1) if m.id == first_id]
    assert (row.uid, row.kind, row.from_uid) == (1, "comment", 42)
    assert orjson.loads(row.body) == {"n": first_id, "text": "héllo"}
    assert sorted(m.id for m in store.unacked(2)) == sorted(i for i, _ in ops[1::10])
    assert store.unacked(2)[0].from_uid is None


def test_writer_lingers_after_a_small_batch_so_a_stream_is_written_in_few(
    sqlite_store: Store, keys: Keys
) -> None:
    ops = [op for _, op in (msg_op(to=1 + n % 10) for n in range(51))]

    async def scenario() -> None:
        async with connect() as r:
            await r.rpush(keys.store_queue(), ops[0])
            owners = OwnerLease(r, keys, OWNER, LEASE)
            writer = StorageWriter(r, keys, sqlite_store, owners, asyncio.to_thread, linger=2.0)
            async with running(writer):
                await wait_for_async(lambda: writer.batches == 1, 20, "the first, one-item batch")
                for op in ops[1:]:  # one at a time, as publishes arrive
                    await r.rpush(keys.store_queue(), op)
                await wait_for_async(
                    caught_up(r, keys, sqlite_store, 51), 20, "51 rows in the store"
                )
            assert (writer.written, writer.batches) == (51, 2)

    asyncio.run(scenario())


def test_writer_applies_acks_after_the_messages_of_their_batch(store: Store, keys: Keys) -> None:
    async def scenario() -> list[int]:
        async with connect() as r:
            inbox = Inbox(r, keys, IDS, hot_seconds=60, retention_seconds=RETENTION)
            seven = [
                int((await inbox.publish(["7"], "notice", None, {"n": n})).ids[0]) for n in range(3)
            ]
            eight = [int(i) for i in (await inbox.publish(["8"], "comment", "7", "hi")).ids]
            await inbox.ack("7", [seven[0], seven[2]])  # queued behind the messages
            writer = new_writer(r, keys, store)
            async with running(writer):
                await wait_for_async(caught_up(r, keys, store, 4), 20, "4 rows")
                await wait_for_async(lambda: writer.acked == 2, 20, "2 acks")
                await inbox.ack("8", eight)  # a later batch
                await wait_for_async(lambda: writer.acked == 3, 20, "3 acks")
            return seven

    seven = asyncio.run(scenario())
    assert [m.id for m in store.unacked(7)] == [seven[1]]
    assert store.unacked(8) == []
    assert store.count_messages() == 4


def test_ack_reaching_the_store_before_its_message_is_retried(
    sqlite_store: Store, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pmq.tasks.writer.ACK_RETRY_DELAYS", (0.05, 0.1, 0.2))
    early, _ = msg_op(to=5)
    never, _ = msg_op(to=5)  # e.g. a broadcast id: no row will ever come

    async def scenario() -> None:
        async with connect() as r:
            await r.rpush(keys.store_queue(), ack_op(5, [early]), ack_op(5, [never]))
            writer = new_writer(r, keys, sqlite_store)
            async with running(writer):
                await wait_for_async(lambda: writer.batches == 1, 20, "the ack batch")
                # Another writer's batch, holding the message, commits after the ack ran.
                await asyncio.to_thread(sqlite_store.write_messages, [stored(early, 5)])
                await wait_for_async(lambda: writer.acked == 1, 20, "the retried ack")
                await wait_for_async(lambda: writer.deferred == 0, 20, "giving up on never")
            assert writer.acked == 1

    asyncio.run(scenario())
    assert sqlite_store.unacked(5) == []


def test_taken_list_of_a_killed_predecessor_is_written_once(store: Store, keys: Keys) -> None:
    left = [msg_op(to=3) for _ in range(300)]  # a batch taken by a writer killed with -9
    fresh = [msg_op(to=4) for _ in range(200)]
    # The same ids are also still on the queue (a crash between the write and the delete).
    queued = [op for _, op in left[:100]] + [op for _, op in fresh]

    async def scenario() -> StorageWriter:
        async with connect() as r:
            await orphan(r, keys, "dead-node:2", [op for _, op in left])
            await r.rpush(keys.store_queue(), *queued)
            writer = new_writer(r, keys, store)
            async with running(writer):
                await wait_for_async(caught_up(r, keys, store, 500, "dead-node:2"), 20, "500 rows")
                await wait_for_async(
                    caught_up(r, keys, store, 500), 20, "the writer's own list empty"
                )
            assert await r.zscore(keys.store_owners(), "dead-node:2") is None  # unregistered
            return writer

    writer = asyncio.run(scenario())
    assert writer.written == 500
    stored_ids = [m.id for uid in (3, 4) for m in store.unacked(uid, limit=1000)]
    assert sorted(stored_ids) == sorted(i for i, _ in left + fresh)


def test_malformed_items_are_dead_lettered_and_the_rest_written(
    sqlite_store: Store, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    first, first_op = msg_op(to=1)
    last, last_op = msg_op(to=2)
    good = orjson.loads(first_op)
    bad = [
        b"not json",
        b"[1, 2]",
        b'{"op": "zap"}',
        orjson.dumps({**good, "msg": {**good["msg"], "id": "12ab"}}),
        orjson.dumps({**good, "msg": {**good["msg"], "kind": "Not A Kind"}}),
        orjson.dumps({"op": "msg", "msg": {k: v for k, v in good["msg"].items() if k != "body"}}),
        orjson.dumps({"op": "ack", "uid": "1", "ids": [1.5]}),
    ]

    async def scenario() -> tuple[StorageWriter, list[bytes]]:
        async with connect() as r:
            await r.rpush(keys.store_queue(), first_op, *bad, last_op)
            writer = new_writer(r, keys, sqlite_store)
            async with running(writer):
                await wait_for_async(caught_up(r, keys, sqlite_store, 2), 20, "the two good rows")
            return writer, await r.lrange(keys.store_dead(), 0, -1)

    writer, dead = asyncio.run(scenario())
    assert writer.malformed == writer.dead == len(bad)
    assert [m.id for m in sqlite_store.unacked(1)] == [first]
    assert [m.id for m in sqlite_store.unacked(2)] == [last]
    letters = [DeadLetter.parse("b0", raw) for raw in dead]
    assert [letter.item for letter in letters] == bad  # kept as they were, in queue order
    assert all(letter.error.startswith("malformed") for letter in letters)
    assert sum("dead-lettered" in r.getMessage() for r in caplog.records) == len(bad)


@pytest.mark.mysql
def test_storage_outage_holds_the_queue_and_loses_nothing(
    mysql_db: MysqlDatabase, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pmq.tasks.writer")
    proxy = TcpProxy(mysql_db.host, mysql_db.port)
    store = make_store(mysql_db.url(proxy.port))
    warm_id, warm_op = msg_op(to=9)
    ops = [msg_op(to=1 + n % 40) for n in range(1000)]

    async def scenario() -> StorageWriter:
        async with connect() as r:
            writer = new_writer(r, keys, store)
            async with running(writer):
                await r.rpush(keys.store_queue(), warm_op)  # the pool now holds a connection
                await wait_for_async(caught_up(r, keys, store, 1), 20, "the first row")
                await asyncio.to_thread(proxy.cut)
                await r.rpush(keys.store_queue(), *[op for _, op in ops])
                await wait_for_async(lambda: writer.errors >= 3, 20, "failed retries")
                assert await r.llen(keys.store_taken(OWNER)) == 500  # the batch being retried
                assert await r.llen(keys.store_queue()) == 500  # the rest waits
                await asyncio.to_thread(proxy.restore)
                await wait_for_async(
                    caught_up(r, keys, store, 1001), 20, "1,001 rows after the outage"
                )
            return writer

    try:
        writer = asyncio.run(scenario())
    finally:
        store.close()
        proxy.close()
    assert sorted(mysql_db.message_ids(SHARDS)) == sorted([warm_id] + [i for i, _ in ops])
    assert writer.written == 1001
    messages = [r.getMessage() for r in caplog.records]
    assert sum("holding the queue" in m for m in messages) == 1, messages  # once per outage
    assert sum("store is back" in m for m in messages) == 1, messages


@pytest.mark.mysql
def test_stopping_during_an_outage_keeps_or_hands_back_the_batch(
    mysql_db: MysqlDatabase, keys: Keys
) -> None:
    proxy = TcpProxy(mysql_db.host, mysql_db.port)
    store = make_store(mysql_db.url(proxy.port))
    proxy.cut()
    ops = [op for _, op in (msg_op(to=1 + n % 7) for n in range(1000))]

    async def scenario() -> None:
        async with connect() as r:
            taken = keys.store_taken(OWNER)
            await r.rpush(keys.store_queue(), *ops)
            # A fast stop (or kill -9) mid-batch: the batch stays taken until its lease expires.
            writer = new_writer(r, keys, store)
            async with running(writer):
                await wait_for_async(lambda: writer.errors >= 1, 20, "a failed write")
            assert await r.lrange(taken, 0, -1) == ops[:500]
            # Another writer takes it over then; stopped gracefully while the store is still
            # down, it puts every item back on the queue.
            successor = new_writer(r, keys, store, owner="successor:1")
            task = asyncio.create_task(successor.run())
            lease = asyncio.create_task(successor.owners.run())
            await wait_for_async(lambda: successor.owners.reclaimed == 500, 20, "the take-over")
            await wait_for_async(lambda: successor.errors >= 1, 20, "the successor's try")
            assert await successor.drain(timeout=0.3) == 0
            assert task.done()
            assert lease.done()  # the drain ended the renewals before leaving the registry
            assert not await r.exists(taken, keys.store_taken("successor:1"))
            assert sorted(await r.lrange(keys.store_queue(), 0, -1)) == sorted(ops)
            assert not await r.exists(keys.store_owners())  # neither is registered
            # Any writer then writes all of it once the store is back.
            await asyncio.to_thread(proxy.restore)
            other = new_writer(r, keys, store, owner="other-node:1")
            async with running(other):
                await wait_for_async(
                    caught_up(r, keys, store, 1000, "other-node:1"), 20, "1,000 rows"
                )
            assert await other.drain(timeout=1) == 0

    try:
        asyncio.run(scenario())
    finally:
        store.close()
        proxy.close()
    assert len(mysql_db.message_ids(SHARDS)) == 1000


def test_drain_finishes_the_batch_in_progress(sqlite_store: Store, keys: Keys) -> None:
    ops = [op for _, op in (msg_op(to=2) for _ in range(300))]

    async def scenario() -> None:
        gate = asyncio.Event()

        async def gated(func: Callable[..., Any], *args: Any) -> Any:
            await gate.wait()  # holds the write until the drain has begun
            return await asyncio.to_thread(func, *args)

        async with connect() as r:
            await r.rpush(keys.store_queue(), *ops)
            writer = StorageWriter(r, keys, sqlite_store, OwnerLease(r, keys, OWNER, LEASE), gated)
            task = asyncio.create_task(writer.run())
            await wait_for_async(
                lambda: r.llen(keys.store_taken(OWNER)), 20, "the batch to be taken"
            )
            drain = asyncio.create_task(writer.drain(timeout=10))
            await asyncio.sleep(0.1)
            assert not drain.done() and not task.done()  # waiting for the batch in progress
            gate.set()
            assert await drain == 0
            assert task.done() and writer.batches == 1
            assert not await r.exists(keys.store_queue(), keys.store_taken(OWNER))
            assert await asyncio.to_thread(sqlite_store.count_messages) == 300

    asyncio.run(scenario())


# The sweeper ---------------------------------------------------------------------------


def new_sweeper(r: aioredis.Redis, keys: Keys, store: Store, owner: str = "a:1") -> Sweeper:
    return Sweeper(
        r,
        keys,
        store,
        asyncio.to_thread,
        hot_seconds=1,
        retention_seconds=RETENTION,
        interval=5,
        owner=owner,
    )


async def publish(inbox: Inbox, uid: str, count: int = 1) -> list[int]:
    return [
        int((await inbox.publish([uid], "notice", None, {"n": n})).ids[0]) for n in range(count)
    ]


async def backdate(r: aioredis.Redis, keys: Keys, uid: str, ids: list[int], ms: int) -> None:
    """Make hot messages look ``ms`` old, as if published then."""
    await r.zadd(keys.inbox(uid), {str(i): ms for i in ids}, xx=True)
    await r.zadd(keys.inbox_index(), {uid: ms}, lt=True)


async def hot_ids(r: aioredis.Redis, keys: Keys, uid: str) -> tuple[set[int], set[int]]:
    """The ids in the user's hot inbox and in its bodies hash."""
    members = await r.zrange(keys.inbox(uid), 0, -1)
    bodies = await r.hkeys(keys.inbox_bodies(uid))
    return {int(m) for m in members}, {int(b) for b in bodies}


def test_sweep_moves_stored_messages_cold_and_keeps_the_rest_hot(store: Store, keys: Keys) -> None:
    async def scenario() -> None:
        async with connect() as r:
            inbox = Inbox(r, keys, IDS, hot_seconds=1, retention_seconds=RETENTION)
            m1, m2, m3, m4 = await publish(inbox, "7", 4)
            [m5] = await publish(inbox, "8")
            [m6] = await publish(inbox, "9")
            old = now_ms() - 5000
            await backdate(r, keys, "7", [m1, m2, m3], old)
            await backdate(r, keys, "8", [m5], old)
            await backdate(r, keys, "9", [m6], old)
            # The writer has stored all but m3 and m6 (it lags).
            rows = [stored(m1, 7), stored(m2, 7), stored(m4, 7), stored(m5, 8)]
            await asyncio.to_thread(store.write_messages, rows)

            sweeper = new_sweeper(r, keys, store)
            counts = await sweeper.sweep_once()
            assert counts == {
                "ran": 1,
                "users": 3,
                "moved": 3,
                "kept": 2,
                "expired": 0,
                "broadcasts": 0,
                "cs_messages": 0,
                "deleted": 0,
            }
            assert await hot_ids(r, keys, "7") == ({m3, m4}, {m3, m4})
            assert 0 < await r.ttl(keys.cold("7")) <= RETENTION
            assert await r.zscore(keys.inbox_index(), "7") == old  # m3, the oldest still hot
            assert not await r.exists(keys.inbox("8"), keys.inbox_bodies("8"))
            assert await r.zscore(keys.inbox_index(), "8") is None
            assert await r.get(keys.cold("8")) is not None  # a mark new on every sweep
            assert await hot_ids(r, keys, "9") == ({m6}, {m6})  # not stored: stays hot
            assert not await r.exists(keys.cold("9"))
            assert await r.zscore(keys.inbox_index(), "9") == old

            async def cold(uid: str, after: int, limit: int) -> list[dict[str, Any]]:
                found = await asyncio.to_thread(store.unacked, int(uid), after, limit)
                return [{"id": str(m.id)} for m in found]

            pending = await inbox.pending("7", cold)
            assert [int(m["id"]) for m in pending] == [m1, m2, m3, m4]  # nothing lost

            await asyncio.to_thread(store.write_messages, [stored(m3, 7), stored(m6, 9)])
            counts = await sweeper.sweep_once()
            assert (counts["users"], counts["moved"], counts["kept"]) == (2, 2, 0)
            assert await hot_ids(r, keys, "7") == ({m4}, {m4})
            m4_ms = await r.zscore(keys.inbox("7"), str(m4))
            assert await r.zscore(keys.inbox_index(), "7") == m4_ms
            assert await r.zscore(keys.inbox_index(), "9") is None
            assert await r.exists(keys.cold("9"))

    asyncio.run(scenario())


def test_sweep_applies_retention_to_storage_and_redis(store: Store, keys: Keys) -> None:
    now = now_ms()
    expired_ts = now - (RETENTION + 60) * 1000
    old_rows = [stored(IDS.next(), 3, ts=expired_ts) for _ in range(3)]
    new_rows = [stored(IDS.next(), 3, ts=now - 5000) for _ in range(2)]
    store.write_messages(old_rows + new_rows)

    async def scenario() -> None:
        async with connect() as r:
            inbox = Inbox(r, keys, IDS, hot_seconds=1, retention_seconds=RETENTION)
            gone, kept = await publish(inbox, "5", 2)  # neither stored
            await backdate(r, keys, "5", [kept], now - 5000)
            await backdate(r, keys, "5", [gone], expired_ts)
            counts = await new_sweeper(r, keys, store).sweep_once()
            assert (counts["deleted"], counts["expired"], counts["kept"]) == (3, 1, 1)
            assert await hot_ids(r, keys, "5") == ({kept}, {kept})
            assert not await r.exists(keys.cold("5"))
            assert await r.zscore(keys.inbox_index(), "5") == now - 5000

    asyncio.run(scenario())
    assert sorted(m.id for m in store.unacked(3)) == sorted(m.id for m in new_rows)


def test_one_sweeper_of_the_cluster_holds_the_lock(sqlite_store: Store, keys: Keys) -> None:
    async def scenario() -> None:
        async with connect() as r:
            a = new_sweeper(r, keys, sqlite_store, owner="a:1")
            b = new_sweeper(r, keys, sqlite_store, owner="b:1")
            both = await asyncio.gather(a.sweep_once(), b.sweep_once())
            assert sorted(c["ran"] for c in both) == [0, 1]
            holder, other = (a, b) if both[0]["ran"] else (b, a)
            assert await r.get(keys.sweep_lock()) == holder.owner.encode()
            assert 0 < await r.ttl(keys.sweep_lock()) <= 10  # twice the interval
            assert (await holder.sweep_once())["ran"] == 1  # the holder renews
            assert await other.sweep_once() == {"ran": 0}
            await other.release()  # not the holder's: no effect
            assert await other.sweep_once() == {"ran": 0}
            await holder.release()
            assert (await other.sweep_once())["ran"] == 1

            task = asyncio.create_task(other.run())
            try:
                other.interval = 0.05
                await wait_for_async(lambda: other.sweeps >= 3, 20, "sweeps on a timer")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


# Retention beyond the inbox -----------------------------------------------------------


def rows(store: Store, sql: str) -> list[tuple[Any, ...]]:
    """What one read of ``store``'s own SQL returns (for tables the Store never lists)."""
    with store._session("test", write=False) as cur:
        cur.execute(sql)
        return [tuple(row) for row in cur.fetchall()]


async def backdate_broadcast(r: aioredis.Redis, keys: Keys, group: str, bid: str, ms: int) -> None:
    """Make a broadcast look published ``ms`` ago, in its group's ids and the index."""
    for key in (keys.broadcasts(group), keys.broadcast_index()):
        await r.zadd(key, {bid: ms}, xx=True)


async def backdate_chat(r: aioredis.Redis, keys: Keys, sid: str, mids: list[str], ms: int) -> None:
    """Make chat messages look sent ``ms`` ago, in their session's history and the index."""
    await r.zadd(keys.cs_history(sid), {mid: ms for mid in mids}, xx=True)
    await r.zadd(keys.cs_history_index(), {sid: ms}, lt=True)


def test_sweep_applies_retention_to_broadcasts_and_chat(store: Store, keys: Keys) -> None:
    """Broadcasts, chat messages and closed chat sessions older than retention leave Redis
    and storage on a sweep; younger ones stay, and a connect still replays the recent
    broadcasts."""
    now = now_ms()
    expired_ts = now - (RETENTION + 60) * 1000
    recent = now - 5000
    old_bc, new_bc, old_msg, new_msg, old_session, new_session = (IDS.next() for _ in range(6))
    store.write_broadcasts(
        [StoredBroadcast(i, "vip", "notice", "{}", ts) for i, ts in
         ((old_bc, expired_ts), (new_bc, recent))]
    )  # fmt: skip
    store.write_cs(
        [StoredCsMessage(i, old_session, 1, 2, "{}", ts) for i, ts in
         ((old_msg, expired_ts), (new_msg, recent))],
        [StoredCsSession(i, 1, 2, "closed", ts - 1000, ts, None) for i, ts in
         ((old_session, expired_ts), (new_session, recent))],
    )  # fmt: skip

    async def scenario() -> None:
        async with connect() as r:
            broadcasts = Broadcasts(r, keys, IDS, 60, replay_max=20, retention_seconds=RETENTION)
            old_vip, old_all, new_vip = [
                (await broadcasts.publish(group, "notice", {"n": n}, None)).id
                for n, group in enumerate(["vip", "all", "vip"])
            ]
            await backdate_broadcast(r, keys, "vip", old_vip, expired_ts)
            await backdate_broadcast(r, keys, "all", old_all, expired_ts)
            for key in (keys.broadcasts("vip"), keys.broadcast_index(), keys.broadcast_bodies()):
                assert 0 < await r.ttl(key) <= RETENTION  # gone whole once all are old

            # An agent (its connection faked) and two users' sessions.
            await r.hset(keys.user_conns("2"), "c1", "w1")
            routes = Routes(r, keys, "w1", 1.0)
            inbox = Inbox(r, keys, IDS, hot_seconds=1, retention_seconds=RETENTION)
            chat = Chat(r, keys, routes, inbox, CsConfig, RETENTION)
            await chat.agent_online("2")
            long_sid = (await chat.open("1"))["session_id"]
            m1 = await chat.send("1", long_sid, {"text": "long ago"})
            # As if m1 was kept before the history index existed: the next send indexes it.
            await r.zadd(keys.cs_history(long_sid), {m1: expired_ts}, xx=True)
            await r.zrem(keys.cs_history_index(), long_sid)
            m2 = await chat.send("2", long_sid, {"text": "just now"})
            assert await r.zscore(keys.cs_history_index(), long_sid) == expired_ts
            closed_sid = (await chat.open("3"))["session_id"]
            m3 = await chat.send("3", closed_sid, {"text": "long ago too"})
            await backdate_chat(r, keys, closed_sid, [m3], expired_ts)
            await chat.close(closed_sid, "3")
            assert 0 < await r.ttl(keys.cs_session(closed_sid)) <= RETENTION

            counts = await new_sweeper(r, keys, store).sweep_once()
            assert (counts["broadcasts"], counts["cs_messages"]) == (2, 2)
            assert counts["deleted"] == 3  # a broadcast, a chat message, a chat session

            assert await r.zrange(keys.broadcast_index(), 0, -1) == [new_vip.encode()]
            assert await r.hkeys(keys.broadcast_bodies()) == [new_vip.encode()]
            assert await r.zrange(keys.broadcasts("vip"), 0, -1) == [new_vip.encode()]
            assert not await r.exists(keys.broadcasts("all"))
            pipe = r.pipeline(transaction=False)
            replay = broadcasts.replay_on(pipe, "77", ["vip"])
            replayed = await broadcasts.bodies(replay(iter(await pipe.execute())))
            assert [b["id"] for b in replayed] == [new_vip]

            assert await r.zrange(keys.cs_history(long_sid), 0, -1) == [m2.encode()]
            assert await r.hkeys(keys.cs_bodies(long_sid)) == [m2.encode()]
            m2_ms = await r.zscore(keys.cs_history(long_sid), m2)
            assert await r.zscore(keys.cs_history_index(), long_sid) == m2_ms
            assert not await r.exists(keys.cs_history(closed_sid), keys.cs_bodies(closed_sid))
            assert await r.zscore(keys.cs_history_index(), closed_sid) is None
            history = await chat.history("1", long_sid, 0, 10)
            assert [m["id"] for m in history["messages"]] == [m2]

    asyncio.run(scenario())
    assert rows(store, "SELECT id FROM pmq_broadcast") == [(new_bc,)]
    assert [m.id for m in store.cs_messages(old_session)] == [new_msg]
    assert store.cs_session(old_session) is None and store.cs_session(new_session) is not None


def index_leads(store: Store) -> set[tuple[str, str]]:
    """(table, first column) of every secondary index of ``store``'s primary tables."""
    if store.engine == "mysql":
        found = rows(
            store,
            "SELECT table_name, column_name FROM information_schema.statistics WHERE "
            "table_schema = DATABASE() AND seq_in_index = 1 AND index_name <> 'PRIMARY'",
        )
        return {(str(t), str(c)) for t, c in found}
    names = rows(store, "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index'")
    return {(table, rows(store, f"PRAGMA index_info({name})")[0][2]) for name, table in names}


def test_init_schema_indexes_the_retention_columns_of_an_older_database(store: Store) -> None:
    """A database made before schema 3 lacks the time indexes retention deletes by:
    init_schema() adds them (and again changes nothing)."""
    drop = {"sqlite": "DROP INDEX {t}_{c}", "mysql": "ALTER TABLE {t} DROP KEY idx_{c}"}
    assert set(RETENTION_TABLES) <= index_leads(store)
    with store._session("test", write=True) as cur:
        for table, column in RETENTION_TABLES:
            cur.execute(drop[store.engine].format(t=table, c=column))
        cur.execute("DELETE FROM pmq_schema WHERE version >= 3")
    assert not set(RETENTION_TABLES) & index_leads(store)
    store.init_schema()
    store.init_schema()
    assert set(RETENTION_TABLES) <= index_leads(store)
    assert rows(store, "SELECT MAX(version) FROM pmq_schema") == [(SCHEMA_VERSION,)]


# A real node ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_task_worker_writes_sweeps_and_stops_clean(
    make_node: Callable[..., Node], redis_client: redis.Redis
) -> None:
    node = make_node(inbox={"hot_seconds": 1, "sweep_seconds": 1}).start()
    keys = Keys(node.prefix)

    async def send() -> list[int]:
        async with connect() as r:
            return await publish(Inbox(r, keys, IDS, 1, RETENTION), "7", 20)

    ids = asyncio.run(send())
    store = open_store(StorageConfig(url=f"sqlite:///{node.tmp}/pmq.db", shards=SHARDS))
    try:
        wait_for(lambda: [m.id for m in store.unacked(7)] == ids, 20, "20 rows in SQLite")
        wait_for(
            lambda: (
                redis_client.zcard(keys.inbox("7")) == 0 and redis_client.exists(keys.cold("7"))
            ),
            20,
            "the sweep to move them out of Redis",
        )
        wait_for(lambda: [w.get("written") for w in node.workers("task")] == [20], 10, "task stats")
    finally:
        store.close()
    node.signal(signal.SIGTERM)
    assert node.wait_exit() == 0
    log = node.log()
    assert f"pmq: task worker #1 [{node.name}] stopped" in log, log
    assert "Traceback" not in log and "shutdown passed" not in log, log


@pytest.mark.e2e
def test_a_graceful_stop_writes_every_queued_message_to_storage(
    make_node: Callable[..., Node], redis_client: redis.Redis
) -> None:
    """SPEC 1: a graceful stop finishes the queued writes. The publishes come while the
    writer lingers after a batch (it used to be cancelled there, leaving them queued for the
    next start) and right before the TERM, which reaches the socket workers first."""
    node = make_node().start()
    site = Ingest(node)
    store = open_store(StorageConfig(url=f"sqlite:///{node.tmp}/pmq.db", shards=SHARDS))
    try:
        assert site.publish({"to": 1, "kind": "notice", "body": {}})[0] == 202
        wait_for(lambda: store.count_messages() == 1, 20, "the first message stored")
        for n in range(5):
            status, _ = site.publish({"to": list(range(100 * n + 2, 100 * n + 102)),
                                      "kind": "notice", "body": {"n": n}})
            assert status == 202
        node.signal(signal.SIGTERM)
        assert node.wait_exit() == 0
        assert store.count_messages() == 501
    finally:
        site.close()
        store.close()
    keys = Keys(node.prefix)
    assert [redis_client.llen(keys.store_queue(t)) for t in keys.store_tags()] == [0] * len(
        keys.store_tags()
    )


def test_writer_takes_from_every_bucket_and_the_chat_queue(
    store: Store, redis_prefix: str
) -> None:
    """With several user buckets (a Redis Cluster layout) one writer drains every bucket's
    queue and the chat's, and first writes what a killed predecessor left in each of its
    taken lists."""
    keys = Keys(redis_prefix, 4)
    left = {tag: [msg_op(to=n) for _ in range(20)] for n, tag in enumerate(["b1", "b3"], 1)}
    queued = {f"b{n}": [msg_op(to=4 * k + n) for k in range(1, 31)] for n in range(4)}

    async def scenario() -> None:
        async with connect() as r:
            for tag, ops in left.items():
                await orphan(r, keys, "dead-node:2", [op for _, op in ops], tag)
            for tag, ops in queued.items():
                await r.rpush(keys.store_queue(tag), *[op for _, op in ops])
            writer = new_writer(r, keys, store)
            lists = [k for t in keys.store_tags() for k in (keys.store_queue(t),
                                                           keys.store_taken("dead-node:2", t),
                                                           keys.store_taken(OWNER, t))]

            async def done() -> bool:
                return not await r.exists(*lists) and store.count_messages() == 160

            async with running(writer):
                await wait_for_async(done, 20, "160 rows and every queue and taken list empty")
            assert writer.written == 160

    asyncio.run(scenario())
    ids = {i for ops in [*left.values(), *queued.values()] for i, _ in ops}
    uids = {4 * k + n for n in range(4) for k in range(1, 31)} | {1, 2}
    assert {m.id for uid in uids for m in store.unacked(uid, limit=1000)} == ids
