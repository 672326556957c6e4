"""Poison items: what the store can never take goes to a dead-letter list, the rest is written.

Real faults only: a well-formed last-read time past 64-bit signed, as a buggy producer could
queue it (MariaDB refuses it as out of range, SQLite cannot bind it; a message's ``ts`` would
not do, as MariaDB's INSERT IGNORE clips it), and bytes that are no storage operation at all;
outages are a cut TCP proxy in front of MariaDB or a SQLite write lock held by another
connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import redis

from pmq.redis.keys import Keys
from pmq.tasks import deadletter
from pmq.tasks.deadletter import DeadLetter
from pmq.tasks.writer import StorageWriter
from tests.helpers import REDIS_URL, MysqlDatabase, Node, TcpProxy, wait_for, wait_for_async
from tests.test_metrics import scrape, value
from tests.test_tasks import (
    caught_up,
    connect,
    make_store,
    msg_op,
    new_writer,
    running,
)

SHARDS = 4
MALFORMED = b'{"op": "msg", "msg": "a producer\'s bug"}'


def poison(uid: int = 5) -> bytes:
    """A last-read time no BIGINT holds: well formed, refused by every store."""
    return orjson.dumps({"op": "last_read", "uid": str(uid), "kind": "system", "ts": 2**63})


@pytest.fixture
def keys(redis_prefix: str) -> Keys:
    return Keys(redis_prefix)


def dead_letters(keys: Keys) -> list[DeadLetter]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return deadletter.read(client, keys)
    finally:
        client.close()


# The writer ------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def test_a_poison_item_is_dead_lettered_and_the_rest_of_its_queue_written(
    engine: str, keys: Keys, tmp_path: Path
) -> None:
    db = MysqlDatabase() if engine == "mysql" else None
    store = make_store(db.url() if db else f"sqlite:///{tmp_path}/pmq.db")
    good = [msg_op(to=1 + n % 9) for n in range(1200)]
    bad_op = poison()
    ops = [op for _, op in good[:700]] + [bad_op, MALFORMED] + [op for _, op in good[700:]]

    async def scenario() -> StorageWriter:
        async with connect() as r:
            await r.rpush(keys.store_queue(), *ops)
            writer = new_writer(r, keys, store)
            async with running(writer):
                await wait_for_async(
                    caught_up(r, keys, store, 1200), 20, "1,200 good rows, queue empty"
                )
            return writer

    try:
        writer = asyncio.run(scenario())
        stored = {m.id for uid in range(1, 10) for m in store.unacked(uid, limit=1000)}
        assert stored == {i for i, _ in good}
        assert store.last_read(5, "system") is None
    finally:
        store.close()
        if db:
            db.drop()
    letters = dead_letters(keys)
    assert [letter.item for letter in letters] == [bad_op, MALFORMED]  # as they were, in order
    assert "refused the data" in letters[0].error, letters[0].error
    assert letters[1].error.startswith("malformed"), letters[1].error
    assert writer.dead == 2 and writer.written == 1200


def hold_sqlite_lock(path: Path) -> sqlite3.Connection:
    """Another process's writer in the middle of a transaction: the store's writes wait
    their busy timeout, then fail with "database is locked"."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


