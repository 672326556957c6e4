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

"Has not had": the connection table remembers the pushes it made lately (ConnectionTable.
recent), and a connection the ids it replayed; a message the catch-up sends is kept among
those replayed for a while, so a live copy that still comes is dropped. One connection never
gets an id twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from pmq.broadcast import Broadcasts
from pmq.errors import StorageError
from pmq.ids import first_id_at
from pmq.inbox import ColdReader, Inbox
from pmq.messaging import push_of
from pmq.reactor.connections import Client, ConnectionTable, PushIndex
from pmq.reactor.fanout import Fanout
from pmq.reactor.replay import PAGE, bounded

log = logging.getLogger(__name__)

MARGIN_SECONDS = 2.0  # ids made this much before the channel was last heard are looked at too
CONCURRENCY = 64  # connections caught up at once (each one inbox read)
BROADCASTS_MAX = 1000  # broadcasts fanned out again after one gap at most

Handler = Callable[[dict[str, Any]], None]


class Gap:
    """One subscription's gaps. Subscribe with :meth:`listen` as the handler; call
    :meth:`opened` when the subscription failed and :meth:`closed` once it is subscribed
    again, which starts ``catch_up(first id to look at)``."""

    def __init__(self, handler: Handler, catch_up: Callable[[int], Awaitable[None]]) -> None:
        self.handler = handler
        self.catch_up = catch_up
        self.heard = time.time()  # the last message, or the subscribe
        self.floor: int | None = None  # while a gap is open: the first id to look at
        self.tasks: set[asyncio.Task[None]] = set()

    def listen(self, message: dict[str, Any]) -> None:
        self.heard = time.time()
        self.handler(message)

    def opened(self) -> None:
        """The subscription failed: what came after it was last heard may be lost."""
        if self.floor is None:
            self.floor = first_id_at(int((self.heard - MARGIN_SECONDS) * 1000))

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
        task = asyncio.get_running_loop().create_task(self._run(floor), name="catch-up")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, floor: int) -> None:
        try:
            await self.catch_up(floor)
        except (RedisError, OSError) as exc:  # Redis gone again: the next gap catches up
            log.warning("catch-up after a relay gap stopped: %r", exc)
        except Exception:  # the outer boundary of this task: log with context, carry on
            log.exception("catch-up after a relay gap failed")

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class CatchUp:
    """The catch-ups of this worker's two channels."""

    def __init__(
        self,
        table: ConnectionTable,
        inbox: Inbox,
        cold: ColdReader,
        broadcasts: Broadcasts,
        fanout: Fanout,
    ) -> None:
        self.table = table
        self.inbox = inbox
        self.cold = bounded(cold)
        self.broadcasts_ = broadcasts
        self.fanout = fanout

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
        if client.held is not None:  # replaying on connect now: that covers the gap
            return 0
        messages = await self._unacked(client.uid, floor - 1)
        # No await from here on: what was pushed meanwhile is in the table's memory.
        had = pushed.of(client.uid) | (client.replayed or set())
        missed = [m for m in messages if int(m["id"]) not in had]
        for message in missed:
            client.push_missed(*push_of(message))
        return len(missed)

    async def _unacked(self, uid: str, after: int) -> list[dict[str, Any]]:
        """The user's unacked messages above ``after``, Redis's alone if storage fails."""
        cold: ColdReader | None = self.cold
        found: list[dict[str, Any]] = []
        while True:
            try:
                batch = await self.inbox.pending(uid, cold, after, PAGE)
            except (StorageError, TimeoutError):
                cold = None  # the storage outage's own late replay brings those
                continue
            found += batch
            if len(batch) < PAGE:
                return found
            after = int(batch[-1]["id"])

    async def broadcasts(self, floor: int) -> None:
        """The broadcasts to local groups with ids from ``floor`` on go through the fan-out
        again; it skips those it fanned out lately, connections those they replayed."""
        groups = {g for client in self.table for g in client.identity.groups}
        missed = await self.broadcasts_.above(sorted(groups), floor - 1, BROADCASTS_MAX)
        for message in missed:
            self.fanout.queue.put_nowait((message["group"], push_of(message)[0]))
        log.warning("caught up after a broadcast relay gap: %d broadcasts", len(missed))
