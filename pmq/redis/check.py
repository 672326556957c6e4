"""What PMQ needs of Redis, checked once when a node starts (before any worker forks).

Each server PMQ writes to (on a Redis Cluster: every master) is asked for ``appendonly``,
``appendfsync`` and ``maxmemory-policy`` with CONFIG GET, or, where CONFIG is renamed or
refused (managed Redis), read from INFO. Then:

- an evicting ``maxmemory-policy`` (anything but ``noeviction``) would drop inboxes and
  queues silently: the start fails, naming ``maxmemory-policy``;
- AOF off means a Redis restart loses what it held: a warning, or a failed start naming
  ``appendonly`` when ``redis.require_aof = true`` or ``redis.durability = "aof"``;
- ``redis.durability = "aof"`` needs WAITAOF (Redis 7.2 or later): else the start fails,
  naming ``redis.durability``.

Every problem is reported (:func:`inspect`), not only the first; pmq.workers.startcheck runs this at
start (ConfigError, exit 1) and in ``pmqctl check``.
"""

from __future__ import annotations

import dataclasses
import logging

import redis
from redis.exceptions import RedisError, ResponseError

from pmq.config import CLUSTER_URL, RedisConfig

log = logging.getLogger(__name__)

TIMEOUT = 5.0
WAITAOF_SINCE = (7, 2)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The settings of one Redis server that PMQ's promises depend on ("?" when unknown)."""

    server: str
    appendonly: str
    appendfsync: str
    maxmemory_policy: str
    version: tuple[int, ...]


def inspect(config: RedisConfig) -> tuple[list[Settings], list[str]]:
    """What every server of ``config`` runs with, and every problem PMQ has with it (each
    message starts with the setting or key at fault); never raises for Redis's sake."""
    try:
        found = read_all(config)
    except RedisError as exc:
        return [], [f"redis.url: cannot read Redis's settings at {config.url}: {exc}"]
    return found, [fault for settings in found for fault in problems(settings, config)]


def read_all(config: RedisConfig) -> list[Settings]:
    """The settings of the server of the URL, or of every master of a cluster."""
    if config.cluster or config.url.startswith(CLUSTER_URL):
        url = config.url.replace(CLUSTER_URL, "redis://", 1)
        cluster = redis.RedisCluster.from_url(url, socket_timeout=TIMEOUT)
        try:
            return [
                read(cluster.get_redis_connection(node), node.name)
                for node in cluster.get_primaries()
            ]
        finally:
            cluster.close()
    client = redis.Redis.from_url(config.url, socket_timeout=TIMEOUT)
    kwargs = client.connection_pool.connection_kwargs
    try:
        return [read(client, kwargs.get("path") or f"{kwargs['host']}:{kwargs['port']}")]
    finally:
        client.close()


def read(client: redis.Redis, name: str) -> Settings:
    """One server's settings: CONFIG GET, else INFO (appendfsync is not in INFO)."""
    keys = ("appendonly", "appendfsync", "maxmemory-policy")
    try:
        values = {key: str(client.config_get(key).get(key, "?")) for key in keys}
    except ResponseError:  # CONFIG renamed or refused
        values = dict.fromkeys(keys, "?")
    if "?" in (values["appendonly"], values["maxmemory-policy"]):
        persistence = client.info("persistence")
        memory = client.info("memory")
        values["appendonly"] = "yes" if persistence.get("aof_enabled") else "no"
        values["maxmemory-policy"] = str(memory.get("maxmemory_policy", "?"))
    version = str(client.info("server").get("redis_version", "0"))
    return Settings(
        server=name,
        appendonly=values["appendonly"],
        appendfsync=values["appendfsync"],
        maxmemory_policy=values["maxmemory-policy"],
        version=tuple(int(part) for part in version.split(".") if part.isdigit()),
    )


def problems(settings: Settings, config: RedisConfig) -> list[str]:
    """Every setting of one server PMQ cannot run on; logs a warning for AOF off."""
    where = f"Redis at {settings.server}"
    found: list[str] = []
    if settings.maxmemory_policy == "?":  # neither CONFIG nor INFO told it
        log.warning("%s does not say its maxmemory-policy; PMQ needs noeviction", where)
    elif settings.maxmemory_policy != "noeviction":
        found.append(
            f"maxmemory-policy: {where} has maxmemory-policy {settings.maxmemory_policy}, "
            "which evicts keys (inboxes, queues) silently; PMQ needs noeviction"
        )
    if config.durability == "aof" and settings.version < WAITAOF_SINCE:
        version = ".".join(map(str, settings.version))
        found.append(
            f"redis.durability: 'aof' needs WAITAOF, which {where} (version {version}) "
            "lacks; it needs Redis 7.2 or later (or use durability = 'none')"
        )
    if settings.appendonly != "no":
        return found
    if config.require_aof or config.durability == "aof":
        why = "redis.require_aof = true" if config.require_aof else "redis.durability = 'aof'"
        found.append(
            f"appendonly: {where} runs with appendonly no, but {why} needs the AOF on "
            "(appendonly yes, appendfsync everysec or always)"
        )
    else:
        log.warning(
            "%s runs with appendonly no: a Redis restart loses every message it holds that "
            "is not yet in storage (set appendonly yes; redis.require_aof = true makes this "
            "an error)",
            where,
        )
    return found
