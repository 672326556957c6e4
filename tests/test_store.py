"""The store against real engines: SQLite in tmp_path and a throw-away MariaDB database.

The MariaDB cases create ``pmq_test_<random hex>`` and drop it afterwards, so parallel runs
never collide; they are skipped when no server answers at ``PMQ_TEST_MYSQL_URL`` (default
``mysql://root@127.0.0.1:3306``, no database part).
"""

from __future__ import annotations

import os
import secrets
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pymysql
import pytest

from pmq.config import StorageConfig
from pmq.errors import ConfigError, StorageError
from pmq.store import SCHEMA_VERSION, Store, StoredMessage, open_store, sqlite_path
from pmq.store.mysql import MysqlStore
from pmq.store.sqlite import SqliteStore

SHARDS = 4
SERVER_URL = os.environ.get("PMQ_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306")
OTHER_TABLES = {
    "pmq_schema", "pmq_broadcast", "pmq_last_read", "pmq_cs_session", "pmq_cs_message",
    "pmq_redis_mark", "pmq_read", "pmq_read_mark",
}
ALL_TABLES = {f"pmq_msg_{n}" for n in range(SHARDS)} | OTHER_TABLES

Query = Callable[[str], list[tuple[Any, ...]]]


def _server() -> pymysql.connections.Connection[Any]:
    """A raw connection to the test server (no database), or a skip."""
    target = open_store(StorageConfig(url=SERVER_URL + "/x"))
    assert isinstance(target, MysqlStore)
    t = target.target
    try:
        return pymysql.connect(
            host=t.host, port=t.port, user=t.user, password=t.password, connect_timeout=2
        )
    except pymysql.MySQLError as exc:
        pytest.skip(f"MariaDB not reachable at {t.host}:{t.port}: {exc}")


@contextmanager
def _sqlite_engine(tmp_path: Path) -> Iterator[tuple[Store, Query]]:
    path = tmp_path / "sub" / "pmq.db"
    store = open_store(StorageConfig(url=f"sqlite:///{path}", shards=SHARDS))
    store.init_schema()
    raw = sqlite3.connect(path, isolation_level=None)
    try:
        yield store, lambda sql: raw.execute(sql).fetchall()
    finally:
        raw.close()
        store.close()


@contextmanager
def _mysql_engine() -> Iterator[tuple[Store, Query]]:
    server = _server()
    name = f"pmq_test_{secrets.token_hex(6)}"
    store = open_store(StorageConfig(url=f"{SERVER_URL}/{name}", shards=SHARDS, pool_size=4))

    def query(sql: str) -> list[tuple[Any, ...]]:
        with server.cursor() as cur:
            cur.execute(f"USE `{name}`")
            cur.execute(sql)
            rows = list(cur.fetchall())
        server.commit()  # end the snapshot so the next query sees the store's writes
        return rows

    try:
        store.init_schema()
        yield store, query
    finally:
        store.close()
        with server.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        server.close()


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, Query]]:
    """A fresh store with its schema, and a raw query function to look behind its back."""
    with _sqlite_engine(tmp_path) if request.param == "sqlite" else _mysql_engine() as pair:
        yield pair


@pytest.fixture
def mysql_engine() -> Iterator[tuple[Store, Query]]:
    with _mysql_engine() as pair:
        yield pair


