"""Catching up after a relay gap: what this worker's pub/sub missed while it was down.

A message published while a socket worker's relay subscription is down (Redis restarted or
cut, its connection found dead) is SPUBLISHed to nobody. It stays in the user's inbox, but a
client that stayed connected would only get it at its next connect. So each subscription is
wrapped in a :class:`Gap`: it notes when the channel was last heard from, and once the
channel is subscribed again it runs a catch-up from that moment, less MARGIN_SECONDS (ids
are made on other workers' clocks, and a relay may be in flight):

- the worker channel: every local connection gets the unacked messages made since then
  that it has not had (:meth:`CatchUp.unicast`);
- the broadcast channel: the broadcasts published since then go through the fan-out again,
  which skips those it fanned out already (:meth:`CatchUp.broadcasts`).

The same unicast catch-up runs when the worker finds that Redis lost its route entries
(publishes meanwhile saw the user offline).

When Redis lost its data, the messages accepted just before whose live push or relay went
with it are no longer in Redis: the socket workers' journals queue them again for storage
(pmq.domain.journal), and :class:`LossCatchUp` takes them from storage once the writer has had
time to write them.

"Has not had": the connection table remembers the pushes it made lately (ConnectionTable.
recent), and a connection the ids it replayed; a message the catch-up sends is kept among
those replayed for a while, so a live copy that still comes is dropped. A connection is only
caught up on messages made after it opened (what came before, its connect replayed). One
connection never gets an id twice.

A relay-gap catch-up reads Redis only: what a gap hid was accepted lately and is hot. One
runs at a time per channel; gaps that close meanwhile are caught up on together after it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.exceptions import RedisError

from pmq.domain.broadcast import Broadcasts
from pmq.domain.ids import first_id_at
from pmq.domain.inbox import Inbox
from pmq.errors import StorageError
from pmq.reactor.connections import Client, ConnectionTable, PushIndex
from pmq.reactor.fanout import Fanout
from pmq.reactor.replay import PAGE
from pmq.wire.client import push_of

log = logging.getLogger(__name__)

MARGIN_SECONDS = 2.0  # ids made this much before the channel was last heard are looked at too
# A subscription whose peer went silent is found dead within this (pmq.redis.pipe's TCP
# keepalive: 30 s idle, then 3 probes 10 s apart), so a quiet channel lost nothing before.
SILENCE_SECONDS = 60.0
HELD_WAIT_SECONDS = 30.0  # how long a catch-up waits for a connect's replay to end
RETRY_FIRST = 0.5  # seconds before a failed catch-up is tried again, doubling up to RETRY_MAX
RETRY_MAX = 5.0
CONCURRENCY = 64  # connections caught up at once (each one inbox read)
BROADCASTS_MAX = 1000  # broadcasts fanned out again after one gap at most
# The pauses before each pass of the catch-up from storage after Redis lost data: the
# journals queue what went with it within a second, and a writer under load has written it
# a second or three later (the chaos suite); the second pass takes what a slower one left.
STORED_PASSES = (2.0, 6.0)

Handler = Callable[[dict[str, Any]], None]
# (uids, after id) -> each user's unacked messages in storage above that id, in id order
StoredReader = Callable[[Sequence[str], int], Awaitable[dict[str, list[dict[str, Any]]]]]


class Gap:
    """One subscription's gaps. Subscribe with :meth:`listen` as the handler; call
    :meth:`opened` when the subscription failed and :meth:`closed` once it is subscribed
    again, which starts ``catch_up(first id to look at)``."""

    def __init__(self, handler: Handler, catch_up: Callable[[int], Awaitable[None]]) -> None:
        self.handler = handler
        self.catch_up = catch_up
        self.heard = time.time()  # the last message, or the subscribe
        self.floor: int | None = None  # while a gap is open: the first id to look at
        self.task: asyncio.Task[None] | None = None  # the catch-up running
        self.next: int | None = None  # the floor of the catch-up due after it

    def listen(self, message: dict[str, Any]) -> None:
        self.heard = time.time()
        self.handler(message)

    def opened(self) -> None:
        """The subscription failed: what came after it was last heard may be lost."""
        if self.floor is None:
            since = max(self.heard, time.time() - SILENCE_SECONDS)
            self.floor = first_id_at(int((since - MARGIN_SECONDS) * 1000))

    def closed(self) -> None:
        """Subscribed again: catch up on what the gap hid."""
        self.heard = time.time()
        if self.floor is not None:
            floor, self.floor = self.floor, None
            self.start(floor)

    def missed_since(self, wall_time: float) -> None:
        """What came since ``wall_time`` may have missed us for another reason."""
        self.start(first_id_at(int((wall_time - MARGIN_SECONDS) * 1000)))

    def start(self, floor: int) -> None:
        """Catch up from ``floor``, now or, while one runs, right after it."""
        if self.task is not None and not self.task.done():
            self.next = floor if self.next is None else min(self.next, floor)
            return
        self.task = asyncio.get_running_loop().create_task(self._run(floor), name="catch-up")

    async def _run(self, floor: int | None) -> None:
        delay = RETRY_FIRST
        while floor is not None:
            try:
                await self.catch_up(floor)
            except (RedisError, OSError) as exc:
                # Redis still loading its AOF, or gone again: the same catch-up later (with
                # a gap closed meanwhile folded in), or the messages stay unseen until the
                # user's next connect.
                log.warning("catch-up after a relay gap failed, again in %.1fs: %r", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                if self.next is not None:
                    floor, self.next = min(floor, self.next), None
                continue
            except Exception:  # the outer boundary of this task: log with context, carry on
                log.exception("catch-up after a relay gap failed")
            floor, self.next = self.next, None
            delay = RETRY_FIRST

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


async def _replayed(client: Client) -> bool:
    """Wait for the connect's replay of ``client`` to end (it goes first); False when it
    did not within HELD_WAIT_SECONDS."""
    deadline = time.monotonic() + HELD_WAIT_SECONDS
    while client.held is not None:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _push_missed(client: Client, messages: list[dict[str, Any]], pushed: PushIndex) -> int:
    """Push the ``messages`` ``client`` has not had (pushed live, replayed or caught up on);
    no await, so what was pushed meanwhile is all in the table's memory."""
    had = pushed.of(client.uid) | (client.replayed or set())
    missed = [m for m in messages if int(m["id"]) not in had]
    for message in missed:
        client.push_missed(*push_of(message))
    return len(missed)


