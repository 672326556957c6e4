"""Redis data loss: detected, and no stored unacked message missing from replay or msg.pull.

The store's part against SQLite and a throw-away MariaDB database; the rest against a node
whose Redis is a private ``redis-server`` this test restarts empty, or from an old snapshot,
while the node keeps running.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmq.config import StorageConfig
from pmq.store import Store, StoredMessage, open_store
from tests.helpers import MysqlDatabase

SHARDS = 4


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        opened = open_store(StorageConfig(url=f"sqlite:///{tmp_path}/pmq.db", shards=SHARDS))
        opened.init_schema()
        yield opened
        opened.close()
        return
    database = MysqlDatabase()
    opened = open_store(StorageConfig(url=database.url(), shards=SHARDS, pool_size=2))
    try:
        opened.init_schema()
        yield opened
    finally:
        opened.close()
        database.drop()


def row(id: int, uid: int) -> StoredMessage:
    return StoredMessage(id=id, uid=uid, kind="notice", from_uid=None, body="{}", ts=1_000)


def test_stored_marks_only_rise(store: Store) -> None:
    assert store.redis_marks() == {}
    assert store.raise_redis_marks({0: (1, 5)}) == {0: (1, 5)}
    assert store.raise_redis_marks({0: (1, 3)}) == {0: (1, 5)}  # lower: kept
    assert store.raise_redis_marks({0: (2, 0), 3: (1, 1)}) == {0: (2, 0), 3: (1, 1)}
    assert store.redis_marks() == {0: (2, 0), 3: (1, 1)}


def test_unacked_users_pages_one_shard(store: Store) -> None:
    store.write_messages([row(1, 4), row(2, 8), row(3, 8), row(4, 12), row(5, 5), row(6, 16)])
    store.ack(12, [4])
    assert store.unacked_users(0) == [4, 8, 16]  # 12 acked all; 5 is in shard 1
    assert store.unacked_users(0, 0, 2) == [4, 8]
    assert store.unacked_users(0, 8, 2) == [16]
    assert store.unacked_users(1) == [5]


def test_schema_upgrade_keeps_rows_sqlite(tmp_path: Path) -> None:
    """A database made by schema 1 (no pmq_redis_mark) gains the table; its rows stay."""
    path = tmp_path / "old.db"
    store = open_store(StorageConfig(url=f"sqlite:///{path}", shards=SHARDS))
    store.init_schema()
    store.write_messages([row(1, 4)])
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("DROP TABLE pmq_redis_mark")
    raw.execute("DELETE FROM pmq_schema")
    raw.execute("INSERT INTO pmq_schema (version, applied_at) VALUES (1, 0)")
    store.init_schema()
    store.init_schema()
    assert [m.id for m in store.unacked(4)] == [1]
    assert store.raise_redis_marks({0: (1, 1)}) == {0: (1, 1)}
    assert raw.execute("SELECT version FROM pmq_schema ORDER BY version").fetchall() == [
        (1,), (2,),
    ]
    raw.close()
    store.close()


@pytest.mark.mysql
def test_schema_upgrade_keeps_rows_mysql() -> None:
    database = MysqlDatabase()
    store = open_store(StorageConfig(url=database.url(), shards=SHARDS, pool_size=2))
    try:
        store.init_schema()
        store.write_messages([row(1, 4)])
        database.query("DROP TABLE pmq_redis_mark")
        database.query("DELETE FROM pmq_schema")
        database.query("INSERT INTO pmq_schema (version, applied_at) VALUES (1, 0)")
        store.init_schema()
        store.init_schema()
        assert [m.id for m in store.unacked(4)] == [1]
        assert store.raise_redis_marks({0: (1, 1)}) == {0: (1, 1)}
        versions = database.query("SELECT version FROM pmq_schema ORDER BY version")
        assert versions == [(1,), (2,)]
    finally:
        store.close()
        database.drop()
