"""This worker's presence in the cluster, kept for its life and withdrawn at stop.

While it runs, :meth:`RegistryKeeper.run` beats (pmq.domain.routing.Routes.beat), pushes back the
TTL of its users' route entries once a heartbeat interval, reports to the cluster view
(pmq.domain.cluster.Board), renews its id generator's lease and sweeps the workers that stopped
beating. Route entries found missing (Redis lost them, or they expired while it was out of
reach) are written again at once, and the unicasts published meanwhile are caught up on.
:meth:`RegistryKeeper.withdraw` removes all of it at stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from pmq.domain.cluster import Board
from pmq.domain.ids import GeneratorLease, IdGenerator
from pmq.domain.routing import Routes
from pmq.reactor.connections import Client, ConnectionTable

log = logging.getLogger(__name__)


def beat_every(heartbeat_interval: float) -> float:
    """Seconds between two beats: a third of the interval, within [0.5, 5]."""
    return max(0.5, min(5.0, heartbeat_interval / 3))


class RegistryKeeper:
    """``missed_since(wall time)`` catches up on the unicasts published since then
    (pmq.reactor.relay.Channels.missed_since); ``restored(clients)`` is told whose route
    entries were written again (pmq.reactor.presence.Presence.restored); ``title`` names the
    worker in logs."""

    def __init__(
        self,
        routes: Routes,
        board: Board,
        lease: GeneratorLease,
        ids: IdGenerator,
        table: ConnectionTable,
        heartbeat_interval: float,
        missed_since: Callable[[float], None],
        title: str,
        restored: Callable[[list[Client]], Awaitable[None]],
    ) -> None:
        self.routes = routes
        self.board = board
        self.lease = lease
        self.ids = ids
        self.table = table
        self.interval = heartbeat_interval
        self.every = beat_every(heartbeat_interval)
        self.missed_since = missed_since
        self.restored = restored
        self.title = title
        self.last_beat = time.time()  # the last beat that found our route entries
        self.last_refresh = time.time()  # the last refresh of our users' entries' TTL

    async def run(self) -> None:
        """Beat every ``every`` seconds, refresh once an interval, sweep twice. An error ends
        the run; the supervisor starts it again (with a refresh and a sweep at once) no
        later than the next beat was due."""
        next_sweep = next_refresh = time.monotonic()
        while True:
            await self.beat()
            if time.monotonic() >= next_refresh:
                next_refresh = time.monotonic() + self.interval
                await self.refresh()
            await self.board.report(len(self.table))
            if not await self.lease.renew():
                log.warning("%s lost its id generator lease; taking a new one", self.title)
                self.ids.renumber(await self.lease.acquire())
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + self.interval / 2
                await self.routes.sweep_dead_workers()
                await self.board.sweep()
            await asyncio.sleep(self.every)

    async def beat(self) -> None:
        beat_at = time.time()
        if not await self.routes.beat() and len(self.table):
            # Redis lost our entries: without them no unicast reaches our users, and what
            # was published since the last beat that found them saw them offline.
            clients = list(self.table)
            held = [(c.uid, c.conn_id, c.identity.groups) for c in clients]
            await self.routes.restore(held)
            log.warning("%s wrote its %d route entries again", self.title, len(held))
            self.missed_since(self.last_beat)
            await self.restored(clients)
        self.last_beat = beat_at

    async def refresh(self) -> None:
        """Push back our entries' TTL (3 x interval)."""
        refresh_at = time.time()
        expired = await self.routes.refresh(self.table.uids())
        if expired:
            # Their TTL ran out while Redis was away (a cut longer than it): until written
            # again, publishes see these users offline.
            clients = [c for c in self.table if c.uid in expired]
            await self.routes.restore([(c.uid, c.conn_id, c.identity.groups) for c in clients])
            log.warning("%s wrote %d users' expired route entries again", self.title, len(expired))
            self.missed_since(self.last_refresh)
            await self.restored(clients)
        self.last_refresh = refresh_at

    async def withdraw(self, worker_id: str) -> None:
        """Remove our route entries and leave the cluster view: at stop, once nothing may
        write them back. Redis out of reach leaves them to their TTLs."""
        with contextlib.suppress(RedisError, OSError):
            removed = await self.routes.forget(worker_id)
            log.info("%s removed %d route entries", self.title, removed)
            await self.board.withdraw()

    async def release_ids(self) -> None:
        """Let go of the id generator's number, once this worker makes no more ids (its
        ingest drained): a worker that takes the number next makes ids from 0 in the same
        millisecond. Redis out of reach leaves it to its TTL."""
        with contextlib.suppress(RedisError, OSError):
            await self.lease.release()
