"""Redis commands of one event-loop iteration, sent together: one pipeline, one round trip.

Under load a socket worker serves dozens of publish requests at once, each one script call
and maybe one relay. Sent one by one, each pays redis-py's whole call (a pooled connection,
a timeout, a write, a read); most of a publish's cost here was that (docs/benchmarks.md, b).
A :class:`Batcher` queues the commands issued in the same iteration and sends them as one
pipeline when the loop next gets to it; each caller still gets its own reply or error.

On a Redis Cluster it sends each command alone: a cluster pipeline cannot carry a script.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from pmq.redisconn import is_cluster

MAX_BATCH = 256  # commands per pipeline


class Batcher:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.direct = is_cluster(redis)
        self.queued: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self.scripts: dict[str, Any] = {}  # sha -> source, to load after a NOSCRIPT

    async def call(self, *args: Any) -> Any:
        """Send one command (``"SPUBLISH", channel, message``) with the others of this
        iteration; returns its reply or raises its error."""
        if self.direct:
            return await self.redis.execute_command(*args)
        future = asyncio.get_running_loop().create_future()
        self.queued.append((args, future))
        if len(self.queued) == 1:
            asyncio.get_running_loop().call_soon(self._flush)
        return await future

    async def script(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        """Call a registered script (loaded again if Redis lost it)."""
        if self.direct:  # the script object loads itself on the node owning the keys
            return await script(keys=keys, args=args)
        self.scripts[script.sha] = script.script
        return await self.call("EVALSHA", script.sha, len(keys), *keys, *args)

    def _flush(self) -> None:
        queued, self.queued = self.queued, []
        for start in range(0, len(queued), MAX_BATCH):
            asyncio.get_running_loop().create_task(self._send(queued[start : start + MAX_BATCH]))

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            replies = await self._pipeline([args for args, _ in batch])
            missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            if missing:  # Redis restarted or was flushed: load the scripts, send those again
                for sha in {batch[i][0][1] for i in missing}:
                    await self.redis.script_load(self.scripts[sha])
                again = await self._pipeline([batch[i][0] for i in missing])
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
        except BaseException as exc:  # the round trip failed: every caller gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():  # the caller went away (its request was cancelled)
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for args in commands:
            pipe.execute_command(*args)
        return list(await pipe.execute(raise_on_error=False))
