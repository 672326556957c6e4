"""Redis commands of one event-loop iteration, sent together: one write, one round trip.

Under load a socket worker serves dozens of publish requests at once, each one script call
and maybe one relay. Sent one by one, each pays redis-py's whole call (a pooled connection,
a timeout, a write, a read); most of a publish's cost here was that (docs/benchmarks.md, b).
A :class:`Batcher` sends them over a pmq.redispipe connection, which writes the commands of
an iteration at once and parses the replies in C; each caller still gets its own reply or
error, and a script Redis lost is loaded again.

On a Redis Cluster (or TLS) it sends each command alone through redis-py: a cluster
pipeline cannot carry a script.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from pmq import redispipe


class Batcher:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.pipe: redispipe.Pipe | None = None  # None: each command alone, through redis-py
        if redispipe.supports(redis):  # not a cluster, not TLS
            self.pipe = redispipe.Pipe(redispipe.Endpoint.of(redis))

    async def call(self, *args: Any) -> Any:
        """Send one command (``"SPUBLISH", channel, message``) with the others of this
        iteration; returns its reply or raises its error."""
        if self.pipe is None:
            return await self.redis.execute_command(*args)
        return await self.pipe.call(*args)

    async def script(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        """Call a registered script (loaded again if Redis lost it)."""
        if self.pipe is None:  # the script object loads itself on the node owning the keys
            return await script(keys=keys, args=args)
        try:
            return await self.pipe.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:  # Redis restarted or was flushed: load it, send again
            await self.pipe.call("SCRIPT", "LOAD", script.script)
            return await self.pipe.call("EVALSHA", script.sha, len(keys), *keys, *args)

    def close(self) -> None:
        if self.pipe is not None:
            self.pipe.close()
