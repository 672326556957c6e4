"""The embedded store: one SQLite file in WAL mode, one connection per thread.

WAL lets readers run beside the single writer; writers wait for each other up to
BUSY_TIMEOUT_MS instead of failing at once. Each thread that touches the store gets its own
connection (sqlite3 connections must not be shared between threads) and keeps it until
:meth:`SqliteStore.close`, which suits the long-lived threads of task workers and pools.

A store opened ``light`` (the socket worker's: replays, pulls and acks of what left Redis,
now and then, from a few threads) gives each connection a small page cache and statement
cache. At SQLite's defaults each of them fills a 2 MiB page cache and 128 compiled statements
over the 128 shard tables, slowly, as cold reads reach new pages and shards: about 9 MiB more
for four threads, which the soak saw as the socket worker's memory creeping up for half an
hour. The file's pages stay in the OS's cache either way.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pmq.errors import StorageDataError, StorageError
from pmq.store.base import Cursor, Store

BUSY_TIMEOUT_MS = 5000
OWNER_ONLY = 0o600  # the database and its -wal and -shm: messages are private
# Errors about the data of a statement, not the file: a constraint, a value SQLite cannot
# hold (an integer past 64 bits fails while binding, as Python's OverflowError).
DATA_ERRORS = (sqlite3.IntegrityError, sqlite3.DataError, OverflowError)
LIGHT_CACHE_KIB = 256  # page cache of a light store's connection (SQLite's default: 2000)
LIGHT_STATEMENTS = 16  # compiled statements it keeps (Python's default: 128)
# WAL pages after which a commit checkpoints them into the database file (SQLite's default:
# 1000). A storage writer's batch of 2,000 rows to 10,000 users writes about 2,700 pages (the
# last pages of every shard's table and three indexes, much the same ones batch after batch),
# so at 1000 every batch's commit also copied all of them into the file. At 10,000 (a WAL of
# up to about 40 MiB) a checkpoint comes every few batches and copies each page once: 18.5 to
# 14.4 us of the writer's CPU per row.
WAL_CHECKPOINT_PAGES = 10_000


class SqliteStore(Store):
    """A :class:`Store` in the SQLite file ``path`` (its directory is created if missing)."""

    engine = "sqlite"
    placeholder = "?"
    insert_ignore = "INSERT OR IGNORE"
    replace_into = "INSERT OR REPLACE"
    keep_higher_mark = (
        "ON CONFLICT (bucket) DO UPDATE SET epoch = excluded.epoch, gen = excluded.gen "
        "WHERE (excluded.epoch, excluded.gen) > (epoch, gen)"
    )

    def __init__(
        self, path: Path, shards: int, owned: Sequence[int] | None = None, light: bool = False
    ) -> None:
        super().__init__(shards, owned)
        self.path = path
        self.light = light
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # SQLite would create the file 0644 (less the umask); an empty file is a valid
            # empty database, and SQLite gives its -wal and -shm the database file's mode.
            os.close(os.open(path, os.O_RDONLY | os.O_CREAT, OWNER_ONLY))
        except OSError as exc:
            raise StorageError(f"sqlite: cannot create {path}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        if self._closed:
            raise StorageError("sqlite: store is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        with self._lock:
            if self._closed:
                raise StorageError("sqlite: store is closed")
            # timeout: the busy timeout. isolation_level=None: no implicit transactions,
            # _session says BEGIN itself.
            # check_same_thread=False only so close() may close every thread's connection.
            conn = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
                cached_statements=LIGHT_STATEMENTS if self.light else 128,
            )
            self._connections.append(conn)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")  # durable enough in WAL, much faster
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
        if self.light:
            conn.execute(f"PRAGMA cache_size = -{LIGHT_CACHE_KIB}")
        self._local.conn = conn
        return conn

    @contextmanager
    def _session(self, op: str, write: bool) -> Iterator[Cursor]:
        try:
            conn = self._connection()
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite {op}: cannot open {self.path}: {exc}") from exc
        if not write:  # one statement per read: autocommit sees a consistent snapshot
            try:
                yield conn.cursor()
            except sqlite3.Error as exc:
                raise StorageError(f"sqlite {op} failed: {exc}") from exc
            return
        try:
            # IMMEDIATE takes the write lock up front, so busy_timeout applies to waiting
            # for it instead of a deferred upgrade failing with SQLITE_BUSY mid-transaction.
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite {op}: cannot begin: {exc}") from exc
        try:
            yield conn.cursor()
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, DATA_ERRORS):
                raise StorageDataError(f"sqlite {op} refused the data: {exc}") from exc
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"sqlite {op} failed: {exc}") from exc
            raise

    def _schema_table(self) -> str:
        return (
            "CREATE TABLE IF NOT EXISTS pmq_schema ("
            "version INTEGER NOT NULL PRIMARY KEY, applied_at BIGINT NOT NULL)"
        )

    def _schema_statements(self) -> list[str]:
        statements: list[str] = []
        for n in self.owned:
            t = f"pmq_msg_{n}"
            statements += [
                # INTEGER PRIMARY KEY: the id is the rowid, no separate index.
                f"CREATE TABLE IF NOT EXISTS {t} ("
                "id INTEGER PRIMARY KEY, uid BIGINT NOT NULL, kind VARCHAR(32) NOT NULL, "
                "from_uid BIGINT NULL, body TEXT NOT NULL, ts BIGINT NOT NULL, "
                "acked TINYINT NOT NULL DEFAULT 0, revoked TINYINT NOT NULL DEFAULT 0)",
                f"CREATE INDEX IF NOT EXISTS {t}_uid_acked_id ON {t} (uid, acked, id)",
                f"CREATE INDEX IF NOT EXISTS {t}_ts ON {t} (ts)",
            ]
        return [
            *statements,
            "CREATE TABLE IF NOT EXISTS pmq_broadcast ("
            "id INTEGER PRIMARY KEY, grp VARCHAR(64) NOT NULL, kind VARCHAR(32) NOT NULL, "
            "body TEXT NOT NULL, ts BIGINT NOT NULL, dedupe_key VARCHAR(128) NULL, "
            "revoked TINYINT NOT NULL DEFAULT 0)",
            "CREATE INDEX IF NOT EXISTS pmq_broadcast_grp_id ON pmq_broadcast (grp, id)",
            "CREATE TABLE IF NOT EXISTS pmq_last_read ("
            "uid BIGINT NOT NULL, kind VARCHAR(32) NOT NULL, ts BIGINT NOT NULL, "
            "PRIMARY KEY (uid, kind)) WITHOUT ROWID",
            "CREATE TABLE IF NOT EXISTS pmq_read ("
            "uid BIGINT NOT NULL, id BIGINT NOT NULL, ts BIGINT NOT NULL, "
            "PRIMARY KEY (uid, id)) WITHOUT ROWID",
            "CREATE TABLE IF NOT EXISTS pmq_read_mark ("
            "uid BIGINT NOT NULL, kind VARCHAR(32) NOT NULL, mark BIGINT NOT NULL, "
            "PRIMARY KEY (uid, kind)) WITHOUT ROWID",
            "CREATE TABLE IF NOT EXISTS pmq_redis_mark ("
            "bucket INTEGER PRIMARY KEY, epoch BIGINT NOT NULL, gen BIGINT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS pmq_cs_session ("
            "id INTEGER PRIMARY KEY, uid BIGINT NOT NULL, agent BIGINT NULL, "
            "status VARCHAR(16) NOT NULL, opened_at BIGINT NOT NULL, closed_at BIGINT NULL, "
            "last_msg_id BIGINT NULL)",
            "CREATE INDEX IF NOT EXISTS pmq_cs_session_uid ON pmq_cs_session (uid)",
            "CREATE INDEX IF NOT EXISTS pmq_cs_session_agent ON pmq_cs_session (agent)",
            "CREATE TABLE IF NOT EXISTS pmq_cs_message ("
            "id INTEGER PRIMARY KEY, session_id BIGINT NOT NULL, from_uid BIGINT NOT NULL, "
            "to_uid BIGINT NOT NULL, body TEXT NOT NULL, ts BIGINT NOT NULL)",
            "CREATE INDEX IF NOT EXISTS pmq_cs_message_session_id "
            "ON pmq_cs_message (session_id, id)",
        ]

    def _add_index(self, cur: Cursor, table: str, column: str) -> None:
        name = f"{table}_{column.replace(', ', '_')}"
        cur.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({column})")

    def _add_column(self, cur: Cursor, table: str, column: str, definition: str) -> None:
        # Writers hold the file's lock (BEGIN IMMEDIATE): no other process adds it meanwhile.
        cur.execute(f"PRAGMA table_info({table})")
        if column not in {row[1] for row in cur.fetchall()}:
            cur.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

    def _delete_chunk(self, table: str, column: str, limit: int) -> str:
        # DELETE ... LIMIT needs a compile-time option most builds lack; go through the rowid.
        return (
            f"DELETE FROM {table} WHERE id IN "
            f"(SELECT id FROM {table} WHERE {column} < ? LIMIT {limit})"
        )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
