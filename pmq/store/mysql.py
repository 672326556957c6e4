"""The production store: MySQL or MariaDB through PyMySQL and a DBUtils ``PooledDB``.

The pool holds at most ``pool_size`` connections and makes callers wait for a free one. It
pings every connection it hands out and reopens a dead one, so after a server restart the
first call may fail with StorageError (the caller retries; writes are idempotent) and the
next ones find fresh connections. Writes run in an explicit transaction, committed once per
call; a connection lost inside one is never silently replaced mid-transaction.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import pymysql
from dbutils.pooled_db import PooledDB, PooledDBError
from pymysql.constants import ER

from pmq.errors import StorageDataError, StorageError
from pmq.store.base import Cursor, Store

CONNECT_TIMEOUT = 5  # seconds to open a connection
IO_TIMEOUT = 60  # seconds one statement may take before the connection is given up
TABLE_OPTIONS = "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci"
DRIVER_ERRORS = (pymysql.MySQLError, PooledDBError)
# What the server says about the data of a statement (out of range, too long, a constraint),
# not about itself or the connection: a retry fails the same way.
DATA_ERRORS = (pymysql.DataError, pymysql.IntegrityError)


@dataclasses.dataclass(frozen=True)
class MysqlTarget:
    """Where the store lives, as parsed from ``mysql://user[:pass]@host[:port]/db``."""

    host: str
    port: int
    user: str
    password: str = dataclasses.field(repr=False)
    database: str