@pytest.mark.parametrize(
    "outage", ["sqlite-lock", pytest.param("mysql-cut", marks=pytest.mark.mysql)]
)
def test_an_outage_is_retried_whole_and_only_the_poison_is_dead_lettered(
    outage: str, keys: Keys, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """During an outage nothing is split or dead-lettered, whatever the batch holds; once
    the store is back, the poison goes to the dead-letter list and every other item is
    written. The log says once that the store failed and once that it is back."""
    caplog.set_level(logging.WARNING, logger="pmq.tasks.writer")
    db = MysqlDatabase() if outage == "mysql-cut" else None
    proxy = TcpProxy(db.host, db.port) if db else None
    path = tmp_path / "pmq.db"
    store = make_store(db.url(proxy.port) if db and proxy else f"sqlite:///{path}")
    good = [msg_op(to=1 + n % 9) for n in range(300)]
    bad_op = poison()
    ops = [op for _, op in good[:100]] + [bad_op] + [op for _, op in good[100:]]
    holder: sqlite3.Connection | None = None

    async def scenario() -> None:
        nonlocal holder
        async with connect() as r:
            writer = new_writer(r, keys, store)
            if proxy:
                await asyncio.to_thread(proxy.cut)
            else:
                holder = hold_sqlite_lock(path)
            await r.rpush(keys.store_queue(), *ops)
            async with running(writer):
                await wait_for_async(lambda: writer.errors >= 2, 30, "two failed attempts")
                assert writer.dead == 0 and not await r.exists(keys.store_dead())
                assert await r.llen(keys.store_taken(writer.owner)) == len(ops)  # held whole
                if proxy:
                    await asyncio.to_thread(proxy.restore)
                else:
                    assert holder is not None
                    holder.execute("ROLLBACK")
                await wait_for_async(
                    caught_up(r, keys, store, 300), 30, "300 rows after the outage"
                )
                assert writer.dead == 1

    try:
        asyncio.run(scenario())
        stored = {m.id for uid in range(1, 10) for m in store.unacked(uid, limit=1000)}
        assert stored == {i for i, _ in good}
    finally:
        if holder is not None:
            holder.close()
        store.close()
        if proxy:
            proxy.close()
        if db:
            db.drop()
    assert [letter.item for letter in dead_letters(keys)] == [bad_op]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("holding the queue" in m for m in messages) == 1, messages
    [back] = [m for m in messages if "store is back" in m]
    assert int(back.split(" after ")[1].split()[0]) >= 2, back  # the attempts of the outage


# pmqctl dlq --------------------------------------------------------------------------------


@pytest.fixture
def ctl(
    tmp_path: Path, redis_prefix: str
) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """``pmqctl dlq ...`` against this test's Redis prefix (no node needed)."""
    config = tmp_path / "pmq.toml"
    config.write_text(f'[redis]\nurl = "{REDIS_URL}"\nprefix = "{redis_prefix}"\n')

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pmq.ctl", "dlq", *args, "-c", str(config)],
            capture_output=True, text=True, timeout=60,
        )

    yield run


def test_pmqctl_dlq_lists_retries_and_drops(
    ctl: Callable[..., subprocess.CompletedProcess[str]], keys: Keys, redis_client: redis.Redis
) -> None:
    items = [poison(uid=n) for n in (1, 2, 3)] + [b"\xff not utf-8"]
    entries = [deadletter.entry(item, f"reason {n}") for n, item in enumerate(items)]
    redis_client.rpush(keys.store_dead(), *entries)
    listed = ctl("list", "--json")
    assert listed.returncode == 0, listed.stderr
    letters = json.loads(listed.stdout)
    assert [(x["error"], x["queue"]) for x in letters] == [(f"reason {n}", "b0") for n in range(4)]
    assert [x["item"].encode() for x in letters[:3]] == items[:3]
    text = ctl("list")
    assert text.returncode == 0 and "reason 2" in text.stdout and letters[2]["id"] in text.stdout

    retried = ctl("retry", letters[0]["id"], letters[3]["id"])
    assert retried.returncode == 0, retried.stderr
    # Back on their queue as they were, bytes included; gone from the dead-letter list.
    raw = redis.Redis.from_url(REDIS_URL)
    assert raw.lrange(keys.store_queue(), 0, -1) == [items[0], items[3]]
    raw.close()
    assert [x["id"] for x in json.loads(ctl("list", "--json").stdout)] == [
        letters[1]["id"], letters[2]["id"]
    ]

    missing = ctl("drop", letters[1]["id"], "feedfacecafe")
    assert missing.returncode == 1 and "feedfacecafe" in missing.stderr
    assert len(json.loads(ctl("list", "--json").stdout)) == 2  # nothing dropped on a bad id
    assert ctl("drop", "--all").returncode == 0
    assert json.loads(ctl("list", "--json").stdout) == []
    assert ctl("retry").returncode == 1  # neither ids nor --all


def test_pmqctl_dlq_fails_when_redis_does_not_answer(tmp_path: Path) -> None:
    config = tmp_path / "pmq.toml"
    config.write_text('[redis]\nurl = "redis://127.0.0.1:1/0"\n')
    done = subprocess.run(
        [sys.executable, "-m", "pmq.ctl", "dlq", "list", "-c", str(config)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1 and "redis" in done.stderr


# A real node -------------------------------------------------------------------------------


@pytest.mark.e2e
def test_node_counts_dead_letters_in_metrics_and_status(
    make_node: Callable[..., Node], redis_client: redis.Redis
) -> None:
    node = make_node().start()
    keys = Keys(node.prefix)
    redis_client.rpush(keys.store_queue(), MALFORMED, poison())

    def dead_in_status() -> bool:
        workers = node.workers("task")
        return bool(workers) and workers[0].get("queues", {}).get("dead") == 2

    wait_for(dead_in_status, 20, "2 dead letters in the task worker's status")
    assert value(scrape(node), "pmq_queue_depth", queue="dead") == 2
    status = node.ctl("status")
    assert status.returncode == 0 and "dead 2" in status.stdout, status.stdout
    assert redis_client.llen(keys.store_queue()) == 0
