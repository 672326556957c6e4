"""SQL storage of messages and the other durable tables; :func:`open_store` picks the engine.

``storage.url`` forms:

* ``sqlite:///relative/path.db``: a file relative to the working directory at open time
* ``sqlite:////absolute/path.db``: an absolute path
* ``mysql://user[:pass]@host[:port]/db``: parts percent-decoded, port 3306 by default
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pmq.config import StorageConfig
from pmq.errors import ConfigError
from pmq.store.base import SCHEMA_VERSION, Store, StoredMessage
from pmq.store.mysql import MysqlStore, MysqlTarget
from pmq.store.sqlite import SqliteStore

__all__ = ["SCHEMA_VERSION", "Store", "StoredMessage", "open_store"]

SQLITE_PREFIX = "sqlite:///"
MYSQL_DEFAULT_PORT = 3306
DATABASE_NAME = re.compile(r"[A-Za-z0-9_$]{1,64}")


def open_store(config: StorageConfig) -> Store:
    """The store ``config.url`` names, not yet connected: call ``init_schema()`` once at
    start, then use it from any thread, and ``close()`` it at exit. A malformed URL raises
    ConfigError naming ``storage.url``."""
    url = config.url
    if url.startswith(SQLITE_PREFIX):
        return SqliteStore(_sqlite_path(url), config.shards)
    if url.startswith("mysql://"):
        return MysqlStore(_mysql_target(url), config.shards, config.pool_size)
    raise ConfigError("storage.url: must start with sqlite:/// or mysql://")


def _sqlite_path(url: str) -> Path:
    path = url[len(SQLITE_PREFIX) :]
    if not path or path.endswith("/"):
        raise ConfigError(f"storage.url: no database file in {url!r}")
    if path == ":memory:":
        # Every thread has its own connection, so each would see a different empty database.
        raise ConfigError("storage.url: an in-memory SQLite database is not supported")
    return Path(path).absolute()


def _mysql_target(url: str) -> MysqlTarget:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"storage.url: {why} (want mysql://user[:pass]@host[:port]/db)")

    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise bad("unexpected ?query or #fragment")
    if not parts.hostname:
        raise bad("no host")
    if not parts.username:
        raise bad("no user")
    try:
        port = parts.port or MYSQL_DEFAULT_PORT
    except ValueError:
        raise bad("bad port") from None
    database = unquote(parts.path.removeprefix("/"))
    if not DATABASE_NAME.fullmatch(database):
        raise bad(f"database name {database!r} must be 1-64 of A-Z a-z 0-9 _ $")
    return MysqlTarget(
        host=parts.hostname,
        port=port,
        user=unquote(parts.username),
        password=unquote(parts.password or ""),
        database=database,
    )
