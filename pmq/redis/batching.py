"""Redis commands of one event-loop iteration, sent together: one write, one round trip.

Under load a socket worker serves dozens of publish requests at once, each one script call
and maybe one relay. Sent one by one, each pays redis-py's whole call (a pooled connection,
a timeout, a write, a read); most of a publish's cost here was that (docs/benchmarks.md, b).
A :class:`Batcher` sends them over a pmq.redis.pipe connection, which writes the commands of
an iteration at once and parses the replies in C; each caller still gets its own reply or
error, and a script Redis lost is loaded again. A caller with several commands that belong
together (a connect's registration) queues them on :meth:`Batcher.pipeline` and gets their
replies in one list.

Calls of one script that differ only in their items (:meth:`Batcher.script_merged`: a
publish without an idempotency key, whatever its recipients) are merged: those of one
iteration go as one call, whose reply is cut back into each caller's part. Redis spends
about a sixth less per message on twelve messages in one call than on twelve calls
(docs/benchmarks.md, "Tenth sitting").

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
import functools
from collections.abc import Awaitable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from pmq.redis import durability
from pmq.redis import pipe as redispipe
from pmq.redis.resp import Endpoint, Unsent, pack

MERGE_MAX = 64  # items in one merged call at most: Redis runs a script to its end


class _Merge:
    """Calls of ``script`` with the same head (its first keys and arguments), gathered in
    one loop iteration and sent as one call when the iteration's commands are written."""

    __slots__ = ("args", "items", "keys", "open", "script", "waiters", "width")

    def __init__(
        self, script: AsyncScript, head_keys: Sequence[Any], head_args: Sequence[Any], width: int
    ) -> None:
        self.script = script
        self.keys = list(head_keys)
        self.args = list(head_args)
        self.width = width
        self.items = 0
        # Per caller: its own future (one cancelled caller cancels nobody else's), the
        # position of its first item, how many items it has.
        self.waiters: list[tuple[asyncio.Future[list[Any]], int, int]] = []
        self.open = True  # callers may still join: not packed, no reply yet

    def add(self, keys: Sequence[Any], args: Sequence[Any], items: int) -> asyncio.Future[Any]:
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.waiters.append((future, self.items, items))
        self.items += items
        self.keys += keys
        self.args += args
        if self.items >= MERGE_MAX:
            self.open = False
        return future

    def pack(self) -> bytes:
        self.open = False
        return pack("EVALSHA", self.script.sha, len(self.keys), *self.keys, *self.args)

    def deliver(self, reply: list[Any]) -> None:
        """Each caller gets the reply's first element and its own items' ``width``
        elements each, as if it had called alone."""
        head, width = reply[:1], self.width
        for future, first, items in self.waiters:
            if not future.done():
                future.set_result(head + reply[1 + first * width : 1 + (first + items) * width])

    def fail(self, exc: BaseException) -> None:
        for future, _, _ in self.waiters:
            if not future.done():
                future.set_exception(exc)


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
        self._merges: dict[tuple[Any, ...], _Merge] = {}  # by script and head: still open
        self._again: set[asyncio.Task[None]] = set()  # merged calls sent once more

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

    async def script(
        self, script: AsyncScript, keys: list[Any], args: list[Any], confirmed: bool = True
    ) -> Any:
        """Call a registered script (loaded again if Redis lost it); with a confirm, its
        reply only once WAITAOF confirmed it, else NotDurable. ``confirmed=False``: never
        waits for a WAITAOF (a write the caller may lose, as an ack, which comes again)."""
        confirm = self.confirm if confirmed else None
        if self.plain is None:  # the script object loads itself on the node owning the keys
            return await durability.run_script(self.redis, script, keys, args, confirm)
        try:
            return await self._evalsha(script, keys, args, confirm)
        except NoScriptError:  # Redis restarted or was flushed: load it, send again
            await self.plain.call("SCRIPT", "LOAD", script.script)  # Redis-wide
            return await self._evalsha(script, keys, args, confirm)

    def script_merged(
        self,
        script: AsyncScript,
        head: tuple[tuple[Any, ...], tuple[Any, ...]],
        keys: Sequence[Any],
        args: Sequence[Any],
        items: int,
        width: int,
    ) -> Awaitable[list[Any]]:
        """:meth:`script` with KEYS ``head[0]`` + ``keys`` and ARGV ``head[1]`` + ``args``,
        for a script that takes a head and then ``items`` items, each with its own keys and
        arguments, and replies one element and then ``width`` per item. The calls of this
        iteration with the same script and head go as one (up to MERGE_MAX items); each
        caller gets the first element and its own items' part. Alone (a cluster, TLS, a
        confirm, no connection open yet) it is :meth:`script`."""
        conn = self.pipe.connected() if self.pipe is not None and self.confirm is None else None
        if conn is None:
            return self.script(script, [*head[0], *keys], [*head[1], *args])
        group = (script.sha, head)
        merge = self._merges.get(group)
        if merge is None or not merge.open:
            merge = self._merges[group] = _Merge(script, head[0], head[1], width)
            reply = conn.send_built(merge.pack)
            reply.add_done_callback(functools.partial(self._merged, group, merge))
        return merge.add(keys, args, items)

    def _merged(self, group: tuple[Any, ...], merge: _Merge, reply: asyncio.Future[Any]) -> None:
        merge.open = False
        if self._merges.get(group) is merge:
            del self._merges[group]
        exc = reply.exception()
        if exc is None:
            merge.deliver(reply.result())
        elif isinstance(exc, NoScriptError | Unsent):  # never ran: it may go once more
            task = asyncio.get_running_loop().create_task(self._send_again(merge))
            self._again.add(task)
            task.add_done_callback(self._again.discard)
        else:
            merge.fail(exc)

    async def _send_again(self, merge: _Merge) -> None:
        try:
            reply = await self.script(merge.script, merge.keys, merge.args)
        except Exception as exc:
            merge.fail(exc)
        else:
            merge.deliver(reply)

    def _evalsha(
        self,
        script: AsyncScript,
        keys: list[Any],
        args: list[Any],
        confirm: durability.Confirm | None,
    ) -> Awaitable[Any]:
        # Not a coroutine itself: without a confirm, the hot path awaits pipe.call directly.
        assert self.pipe is not None and self.plain is not None
        if confirm is None:  # the plain connection: never behind a WAITAOF
            return self.plain.call("EVALSHA", script.sha, len(keys), *keys, *args)
        return self._confirmed(self.pipe, confirm, script, keys, args)

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
