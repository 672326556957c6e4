"""Floor 3, SQL storage of messages and the other durable tables; :func:`open_store` picks
the engine. It imports only the floors below (the base modules at pmq/'s root and pmq.wire),
never Redis.

``storage.url`` forms:

* ``sqlite:///relative/path.db``: a file relative to the working directory at open time
* ``sqlite:////absolute/path.db``: an absolute path (no ?query or #fragment in either;
  :func:`sqlite_path` reads both, for every part of PMQ that needs the file)
* ``mysql://user[:pass]@host[:port]/db``: parts percent-decoded, port 3306 by default

``storage.shard_map`` moves ranges of message shards to other MySQL databases
(pmq.store.sharded); the rest stay on ``storage.url``.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pmq.config import StorageConfig
from pmq.configload import shard_ranges
from pmq.errors import ConfigError
from pmq.store.base import SCHEMA_VERSION, Store
from pmq.store.mysql import MysqlStore, MysqlTarget
from pmq.store.rows import StoredMessage
from pmq.store.sharded import ShardedStore
from pmq.store.sqlite import SqliteStore

__all__ = ["SCHEMA_VERSION", "ShardedStore", "Store", "StoredMessage", "open_store", "sqlite_path"]

SQLITE_PREFIX = "sqlite:///"
MYSQL_DEFAULT_PORT = 3306
DATABASE_NAME = re.compile(r"[A-Za-z0-9_$]{1,64}")


def open_store(config: StorageConfig, light: bool = False) -> Store:
    """The store ``config.url`` names, not yet connected: call ``init_schema()`` once at
    start, then use it from any thread, and ``close()`` it at exit. With a
    ``storage.shard_map`` it is a :class:`ShardedStore` over every database named. A
    malformed URL raises ConfigError naming its key. ``light``: for a process that uses
    the store now and then, small caches per SQLite connection (pmq.store.sqlite)."""
    ranges = shard_ranges(config.shard_map, config.shards)
    mapped = {n for lo, hi, _ in ranges for n in range(lo, hi + 1)}
    owned = [n for n in range(config.shards) if n not in mapped]
    primary = _open_one(config.url, "storage.url", config, owned, light)
    if not ranges:
        return primary
    by_url: dict[str, list[int]] = {}
    for lo, hi, url in ranges:
        by_url.setdefault(url, []).extend(range(lo, hi + 1))
    others = [
        _open_one(url, f"storage.shard_map (url {url!r})", config, shards, light)
        for url, shards in by_url.items()
    ]
    return ShardedStore(primary, others)


def _open_one(
    url: str, key: str, config: StorageConfig, owned: list[int], light: bool = False
) -> Store:
    path = sqlite_path(url, key)
    if path is not None:
        return SqliteStore(path, config.shards, owned, light)
    if url.startswith("mysql://"):
        return MysqlStore(_mysql_target(url, key), config.shards, config.pool_size, owned)
    raise ConfigError(f"{key}: must start with sqlite:/// or mysql://")


def sqlite_path(url: str, key: str = "storage.url") -> Path | None:
    """The database file a SQLite ``url`` names (module docstring), absolute (a relative
    path is taken from the working directory now); None when ``url`` is not a SQLite URL.
    A SQLite URL naming no file, an in-memory database, or with a ?query or #fragment
    raises ConfigError naming ``key``."""
    if not url.startswith(SQLITE_PREFIX):
        return None
    path = url[len(SQLITE_PREFIX) :]
    if "?" in path or "#" in path:
        raise ConfigError(f"{key}: unexpected ?query or #fragment in {url!r}")
    if not path or path.endswith("/"):
        raise ConfigError(f"{key}: no database file in {url!r}")
    if path == ":memory:":
        # Every thread has its own connection, so each would see a different empty database.
        raise ConfigError(f"{key}: an in-memory SQLite database is not supported")
    return Path(path).absolute()


def _mysql_target(url: str, key: str = "storage.url") -> MysqlTarget:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"{key}: {why} (want mysql://user[:pass]@host[:port]/db)")

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
