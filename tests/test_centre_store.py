"""The notification centre's storage (pmq.store.feed) on SQLite and MariaDB, and the schema 4
migration: a database an older PMQ made (schema 3, its DDL as pmq/store/sqlite.py and
mysql.py had it at 5c20ba0) keeps its rows through ``init_schema`` (``pmqctl db init``), run
twice, and the new features work on those rows.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pmq.config import StorageConfig
from pmq.domain.ids import first_id_at
from pmq.store import SCHEMA_VERSION, Store, open_store
from pmq.store.rows import ReadRows, StoredBroadcast, StoredMessage
from tests.helpers import Ingest, MysqlDatabase, Node, ws_client

SHARDS = 4
MYSQL_OPTIONS = "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci"
# Schema 3's message and broadcast tables, and its version row, per engine.
OLD_SCHEMA = {
    "sqlite": [
        *(
            f"CREATE TABLE pmq_msg_{n} (id INTEGER PRIMARY KEY, uid BIGINT NOT NULL, "
            "kind VARCHAR(32) NOT NULL, from_uid BIGINT NULL, body TEXT NOT NULL, "
            "ts BIGINT NOT NULL, acked TINYINT NOT NULL DEFAULT 0)"
            for n in range(SHARDS)
        ),
        "CREATE TABLE pmq_broadcast (id INTEGER PRIMARY KEY, grp VARCHAR(64) NOT NULL, "
        "kind VARCHAR(32) NOT NULL, body TEXT NOT NULL, ts BIGINT NOT NULL, "
        "dedupe_key VARCHAR(128) NULL)",
        "CREATE TABLE pmq_schema (version INTEGER NOT NULL PRIMARY KEY, "
        "applied_at BIGINT NOT NULL)",
    ],
    "mysql": [
        *(
            f"CREATE TABLE pmq_msg_{n} (id BIGINT UNSIGNED NOT NULL PRIMARY KEY, "
            "uid BIGINT UNSIGNED NOT NULL, kind VARCHAR(32) NOT NULL, "
            "from_uid BIGINT UNSIGNED NULL, body MEDIUMTEXT NOT NULL, ts BIGINT NOT NULL, "
            "acked TINYINT NOT NULL DEFAULT 0, KEY idx_uid_acked_id (uid, acked, id), "
            f"KEY idx_ts (ts)) {MYSQL_OPTIONS}"
            for n in range(SHARDS)
        ),
        "CREATE TABLE pmq_broadcast (id BIGINT UNSIGNED NOT NULL PRIMARY KEY, "
        "grp VARCHAR(64) NOT NULL, kind VARCHAR(32) NOT NULL, body MEDIUMTEXT NOT NULL, "
        "ts BIGINT NOT NULL, dedupe_key VARCHAR(128) NULL, KEY idx_grp_id (grp, id)) "
        + MYSQL_OPTIONS,
        "CREATE TABLE pmq_schema (version INT NOT NULL PRIMARY KEY, "
        f"applied_at BIGINT NOT NULL) {MYSQL_OPTIONS}",
    ],
}


def old_rows(base: int = 0, ms: int = 1000) -> list[str]:
    """Rows of an older database: messages 11 to 13 of uid 7 (12 unacked), 14 of uid 8, and
    broadcast 20, their ids counted from ``base``, their times from ``ms``."""
    return [
        *(
            f"INSERT INTO pmq_msg_{uid % SHARDS} (id, uid, kind, from_uid, body, ts, acked) "
            f"VALUES ({base + i}, {uid}, 'comment', 5, '{{\"n\": {i}}}', {ms + i}, {acked})"
            for i, uid, acked in [(11, 7, 1), (12, 7, 0), (13, 7, 1), (14, 8, 0)]
        ),
        f"INSERT INTO pmq_broadcast (id, grp, kind, body, ts) "
        f"VALUES ({base + 20}, 'all', 'system', '{{}}', {ms + 20})",
        "INSERT INTO pmq_schema (version, applied_at) VALUES (3, 1)",
    ]


Run = Callable[[str], list[tuple[Any, ...]]]


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def old_database(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[StorageConfig, Run]]:
    """A database as schema 3 made it, with rows: (its storage config, a raw query)."""
    if request.param == "sqlite":
        raw = sqlite3.connect(tmp_path / "pmq.db", isolation_level=None)
        config = StorageConfig(url=f"sqlite:///{tmp_path}/pmq.db", shards=SHARDS)
        run: Run = lambda sql: raw.execute(sql).fetchall()  # noqa: E731
        cleanup: Callable[[], None] = raw.close
    else:
        database = MysqlDatabase()
        config = StorageConfig(url=database.url(), shards=SHARDS)
        run, cleanup = database.query, database.drop
    for statement in [*OLD_SCHEMA[request.param], *old_rows()]:
        run(statement)
    try:
        yield config, run
    finally:
        cleanup()


def test_init_migrates_an_older_database_keeping_its_rows(
    old_database: tuple[StorageConfig, Run],
) -> None:
    config, run = old_database
    store = open_store(config)
    try:
        store.init_schema()
        store.init_schema()
        assert run("SELECT MAX(version) FROM pmq_schema") == [(SCHEMA_VERSION,)]
        if config.url.startswith("sqlite"):
            indexes = "SELECT COUNT(*) FROM sqlite_master WHERE name LIKE 'pmq_msg_%_uid_id'"
        else:
            indexes = (
                "SELECT COUNT(DISTINCT table_name) FROM information_schema.statistics "
                "WHERE table_schema = DATABASE() AND index_name = 'idx_uid_id'"
            )
        assert run(indexes) == [(SHARDS,)]  # the feed's index, on every shard
        assert [r.id for r in store.unacked(7)] == [12]
        assert [r.id for r in store.feed(7, 100, 0, None, 10)] == [13, 12, 11]
        check_the_centre_on(store)
        assert run("SELECT id, revoked FROM pmq_msg_3 ORDER BY id") == [
            (11, 0), (12, 1), (13, 0), (21, 1)
        ]
        assert [r.id for r in store.feed(7, 100, 0, None, 10)] == [13, 11]
        assert store.unacked(7) == []
    finally:
        store.close()


def check_the_centre_on(store: Store) -> None:
    """Retract, edit, read and list on the rows of an older database (uid 7: 11, 12, 13)."""
    row = store.find_message(12)
    assert row is not None and row[1] is False
    store.write_centre(
        [ReadRows(7, [(11, 1011)], {"*": 12})],
        [row[0], StoredMessage(21, 7, "notice", None, "{}", 1021)],  # 21: not written yet
        [StoredMessage(13, 7, "comment", 5, '{"n": "new"}', 1013)],
        [StoredBroadcast(20, "all", "system", "{}", 1020)],
    )
    store.write_centre([ReadRows(7, [(11, 1011)], {"*": 5})], [], [], [])  # again: no change
    assert store.find_message(12) == (row[0], True)
    assert store.messages_by_ids(7, [11, 12, 13, 14]) == [
        StoredMessage(11, 7, "comment", 5, '{"n": 11}', 1011),
        StoredMessage(13, 7, "comment", 5, '{"n": "new"}', 1013),
    ]
    assert store.read_state(7, 0) == ReadRows(7, [(11, 1011)], {"*": 12})
    assert store.read_state(7, 1012) == ReadRows(7, [], {"*": 12})
    assert store.feed_broadcasts(["all"], 100, 0, None, 10) == []
    assert store.find_broadcast(20) == (StoredBroadcast(20, "all", "system", "{}", 1020), True)
    store.write_messages([StoredMessage(21, 7, "notice", None, '{"late": 1}', 1021)])
    assert [r.id for r in store.feed(7, 100, 0, "notice", 10)] == []  # the retraction holds


@pytest.mark.e2e
def test_pmqctl_db_init_migrates_the_database_a_node_then_serves(
    make_node: Callable[..., Node],
) -> None:
    node = make_node()
    now = int(time.time() * 1000)
    base = first_id_at(now - 60_000)
    raw = sqlite3.connect(node.tmp / "pmq.db", isolation_level=None)
    for statement in [*OLD_SCHEMA["sqlite"], *old_rows(base, now - 60_000)]:
        raw.execute(statement)
    raw.close()
    (node.tmp / "pmq.db").chmod(0o600)
    for _ in range(2):
        done = node.ctl("db", "init")
        assert done.returncode == 0, done.stderr
    node.start()
    site = Ingest(node)
    ids = {n: str(base + n) for n in (11, 12, 13, 14, 20)}
    try:
        with ws_client(node, 7) as client:
            assert [m["id"] for m in client.pushes(1)] == [ids[12]]  # unacked: replayed
            reply = client.request("msg.list")
            assert [(m["id"], m["read"]) for m in reply["data"]["messages"]] == [
                (ids[20], False), (ids[13], False), (ids[12], False), (ids[11], False)
            ]
            reply = client.request("msg.read", {"ids": [ids[11], ids[14], ids[20]]})
            assert reply["data"] == {"read": 2}
            assert site.call("DELETE", f"/api/v1/messages/{ids[13]}")[0] == 200
            assert client.next("revoke")["id"] == ids[13]
            reply = client.request("msg.list", {"unread_only": True})
            assert [m["id"] for m in reply["data"]["messages"]] == [ids[12]]
    finally:
        site.close()