class MysqlStore(Store):
    """A :class:`Store` in the MySQL/MariaDB database ``target``. Opening it connects to
    nothing; the first call (or :meth:`ping`) does."""

    engine = "mysql"
    placeholder = "%s"
    insert_ignore = "INSERT IGNORE"
    replace_into = "REPLACE"
    # gen is compared with the old epoch, so it is assigned before epoch (MariaDB assigns
    # left to right; with SIMULTANEOUS_ASSIGNMENT both read the old row, equally right).
    keep_higher_mark = (
        "ON DUPLICATE KEY UPDATE "
        "gen = IF((VALUES(epoch), VALUES(gen)) > (epoch, gen), VALUES(gen), gen), "
        "epoch = GREATEST(epoch, VALUES(epoch))"
    )

    def __init__(
        self,
        target: MysqlTarget,
        shards: int,
        pool_size: int,
        owned: Sequence[int] | None = None,
    ) -> None:
        super().__init__(shards, owned)
        self.target = target
        self._lock = threading.Lock()
        self._closed = False
        self._pool = PooledDB(
            creator=pymysql,
            mincached=0,
            maxcached=pool_size,
            maxconnections=pool_size,
            blocking=True,  # wait for a free connection rather than fail
            ping=1,  # check (and reopen) each connection as it leaves the pool
            **self._connect_args(),
            database=target.database,
            autocommit=False,
        )

    def _connect_args(self) -> dict[str, Any]:
        t = self.target
        return {
            "host": t.host,
            "port": t.port,
            "user": t.user,
            "password": t.password,
            "charset": "utf8mb4",
            "connect_timeout": CONNECT_TIMEOUT,
            "read_timeout": IO_TIMEOUT,
            "write_timeout": IO_TIMEOUT,
        }

    def _where(self) -> str:
        return f"{self.target.host}:{self.target.port}/{self.target.database}"

    @contextmanager
    def _session(self, op: str, write: bool) -> Iterator[Cursor]:
        if self._closed:
            raise StorageError("mysql: store is closed")
        try:
            conn = self._pool.connection()
        except DRIVER_ERRORS as exc:
            raise StorageError(f"mysql {op}: cannot connect to {self._where()}: {exc}") from exc
        try:
            if write:
                # begin() also tells DBUtils not to reconnect and retry a statement behind
                # our back, which would commit only the statements after the loss.
                conn.begin()
            cursor = conn.cursor()
            try:
                yield cursor
                if write:
                    conn.commit()
            finally:
                cursor.close()
        except BaseException as exc:
            with suppress(*DRIVER_ERRORS):
                conn.rollback()
            if isinstance(exc, DATA_ERRORS):
                raise StorageDataError(f"mysql {op} refused the data: {exc}") from exc
            if isinstance(exc, DRIVER_ERRORS):
                raise StorageError(f"mysql {op} failed on {self._where()}: {exc}") from exc
            raise
        finally:
            conn.close()  # back to the pool, which rolls back whatever a read left open

    def init_schema(self) -> None:
        """Create the database if it is missing (an account without that privilege may
        use an existing one), then the tables as :meth:`Store.init_schema`."""
        try:
            conn = pymysql.connect(**self._connect_args())
            try:
                with conn.cursor() as cur:
                    cur.execute(
                        f"CREATE DATABASE IF NOT EXISTS `{self.target.database}` "
                        "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
                    )
            finally:
                conn.close()
        except pymysql.MySQLError as exc:
            if exc.args[0] != ER.DBACCESS_DENIED_ERROR:
                raise StorageError(
                    f"mysql init_schema: cannot create database on {self._where()}: {exc}"
                ) from exc
        super().init_schema()

    def _schema_table(self) -> str:
        return (
            "CREATE TABLE IF NOT EXISTS pmq_schema ("
            f"version INT NOT NULL PRIMARY KEY, applied_at BIGINT NOT NULL) {TABLE_OPTIONS}"
        )

    def _schema_statements(self) -> list[str]:
        messages = [
            f"CREATE TABLE IF NOT EXISTS pmq_msg_{n} ("
            "id BIGINT UNSIGNED NOT NULL PRIMARY KEY, uid BIGINT UNSIGNED NOT NULL, "
            "kind VARCHAR(32) NOT NULL, from_uid BIGINT UNSIGNED NULL, body MEDIUMTEXT NOT NULL, "
            "ts BIGINT NOT NULL, acked TINYINT NOT NULL DEFAULT 0, "
            "revoked TINYINT NOT NULL DEFAULT 0, "
            f"KEY idx_uid_acked_id (uid, acked, id), KEY idx_ts (ts)) {TABLE_OPTIONS}"
            for n in self.owned
        ]
        if not self.primary:
            return messages
        return [
            *messages,
            "CREATE TABLE IF NOT EXISTS pmq_broadcast ("
            "id BIGINT UNSIGNED NOT NULL PRIMARY KEY, grp VARCHAR(64) NOT NULL, "
            "kind VARCHAR(32) NOT NULL, body MEDIUMTEXT NOT NULL, ts BIGINT NOT NULL, "
            "dedupe_key VARCHAR(128) NULL, revoked TINYINT NOT NULL DEFAULT 0, "
            f"KEY idx_grp_id (grp, id)) {TABLE_OPTIONS}",
            "CREATE TABLE IF NOT EXISTS pmq_read ("
            "uid BIGINT UNSIGNED NOT NULL, id BIGINT UNSIGNED NOT NULL, ts BIGINT NOT NULL, "
            f"PRIMARY KEY (uid, id)) {TABLE_OPTIONS}",
            "CREATE TABLE IF NOT EXISTS pmq_read_mark ("
            "uid BIGINT UNSIGNED NOT NULL, kind VARCHAR(32) NOT NULL, "
            "mark BIGINT UNSIGNED NOT NULL, "
            f"PRIMARY KEY (uid, kind)) {TABLE_OPTIONS}",
            "CREATE TABLE IF NOT EXISTS pmq_last_read ("
            "uid BIGINT UNSIGNED NOT NULL, kind VARCHAR(32) NOT NULL, ts BIGINT NOT NULL, "
            f"PRIMARY KEY (uid, kind)) {TABLE_OPTIONS}",
            "CREATE TABLE IF NOT EXISTS pmq_redis_mark ("
            "bucket INT NOT NULL PRIMARY KEY, epoch BIGINT NOT NULL, gen BIGINT NOT NULL) "
            f"{TABLE_OPTIONS}",
            "CREATE TABLE IF NOT EXISTS pmq_cs_session ("
            "id BIGINT UNSIGNED NOT NULL PRIMARY KEY, uid BIGINT UNSIGNED NOT NULL, "
            "agent BIGINT UNSIGNED NULL, status VARCHAR(16) NOT NULL, opened_at BIGINT NOT NULL, "
            "closed_at BIGINT NULL, last_msg_id BIGINT UNSIGNED NULL, "
            f"KEY idx_uid (uid), KEY idx_agent (agent)) {TABLE_OPTIONS}",
            "CREATE TABLE IF NOT EXISTS pmq_cs_message ("
            "id BIGINT UNSIGNED NOT NULL PRIMARY KEY, session_id BIGINT UNSIGNED NOT NULL, "
            "from_uid BIGINT UNSIGNED NOT NULL, to_uid BIGINT UNSIGNED NOT NULL, "
            "body MEDIUMTEXT NOT NULL, ts BIGINT NOT NULL, "
            f"KEY idx_session_id (session_id, id)) {TABLE_OPTIONS}",
        ]

    def _add_index(self, cur: Cursor, table: str, column: str) -> None:
        # MySQL has no ADD INDEX IF NOT EXISTS (MariaDB has): look first, and take a
        # "duplicate key name" as done, when another process added it meanwhile.
        name = f"idx_{column.replace(', ', '_')}"
        cur.execute(
            "SELECT COUNT(*) FROM information_schema.statistics WHERE "
            "table_schema = DATABASE() AND table_name = %s AND index_name = %s",
            (table, name),
        )
        if cur.fetchall()[0][0]:
            return
        try:
            cur.execute(f"ALTER TABLE {table} ADD KEY {name} ({column})")
        except pymysql.OperationalError as exc:
            if exc.args[0] != ER.DUP_KEYNAME:
                raise

    def _add_column(self, cur: Cursor, table: str, column: str, definition: str) -> None:
        # As _add_index: look first, and take "duplicate column name" as done.
        cur.execute(
            "SELECT COUNT(*) FROM information_schema.columns WHERE "
            "table_schema = DATABASE() AND table_name = %s AND column_name = %s",
            (table, column),
        )
        if cur.fetchall()[0][0]:
            return
        try:
            cur.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        except pymysql.OperationalError as exc:
            if exc.args[0] != ER.DUP_FIELDNAME:
                raise

    def _delete_chunk(self, table: str, column: str, limit: int) -> str:
        # ORDER BY follows the (column, id) index and keeps the statement safe for replication.
        return f"DELETE FROM {table} WHERE {column} < %s ORDER BY {column}, id LIMIT {limit}"

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.close()
