"""What a write waits for before PMQ answers it: ``redis.durability``.

With ``"none"`` a write is answered once Redis applied it. With ``"aof"`` it is answered only
after ``WAITAOF 1 <wait_replicas> <timeout>`` confirmed that Redis fsynced it to its
append-only file (and that many replicas did too). WAITAOF covers every write sent before
it on the same connection, so one confirmation serves a whole pipelined batch: pmq.redis.batching
sends one after each batch that holds writes, and :func:`run_script` sends one after a
script called through redis-py (Redis Cluster, TLS, broadcasts).

A confirmation that errs, times out or counts fewer fsyncs than required raises
:class:`NotDurable`, a RedisError, so callers answer it as they answer an unreachable Redis
(the ingest API: 503, never 202).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError, ResponseError

from pmq.config import RedisConfig

CONFIRM_MS = 5000  # how long WAITAOF may block; well below pmq.redis.resp's 10 s reply watchdog
MARGIN_SECONDS = 1.0  # beyond the timeout: the fsync's own time, the round trip


class NotDurable(RedisError):
    """Redis did not confirm that a write reached its AOF (and the replicas asked for)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Confirm:
    """One WAITAOF: the local fsync and ``replicas`` replicas' within ``timeout_ms``."""

    replicas: int = 0
    timeout_ms: int = CONFIRM_MS

    @property
    def command(self) -> tuple[Any, ...]:
        return ("WAITAOF", 1, self.replicas, self.timeout_ms)

    @property
    def deadline(self) -> float:
        """Seconds a writer waits for its confirmation at most (one may be in flight before
        its own), then it gets NotDurable."""
        return self.timeout_ms / 1000 + MARGIN_SECONDS

    def check(self, reply: Any) -> None:
        """Raise NotDurable unless ``reply`` (WAITAOF's ``[local, replicas]``, or the error
        it raised) confirms what was asked."""
        if isinstance(reply, Exception):
            raise NotDurable(f"WAITAOF failed: {reply}") from reply
        try:
            local, replicas = (int(n) for n in reply)
        except (TypeError, ValueError):
            raise NotDurable(f"WAITAOF answered {reply!r}") from None
        if local < 1 or replicas < self.replicas:
            raise NotDurable(
                f"WAITAOF confirmed {local} local and {replicas} replica fsyncs "
                f"of 1 and {self.replicas} in {self.timeout_ms} ms"
            )


def confirm_of(config: RedisConfig) -> Confirm | None:
    """The confirmation ``config`` asks for after each write, None for ``"none"``."""
    if config.durability != "aof":
        return None
    return Confirm(config.wait_replicas)


async def run_script(
    redis: aioredis.Redis,
    script: AsyncScript,
    keys: list[Any],
    args: list[Any],
    confirm: Confirm | None,
) -> Any:
    """Call ``script`` through redis-py; with ``confirm``, return only once WAITAOF, sent
    after it on the same connection (on a cluster: to the master owning ``keys[0]``),
    confirmed it. Raises the script's error, or NotDurable."""
    if confirm is None:
        return await script(keys=keys, args=args)
    command = ("EVALSHA", script.sha, len(keys), *keys, *args)
    if isinstance(redis, RedisCluster):
        node = redis.get_node_from_key(keys[0])
        reply, confirmed = await _on_node(node, command, confirm)
        if isinstance(reply, NoScriptError):  # the node lost it (restarted): load, again
            await node.execute_command("SCRIPT", "LOAD", script.script)
            reply, confirmed = await _on_node(node, command, confirm)
    else:
        reply, confirmed = await _pipelined(redis, command, confirm)
        if isinstance(reply, NoScriptError):
            await redis.script_load(script.script)
            reply, confirmed = await _pipelined(redis, command, confirm)
    if isinstance(reply, Exception):
        raise reply
    confirm.check(confirmed)
    return reply


async def _pipelined(
    redis: aioredis.Redis, command: tuple[Any, ...], confirm: Confirm
) -> tuple[Any, Any]:
    """``command`` and WAITAOF in one pipeline (one pooled connection): both replies,
    errors as values."""
    pipe = redis.pipeline(transaction=False)
    pipe.execute_command(*command)
    pipe.execute_command(*confirm.command)
    reply, confirmed = await pipe.execute(raise_on_error=False)
    return reply, confirmed


async def _on_node(
    node: ClusterNode, command: tuple[Any, ...], confirm: Confirm
) -> tuple[Any, Any]:
    """``command`` and WAITAOF on one connection to a cluster node: both replies, errors
    as values. A MOVED or ASK reply (the slot is migrating) comes back like any error: the
    caller answers 503 and the site retries, by then through the cluster's refreshed map."""
    conn = node.acquire_connection()
    try:
        await conn.send_packed_command(conn.pack_commands([command, confirm.command]))
        replies: list[Any] = []
        for _ in range(2):  # read both, so the connection goes back clean
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
    except BaseException:
        await conn.disconnect()  # a reply may still be on its way: never reuse it
        raise
    finally:
        node.release(conn)
    return replies[0], replies[1]