class CatchUp:
    """The catch-ups of this worker's two channels."""

    def __init__(
        self,
        table: ConnectionTable,
        inbox: Inbox,
        broadcasts: Broadcasts,
        fanout: Fanout,
        stored: StoredReader,
    ) -> None:
        self.table = table
        self.inbox = inbox
        self.published = broadcasts  # the broadcasts kept in Redis
        self.fanout = fanout
        self.stored = stored

    async def unicast(self, floor: int) -> None:
        """Every local connection gets the unacked messages with ids from ``floor`` on
        that it has not had, in id order (after newer live pushes, if any came)."""
        clients = list(self.table)
        pushed = self.table.recent.since(floor)
        sent = 0
        for start in range(0, len(clients), CONCURRENCY):
            chunk = clients[start : start + CONCURRENCY]
            sent += sum(await asyncio.gather(*(self._client(c, floor, pushed) for c in chunk)))
        log.warning(
            "caught up after a relay gap: %d messages to %d connections", sent, len(clients)
        )

    async def _client(self, client: Client, floor: int, pushed: PushIndex) -> int:
        if not await _replayed(client):
            return 0
        messages = await self._unacked(client.uid, max(floor, client.opened) - 1)
        return _push_missed(client, messages, pushed)

    async def from_storage(self, floor: int) -> None:
        """Every local connection gets the unacked messages in storage with ids from
        ``floor`` on that it has not had, in id order: one read of storage for all of them.
        A connection opened since ``floor`` is not spared: its replay may have come before
        the journals' operations were written (what it replayed, it has had)."""
        clients = list(self.table)
        pushed = self.table.recent.since(floor)
        stored = await self.stored(sorted({c.uid for c in clients}), floor - 1)
        waiting = [c for c in clients if c.uid in stored]
        sent = sum(
            await asyncio.gather(*(self._stored(c, stored[c.uid], pushed) for c in waiting))
        )
        log.warning(
            "caught up from storage after Redis lost data: %d messages to %d connections",
            sent, len(clients),
        )

    async def _stored(
        self, client: Client, messages: list[dict[str, Any]], pushed: PushIndex
    ) -> int:
        if not await _replayed(client):
            return 0
        return _push_missed(client, await self.inbox.amended(client.uid, messages), pushed)

    async def _unacked(self, uid: str, after: int) -> list[dict[str, Any]]:
        """The user's unacked messages in Redis above ``after``."""
        found: list[dict[str, Any]] = []
        while True:
            batch = await self.inbox.pending(uid, None, after, PAGE)
            found += batch
            if len(batch) < PAGE:
                return found
            after = int(batch[-1]["id"])

    async def broadcasts(self, floor: int) -> None:
        """The broadcasts to local groups with ids from ``floor`` on go through the fan-out
        again; it skips those it fanned out lately, connections those they replayed."""
        groups = {g for client in self.table for g in client.identity.groups}
        missed = await self.published.above(sorted(groups), floor - 1, BROADCASTS_MAX)
        for message in missed:
            self.fanout.queue.put_nowait((message["group"], push_of(message)[0]))
        log.warning("caught up after a broadcast relay gap: %d broadcasts", len(missed))


class LossCatchUp:
    """After Redis lost its data: the messages accepted just before, whose live push or relay
    went with it, are in no inbox in Redis, and the journals queued them again for storage.
    Each local connection gets from storage those it has not had, made since Redis was last
    seen whole (less MARGIN_SECONDS), in passes STORED_PASSES apart."""

    def __init__(self, catch_up: CatchUp) -> None:
        self.catch_up = catch_up
        self.task: asyncio.Task[None] | None = None
        self.floor = 0

    def start(self, whole_at: float) -> None:
        """Redis was last seen whole at ``whole_at`` (unix seconds) and has lost data."""
        floor = first_id_at(int((whole_at - MARGIN_SECONDS) * 1000))
        if self.task is not None and not self.task.done():  # lost again: from the first
            self.task.cancel()
            floor = min(floor, self.floor)
        self.floor = floor
        self.task = asyncio.get_running_loop().create_task(self._run(floor), name="loss-catch-up")

    async def _run(self, floor: int) -> None:
        for pause in STORED_PASSES:
            await asyncio.sleep(pause)
            try:
                await self.catch_up.from_storage(floor)
            except (StorageError, OSError) as exc:  # the next pass, or the user's next connect
                log.warning("catch-up from storage after Redis lost data failed: %r", exc)
            except Exception:  # the outer boundary of this task: log with context, carry on
                log.exception("catch-up from storage after Redis lost data failed")

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
