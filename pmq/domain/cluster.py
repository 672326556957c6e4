"""The cluster view: every live node, its socket workers and their connections.

Each socket worker keeps its own field of ``keys.cluster_workers()`` (worker id -> JSON
``{"node", "host", "index", "pid", "master", "connections", "started", "updated"}``, times in
unix ms) fresh with its registry beat, and deletes it at graceful stop (:class:`Board`).
A field older than 3 x ``heartbeat.interval`` belongs to a worker that died without cleaning
up: readers skip it and the survivors' sweeps delete it. One field per worker, never one per
node, so the workers of a node never overwrite each other.

:func:`snapshot` reads the view with the blocking client and needs no master on the machine
that asks (``pmqctl status --cluster``).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping
from typing import Any, cast

import orjson
import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from pmq.config import Config, RedisConfig
from pmq.redis import scripts
from pmq.redis.keys import Keys

STALE_BEATS = 3  # an entry this many heartbeat intervals old is a dead worker's
CONNECT_SECONDS = 2.0
READ_SECONDS = 5.0


def max_age_ms(heartbeat_interval: float) -> int:
    return int(STALE_BEATS * heartbeat_interval * 1000)


def now_ms() -> int:
    return int(time.time() * 1000)


class Board:
    """One socket worker's entry in the view. Create after fork, one per worker.

    Call :meth:`report` with every registry beat and :meth:`sweep` with the registry sweep;
    :meth:`withdraw` at stop removes the entry (the worker stops reporting first)."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        worker_id: str,
        interval: float,
        *,
        node: str,
        index: int,
        pid: int,
        master: int,
    ) -> None:
        """``interval`` is heartbeat.interval; the rest describes the worker to operators."""
        self.redis = client
        self.key = keys.cluster_workers()
        self.worker_id = worker_id
        self.max_age_ms = max_age_ms(interval)
        self.entry: dict[str, Any] = {
            "node": node,
            "host": socket.gethostname(),
            "index": index,
            "pid": pid,
            "master": master,
            "started": now_ms(),
        }
        self._sweep = scripts.register(client, "cluster_sweep")

    async def report(self, connections: int) -> None:
        """Write our entry; the whole hash expires too once every worker is gone."""
        updated = now_ms()
        entry = orjson.dumps({**self.entry, "connections": connections, "updated": updated})
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.key, self.worker_id, entry)
        pipe.pexpire(self.key, self.max_age_ms)
        await pipe.execute()

    async def sweep(self) -> int:
        """Delete the entries of workers that stopped reporting; returns how many went."""
        return int(await self._sweep(keys=[self.key], args=[now_ms(), self.max_age_ms]))

    async def withdraw(self) -> None:
        await leave_view(self.redis, self.key, self.worker_id)


async def leave_view(client: aioredis.Redis, key: str, worker_id: str) -> None:
    """Take ``worker_id``'s entry out of the cluster view ``key`` (keys.cluster_workers()):
    at its own stop, or after it was killed (pmq.workers.withdraw)."""
    await client.hdel(key, worker_id)


# Reading the view ---------------------------------------------------------------------


def live_nodes(
    entries: Mapping[bytes, bytes], at_ms: int, max_age: int
) -> list[dict[str, Any]]:
    """Group fresh worker entries by node: ``[{"node", "host", "master", "connections",
    "updated", "workers": [{"id", "index", "pid", "connections", "started", "updated"}]}]``,
    nodes by name and workers by index. Entries older than ``max_age`` ms are left out."""
    nodes: dict[str, dict[str, Any]] = {}
    for raw_id, raw in entries.items():
        try:
            entry = orjson.loads(raw)
            node, updated = str(entry["node"]), int(entry["updated"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        if at_ms - updated > max_age:
            continue
        summary = nodes.setdefault(
            node,
            {
                "node": node,
                "host": entry.get("host"),
                "master": entry.get("master"),
                "connections": 0,
                "updated": 0,
                "workers": [],
            },
        )
        connections = int(entry.get("connections", 0))
        summary["connections"] += connections
        summary["updated"] = max(summary["updated"], updated)
        summary["workers"].append(
            {
                "id": raw_id.decode(),
                "index": entry.get("index"),
                "pid": entry.get("pid"),
                "connections": connections,
                "started": entry.get("started"),
                "updated": updated,
            }
        )
    for summary in nodes.values():
        summary["workers"].sort(key=lambda w: (w["index"] or 0, w["id"]))
    return [nodes[name] for name in sorted(nodes)]


def connect_sync(config: RedisConfig) -> redis.Redis | RedisCluster:
    """A blocking client for pmqctl, with short timeouts. It never sends a command again
    after its connection dropped (``pmqctl dlq retry`` writes: a resend could apply twice)."""
    timeouts: dict[str, Any] = {
        "socket_connect_timeout": CONNECT_SECONDS,
        "socket_timeout": READ_SECONDS,
        "retry": Retry(NoBackoff(), 0),
    }
    if config.cluster or config.url.startswith("redis+cluster://"):
        url = config.url.replace("redis+cluster://", "redis://", 1)
        return RedisCluster.from_url(url, **timeouts)
    return redis.Redis.from_url(config.url, **timeouts)


def snapshot(config: Config) -> dict[str, Any]:
    """The cluster as Redis sees it now: ``{"prefix", "at", "nodes": live_nodes(...),
    "workers": n, "connections": n}``. Raises RedisError/OSError when Redis does not answer."""
    client = connect_sync(config.redis)
    try:
        entries = cast(
            dict[bytes, bytes], client.hgetall(Keys(config.redis.prefix).cluster_workers())
        )
    finally:
        client.close()
    at = now_ms()
    nodes = live_nodes(entries, at, max_age_ms(config.heartbeat.interval))
    return {
        "prefix": config.redis.prefix,
        "at": at,
        "nodes": nodes,
        "workers": sum(len(n["workers"]) for n in nodes),
        "connections": sum(n["connections"] for n in nodes),
    }


def format_snapshot(view: Mapping[str, Any]) -> str:
    """The text ``pmqctl status --cluster`` prints."""
    nodes = view["nodes"]
    lines = [
        f"cluster (prefix {view['prefix']}): {len(nodes)} live nodes, "
        f"{view['workers']} socket workers, {view['connections']} connections"
    ]
    for node in nodes:
        lines.append(
            f"node {node['node']} on {node['host']}: master pid {node['master']}, "
            f"{len(node['workers'])} socket workers, {node['connections']} connections"
        )
        lines.append(f"  {'#':>3}{'PID':>9}{'CONNS':>8}{'SEEN':>10}")
        for w in node["workers"]:
            seen = f"{max(0, view['at'] - w['updated']) / 1000:.1f}s ago"
            lines.append(f"  {w['index']!s:>3}{w['pid']!s:>9}{w['connections']:>8}{seen:>10}")
    return "\n".join(lines)

