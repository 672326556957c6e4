"""Redis commands of one event-loop iteration, sent together: one write, one round trip.

Under load a socket worker serves dozens of publish requests at once, each one script call
and maybe one relay. Sent one by one, each pays redis-py's whole call (a pooled connection,
a timeout, a write, a read); most of a publish's cost here was that (docs/benchmarks.md, b).
A :class:`Batcher` sends them over a pmq.redis.pipe connection, which writes the commands of
an iteration at once and parses the replies in C; each caller still gets its own reply or
error, and a script Redis lost is loaded again. A caller with several commands that belong
together (a connect's registration) queues them on :meth:`Batcher.pipeline` and gets their
replies in one list.

On a Redis Cluster (or TLS) it sends each command alone through redis-py: a cluster
pipeline cannot carry a script.

With ``redis.durability = "aof"`` (a :class:`pmq.redis.durability.Confirm`), scripts are the
writes: after each write of a batch that holds scripts, one WAITAOF follows on the same
connection, and every script caller of that batch gets its reply only once it confirmed the
fsync (else NotDurable), within :attr:`pmq.redis.durability.Confirm.deadline`. Redis holds every
later command of a connection while a WAITAOF blocks, so plain commands (relays, live pushes
to other workers) then go on a second connection and wait for nothing; with ``"none"`` one
connection carries everything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from pmq.redis import durability
from pmq.redis import pipe as redispipe
from pmq.redis.resp import Endpoint


class Batcher:
    def __init__(self, redis: aioredis.Redis, confirm: durability.Confirm | None = None) -> None:
        self.redis = redis
        self.confirm = confirm
        # None: each command alone, through redis-py. ``pipe`` carries the scripts (and
        # their WAITAOFs), ``plain`` the other commands: the same Pipe without a confirm.
        self.pipe: redispipe.Pipe | None = None
        self.plain: redispipe.Pipe | None = None
        if redispipe.supports(redis):  # not a cluster, not TLS
            endpoint = Endpoint.of(redis)
            self.pipe = redispipe.Pipe(endpoint)
            self.plain = self.pipe if confirm is None else redispipe.Pipe(endpoint)

    async def call(self, *args: Any) -> Any:
        """Send one command (``"SPUBLISH", channel, message``) with the others of this
        iteration; returns its reply or raises its error. Never waits for a WAITAOF."""
        if self.plain is None:
            return await self.redis.execute_command(*args)
        return await self.plain.call(*args)

    def pipeline(self) -> redispipe.Pipeline | Pipeline:
        """A pipeline (redis-py's method names, its reply shapes) whose execute() sends its
        commands together in one round trip, never waiting for a WAITAOF: on the lean
        connection, else (a cluster, TLS) redis-py's own, without a transaction."""
        if self.plain is None:
            return self.redis.pipeline(transaction=False)
        return self.plain.pipeline()

    async def script(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        """Call a registered script (loaded again if Redis lost it); with a confirm, its
        reply only once WAITAOF confirmed it, else NotDurable."""
        if self.plain is None:  # the script object loads itself on the node owning the keys
            return await durability.run_script(self.redis, script, keys, args, self.confirm)
        try:
            return await self._evalsha(script, keys, args)
        except NoScriptError:  # Redis restarted or was flushed: load it, send again
            await self.plain.call("SCRIPT", "LOAD", script.script)  # Redis-wide
            return await self._evalsha(script, keys, args)

    def _evalsha(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Awaitable[Any]:
        # Not a coroutine itself: without a confirm, the hot path awaits pipe.call directly.
        assert self.pipe is not None
        if self.confirm is None:
            return self.pipe.call("EVALSHA", script.sha, len(keys), *keys, *args)
        return self._confirmed(self.pipe, self.confirm, script, keys, args)

    @staticmethod
    async def _confirmed(
        pipe: redispipe.Pipe,
        confirm: durability.Confirm,
        script: AsyncScript,
        keys: list[Any],
        args: list[Any],
    ) -> Any:
        try:
            async with asyncio.timeout(confirm.deadline):
                reply, confirmed = await pipe.call_confirmed(
                    confirm.command, "EVALSHA", script.sha, len(keys), *keys, *args
                )
        except TimeoutError:  # Redis answers slower than WAITAOF's own timeout allows
            raise durability.NotDurable(f"no WAITAOF reply in {confirm.deadline:.1f}s") from None
        confirm.check(confirmed)
        return reply

    def close(self) -> None:
        for pipe in {self.pipe, self.plain}:
            if pipe is not None:
                pipe.close()
