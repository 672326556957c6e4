"""What the store keeps in memory per thread: a socket worker's store (open_store(light=True))
gives each SQLite connection small caches (pmq.store.sqlite)."""

from __future__ import annotations

import ctypes
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from pmq.config import StorageConfig
from pmq.store import Store, StoredMessage, open_store
from pmq.store.sqlite import LIGHT_CACHE_KIB, SqliteStore

SHARDS = 128  # the default: a statement per shard table
USERS_PER_SHARD = 4
ROWS_PER_USER = 20
THREADS = 4  # the socket worker's store threads
MIB = 1024 * 1024


def sqlite_memory() -> Callable[[], int]:
    """SQLite's own count of the bytes it holds in this process (sqlite3_memory_used), read
    from the library the sqlite3 module is linked to; skips when that is not a shared one."""
    loaded = [
        line.split()[-1]
        for line in Path("/proc/self/maps").read_text().splitlines()
        if "libsqlite3" in line
    ]
    if not loaded:
        pytest.skip("the sqlite3 module's SQLite is not a shared library here")
    library = ctypes.CDLL(loaded[0])
    library.sqlite3_memory_used.restype = ctypes.c_int64
    return library.sqlite3_memory_used  # type: ignore[no-any-return]


def filled_store(path: Path, light: bool) -> Store:
    store = open_store(StorageConfig(url=f"sqlite:///{path}", shards=SHARDS), light=light)
    store.init_schema()
    return store


def users() -> list[int]:
    return [shard + SHARDS * n for shard in range(SHARDS) for n in range(USERS_PER_SHARD)]


def write_messages(store: Store) -> None:
    """ROWS_PER_USER messages to every user, in turns (as they come in: a user's messages
    are spread over the pages of their shard's table)."""
    rows = [
        StoredMessage(id=n * 100_000 + uid + 1, uid=uid, kind="c", from_uid=1, body="x" * 300, ts=1)
        for n in range(ROWS_PER_USER)
        for uid in users()
    ]
    store.write_messages(rows)


def read_from_threads(store: Store) -> int:
    """What SQLite holds more after THREADS threads (a connection each) read every user's
    messages and ack some: replays and acks reaching every shard and page."""
    used = sqlite_memory()
    before = used()
    failed: list[BaseException] = []

    def read_all() -> None:
        try:
            for uid in users():
                found = store.unacked(uid, 0, 200)
                store.ack(uid, [m.id for m in found[: uid % 7]])
        except BaseException as exc:
            failed.append(exc)

    threads = [threading.Thread(target=read_all) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failed, failed
    return int(used()) - before


def test_light_store_connections_keep_small_caches(tmp_path: Path) -> None:
    """Four threads reading every shard: with SQLite's defaults (a 2 MiB page cache and 128
    compiled statements per connection) SQLite holds 3.8 to 7 MiB more; a light store's
    connections about 0.5 MiB each."""
    default = filled_store(tmp_path / "default.db", light=False)
    write_messages(default)
    light = filled_store(tmp_path / "light.db", light=True)
    write_messages(light)
    try:
        grown_default = read_from_threads(default)
        grown_light = read_from_threads(light)
    finally:
        default.close()
        light.close()
    # The light bound is absolute, well under what the defaults were measured to hold (3.8
    # to 7 MiB; their figure varies with the pages the threads happen to touch, so the two
    # are not compared by a ratio).
    assert grown_light < 0.75 * THREADS * MIB, (grown_light, grown_default)
    assert grown_light < grown_default, (grown_light, grown_default)


def test_light_store_asks_for_the_small_page_cache(tmp_path: Path) -> None:
    store = filled_store(tmp_path / "pmq.db", light=True)
    try:
        assert isinstance(store, SqliteStore)
        conn = store._connection()
        assert conn.execute("PRAGMA cache_size").fetchone() == (-LIGHT_CACHE_KIB,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        store.close()


def test_default_store_keeps_sqlites_page_cache(tmp_path: Path) -> None:
    """The task worker's store (the writer) is not light: its batched inserts into every
    shard's table and indexes use the default cache."""
    store = filled_store(tmp_path / "pmq.db", light=False)
    try:
        assert isinstance(store, SqliteStore)
        default = sqlite3.connect(":memory:").execute("PRAGMA cache_size").fetchone()
        assert store._connection().execute("PRAGMA cache_size").fetchone() == default
    finally:
        store.close()