def _tables(store: Store, query: Query) -> set[str]:
    if isinstance(store, SqliteStore):
        return {r[0] for r in query("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return {r[0] for r in query("SHOW TABLES")}


def msg(id: int, uid: int, ts: int = 1_000, kind: str = "comment") -> StoredMessage:
    return StoredMessage(id=id, uid=uid, kind=kind, from_uid=42, body=f'{{"n":{id}}}', ts=ts)


def test_init_schema_twice_creates_every_table(engine: tuple[Store, Query]) -> None:
    store, query = engine
    store.init_schema()  # the fixture already ran it once
    assert _tables(store, query) == ALL_TABLES
    assert query("SELECT version FROM pmq_schema") == [(SCHEMA_VERSION,)]
    store.ping()
    if isinstance(store, SqliteStore):
        assert query("PRAGMA journal_mode") == [("wal",)]


def test_init_schema_refuses_newer_version(engine: tuple[Store, Query]) -> None:
    store, query = engine
    query(f"INSERT INTO pmq_schema (version, applied_at) VALUES ({SCHEMA_VERSION + 1}, 0)")
    with pytest.raises(StorageError, match="newer"):
        store.init_schema()


def test_write_is_idempotent_and_sharded(engine: tuple[Store, Query]) -> None:
    store, query = engine
    batch = [msg(1, uid=1), msg(2, uid=2), msg(3, uid=5), msg(4, uid=8), msg(5, uid=7)]
    assert store.write_messages(batch) == 5
    assert store.write_messages(batch) == 0
    assert store.write_messages([*batch, msg(6, uid=9)]) == 1
    assert store.write_messages([]) == 0
    assert store.count_messages() == 6
    shards = {n: sorted(r[0] for r in query(f"SELECT id FROM pmq_msg_{n}")) for n in range(4)}
    assert shards == {0: [4], 1: [1, 3, 6], 2: [2], 3: [5]}
    row = query("SELECT id, uid, kind, from_uid, body, ts, acked FROM pmq_msg_2")
    assert row == [(2, 2, "comment", 42, '{"n":2}', 1000, 0)]


def test_unacked_order_and_paging(engine: tuple[Store, Query]) -> None:
    store, _ = engine
    store.write_messages([msg(i, uid=3) for i in (50, 10, 40, 20, 30)] + [msg(7, uid=7)])
    assert [m.id for m in store.unacked(3)] == [10, 20, 30, 40, 50]
    first = store.unacked(3, limit=2)
    assert [m.id for m in first] == [10, 20]
    assert [m.id for m in store.unacked(3, after_id=first[-1].id, limit=2)] == [30, 40]
    assert [m.id for m in store.unacked(3, after_id=40)] == [50]
    assert store.unacked(3, after_id=50) == []
    assert store.unacked(7) == [msg(7, uid=7)]  # same shard, other user, values intact
    null_sender = StoredMessage(id=99, uid=11, kind="system", from_uid=None, body="{}", ts=5)
    store.write_messages([null_sender])
    assert store.unacked(11) == [null_sender]


def test_unacked_of_many_users_at_once(engine: tuple[Store, Query]) -> None:
    """One read for a catch-up over many users: their unacked rows above an id, in id
    order, across the shard tables; acked rows and other users' are left out."""
    store, _ = engine
    store.write_messages([msg(i, uid=i % 5) for i in range(1, 21)])
    store.ack(2, [7])
    assert [(m.id, m.uid) for m in store.unacked_of([1, 2, 3], after_id=6)] == [
        (8, 3), (11, 1), (12, 2), (13, 3), (16, 1), (17, 2), (18, 3)
    ]
    assert [m.id for m in store.unacked_of([4], after_id=0, limit=2)] == [4, 9]
    assert store.unacked_of([], after_id=0) == []


def test_ack(engine: tuple[Store, Query]) -> None:
    store, _ = engine
    store.write_messages([msg(i, uid=3) for i in (1, 2, 3)] + [msg(4, uid=7)])
    assert store.ack(3, [1, 3, 1, 999]) == 2
    assert store.ack(3, [1]) == 0  # already acked
    assert store.ack(3, [4]) == 0  # another user's message in the same shard
    assert store.ack(3, []) == 0
    assert [m.id for m in store.unacked(3)] == [2]
    assert [m.id for m in store.unacked(7)] == [4]
    assert store.count_messages() == 4  # acked rows stay until retention


def test_ack_many_ids(engine: tuple[Store, Query]) -> None:
    store, _ = engine
    store.write_messages([msg(i, uid=1) for i in range(1, 1202)])
    assert store.ack(1, range(1, 1201)) == 1200
    assert [m.id for m in store.unacked(1)] == [1201]


def test_existing(engine: tuple[Store, Query]) -> None:
    store, _ = engine
    store.write_messages([msg(i, uid=3) for i in (1, 2, 3)] + [msg(7, uid=7)])
    store.ack(3, [2])
    assert store.existing(3, [1, 2, 3, 7, 999, 1]) == {1, 2, 3}  # acked rows count too
    assert store.existing(7, [1, 7]) == {7}  # same shard, only the user's own
    assert store.existing(3, []) == set()
    store.write_messages([msg(i, uid=5) for i in range(100, 1300)])
    assert store.existing(5, range(50, 1350)) == set(range(100, 1300))  # several chunks


def test_delete_before(engine: tuple[Store, Query], monkeypatch: pytest.MonkeyPatch) -> None:
    store, _ = engine
    monkeypatch.setattr("pmq.store.base.DELETE_CHUNK", 3)  # force several chunks per shard
    old = [msg(i, uid=i % 5, ts=100 + i) for i in range(1, 21)]
    new = [msg(i, uid=i % 5, ts=5_000) for i in range(21, 31)]
    store.write_messages(old + new)
    store.ack(1, [1])
    assert store.delete_before(5_000) == 20
    assert store.delete_before(5_000) == 0
    assert store.count_messages() == 10
    assert [m.id for m in store.unacked(1)] == [21, 26]


def test_big_batch_is_split(engine: tuple[Store, Query]) -> None:
    store, _ = engine
    rows = [msg(i, uid=1) for i in range(1, 2502)]
    assert store.write_messages(rows) == 2501
    assert store.count_messages() == 2501


def test_concurrent_writers(engine: tuple[Store, Query]) -> None:
    store, _ = engine
    barrier = threading.Barrier(8)

    def write(worker: int) -> int:
        barrier.wait()
        total = 0
        for batch in range(5):
            base = worker * 1000 + batch * 100
            total += store.write_messages([msg(base + i, uid=base + i) for i in range(1, 21)])
        return total

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(write, range(8))) == 8 * 5 * 20
    assert store.count_messages() == 800


@pytest.mark.mysql
def test_mysql_reconnects_after_connections_die(mysql_engine: tuple[Store, Query]) -> None:
    store, _ = mysql_engine
    assert isinstance(store, MysqlStore)
    store.write_messages([msg(1, uid=1)])
    server = _server()
    with server.cursor() as cur:  # what a server restart does to the pooled connections
        cur.execute(
            "SELECT id FROM information_schema.PROCESSLIST WHERE db = %s AND id != CONNECTION_ID()",
            (store.target.database,),
        )
        pooled = cur.fetchall()
        assert pooled, "the store should keep an idle connection in its pool"
        for (conn_id,) in pooled:
            cur.execute(f"KILL {int(conn_id)}")
    server.close()
    assert store.write_messages([msg(2, uid=1)]) == 1
    assert [m.id for m in store.unacked(1)] == [1, 2]


def test_closed_store_refuses(tmp_path: Path) -> None:
    store = open_store(StorageConfig(url=f"sqlite:///{tmp_path}/a.db", shards=2))
    store.init_schema()
    store.close()
    store.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        store.ping()


def test_mysql_ping_on_closed_port_raises() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = open_store(StorageConfig(url=f"mysql://root@127.0.0.1:{port}/pmq"))
    try:
        with pytest.raises(StorageError, match=f"127.0.0.1:{port}"):
            store.ping()
        with pytest.raises(StorageError):
            store.write_messages([msg(1, uid=1)])
    finally:
        store.close()


def test_sqlite_relative_url_creates_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store(StorageConfig(url="sqlite:///var/deep/pmq.db", shards=2))
    monkeypatch.chdir("/")  # the path was fixed at open time
    store.init_schema()
    store.close()
    assert (tmp_path / "var" / "deep" / "pmq.db").is_file()


def test_mysql_url_parsing() -> None:
    store = open_store(StorageConfig(url="mysql://us%40er:p%3Ass@db.example:3307/pmq_1"))
    assert isinstance(store, MysqlStore)
    t = store.target
    assert (t.host, t.port, t.user, t.password, t.database) == (
        "db.example",
        3307,
        "us@er",
        "p:ss",
        "pmq_1",
    )
    assert "p:ss" not in repr(t)
    default = open_store(StorageConfig(url="mysql://root@localhost/pmq"))
    assert isinstance(default, MysqlStore)
    assert (default.target.port, default.target.password) == (3306, "")


@pytest.mark.parametrize(
    "url",
    [
        "postgres://u@h/db",
        "sqlite://relative.db",
        "sqlite:///",
        "sqlite:///dir/",
        "sqlite:///:memory:",
        "sqlite:///pmq.db?mode=ro",
        "sqlite:///pmq.db#x",
        "mysql://h/db",
        "mysql://u@/db",
        "mysql://u@h:notaport/db",
        "mysql://u@h:99999/db",
        "mysql://u@h",
        "mysql://u@h/",
        "mysql://u@h/db/extra",
        "mysql://u@h/db?charset=latin1",
        "mysql://u@h/bad`name",
    ],
)
def test_bad_url(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^storage\.url: "):
        open_store(StorageConfig(url=url))


def test_sqlite_path_is_the_file_the_store_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One reading of a SQLite URL for all: the store's file is the one the file-mode check
    and the generated JWT secret sit beside."""
    monkeypatch.chdir(tmp_path)
    assert sqlite_path("sqlite:///var/pmq.db") == tmp_path / "var" / "pmq.db"
    assert sqlite_path(f"sqlite:///{tmp_path}/pmq.db") == tmp_path / "pmq.db"  # absolute
    assert sqlite_path("mysql://u@h/db") is None
    store = open_store(StorageConfig(url="sqlite:///var/pmq.db"))
    assert isinstance(store, SqliteStore) and store.path == tmp_path / "var" / "pmq.db"
    store.close()
    with pytest.raises(ConfigError, match=r"^storage\.shard_map: "):
        sqlite_path("sqlite:///pmq.db?cache=shared", "storage.shard_map")


# storage.shard_map: message shards on several databases ---------------------------------


@pytest.mark.mysql
def test_shard_map_puts_rows_in_their_database(tmp_path: Path) -> None:
    """Shards 2-3 on a second database: ``pmqctl db init`` creates each database's tables,
    rows land where their shard lives, and reads, acks, counts and retention follow them."""
    import subprocess
    import sys

    server = _server()
    names = [f"pmq_test_{secrets.token_hex(6)}" for _ in range(2)]
    main_url, other_url = (f"{SERVER_URL}/{n}" for n in names)

    def tables(name: str) -> set[str]:
        with server.cursor() as cur:
            cur.execute(f"SHOW TABLES FROM `{name}`")
            rows = {r[0] for r in cur.fetchall()}
        server.commit()
        return rows

    def ids(name: str, shard: int) -> set[int]:
        with server.cursor() as cur:
            cur.execute(f"SELECT id FROM `{name}`.pmq_msg_{shard}")
            rows = {int(r[0]) for r in cur.fetchall()}
        server.commit()
        return rows

    config_path = tmp_path / "pmq.toml"
    config_path.write_text(
        f'[storage]\nurl = "{main_url}"\nshards = {SHARDS}\n'
        f'[storage.shard_map]\n"2-3" = "{other_url}"\n'
    )
    store = open_store(
        StorageConfig(url=main_url, shards=SHARDS, pool_size=2, shard_map={"2-3": other_url})
    )
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pmq.ctl", "db", "init", "-c", str(config_path)],
            capture_output=True, text=True, timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("PMQ_")},
        )
        assert done.returncode == 0, done.stderr
        assert tables(names[0]) == {"pmq_msg_0", "pmq_msg_1"} | OTHER_TABLES
        assert tables(names[1]) == {"pmq_schema", "pmq_msg_2", "pmq_msg_3"}

        rows = [msg(100 + uid, uid, ts=1_000 + uid) for uid in range(8)]
        assert store.write_messages(rows) == 8
        assert store.write_messages(rows) == 0  # idempotent across both databases
        for shard in range(SHARDS):
            name = names[0] if shard < 2 else names[1]
            assert ids(name, shard) == {100 + uid for uid in range(8) if uid % SHARDS == shard}
        assert [m.id for m in store.unacked(6)] == [106]
        assert [m.id for m in store.unacked_of(range(8), after_id=101)] == [*range(102, 108)]
        assert store.ack(6, [106]) == 1
        assert store.existing(3, [103, 107]) == {103}
        assert store.count_messages() == 8
        assert store.delete_before(1_004) == 4  # uids 0..3, on both databases
        assert store.count_messages() == 4
    finally:
        store.close()
        with server.cursor() as cur:
            for name in names:
                cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        server.close()
