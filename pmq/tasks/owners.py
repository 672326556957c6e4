"""Owner leases of a task worker's taken lists, and taking over the lists of the dead.

A task worker takes items from queues into lists of its own before it has handled them: the
storage writer from every storage queue (``keys.store_taken(owner, tag)``), the broadcast
fan-out from the broadcast queue (``keys.broadcast_taken(owner)``). It names them by an
owner id of its own, new with each process (pmq.workers.task). Beside each such queue, a
registry (``keys.store_owners(tag)``, ``keys.broadcast_owners()``) is a ZSET owner -> lease
expiry in unix ms on Redis's own clock (TIME, inside the scripts, so the nodes' clocks never
matter). An owner is registered there by the same script that moves items into its taken
list (the writer's ``writer_top_up``, :meth:`OwnerLease.take_one`), so a taken list never
holds an item while its owner is missing from the registry; while the worker lives,
:meth:`OwnerLease.run` renews the lease every third of it.

The same loop, in every live task worker of any node whatever its index, looks for owners
whose lease has expired and takes over their lists (:meth:`OwnerLease.reclaim`): one script
in the queue's slot checks that the lease is still expired, moves the taken list back to the
head of the queue in order and removes the owner, so exactly one reclaimer wins and an owner
that renewed meanwhile keeps its list. A worker stopped gracefully gives its lists back and
leaves the registries (:meth:`OwnerLease.release`).

A registry per queue, rather than SCAN for taken lists: SCAN walks the whole key space (every
master of a Redis Cluster) on each pass, while the registry is read with one ZRANGEBYSCORE per
queue, in the queue's slot, and its lease and the list it covers change in one script.

Before owner leases, a task worker named its taken lists by its slot, ``NODE:INDEX``
(:func:`legacy_owners`), and no registry listed them. At start, :meth:`OwnerLease.run`
adopts those of its own node that exist: each is registered with a lease from then, as if
its owner had just taken it, so a worker of the old version still draining (a rolling
restart) gives its list back itself, and a list left by one that died is taken over once
that lease expires. Lists of a node that comes back under another name are not found.

An owner whose lease lapsed while it was still alive (Redis unreachable longer than the
lease) may be taken over in the middle of a batch: its items are then written (or a broadcast
published) twice, which the store's writes by id and the clients' drop of ids they have make
harmless, and its next take registers it again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import cast

import redis.asyncio as aioredis

from pmq.cancel import raise_if_cancelled
from pmq.redis import scripts
from pmq.redis.keys import Keys

log = logging.getLogger(__name__)

EXPIRED_PAGE = 100  # owners taken over per queue per pass at most (the next pass goes on)
STOP_WAIT = 2.0  # seconds release() lets a renewal in flight finish before giving back
# Slots adopted at least, whatever task_workers is now: a node may have had more before.
LEGACY_SLOTS = 16


def legacy_owners(node: str, task_workers: int) -> list[str]:
    """The owner names the task workers of ``node`` had before owner leases: their slots,
    ``NODE:INDEX`` with INDEX from 1, at least LEGACY_SLOTS of them."""
    return [f"{node}:{index}" for index in range(1, max(task_workers, LEGACY_SLOTS) + 1)]


@dataclasses.dataclass(frozen=True)
class Leased:
    """A queue whose items are taken into one list per owner, and the registry of those
    owners beside it (the three in one Redis Cluster slot)."""

    owners: str
    queue: str
    taken: Callable[[str], str]  # owner id -> its taken list


def leased_queues(keys: Keys) -> list[Leased]:
    """Every queue a task worker takes from: each storage queue, then the broadcasts'."""
    stores = [
        Leased(
            keys.store_owners(t), keys.store_queue(t), functools.partial(keys.store_taken, tag=t)
        )
        for t in keys.store_tags()
    ]
    return [*stores, Leased(keys.broadcast_owners(), keys.broadcast_queue(), keys.broadcast_taken)]


class OwnerLease:
    """The lease of one task worker ``owner`` on its taken lists of every queue it takes
    from, and its view of everyone else's (module docstring). ``lease`` is in seconds;
    ``legacy``: owner names of the version before owner leases to adopt at start."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        owner: str,
        lease: float,
        legacy: Sequence[str] = (),
    ) -> None:
        self.redis = redis
        self.owner = owner
        self.legacy = list(legacy)
        self.lease = lease
        self.lease_ms = int(lease * 1000)
        self.queues = leased_queues(keys)
        self._renew = scripts.register(redis, "owners_renew")
        self._expired = scripts.register(redis, "owners_expired")
        self._give_back = scripts.register(redis, "owners_give_back")
        self._take_one = scripts.register(redis, "owners_take_one")
        self._adopt = scripts.register(redis, "owners_adopt")
        self._stopped = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.reclaimed = 0  # items taken over from expired owners, for stats

    def script_args(self) -> list[str | int]:
        """What a take script needs to register this owner: its id and the lease in ms."""
        return [self.owner, self.lease_ms]

    async def run(self) -> None:
        """Adopt the ``legacy`` owners' lists, then until :meth:`release`: renew this
        owner's lease and take over the lists of owners whose lease expired, every third of
        the lease. Redis errors end it (to be started again); a lease that lapses meanwhile
        only lets another worker repeat some work."""
        self._task = asyncio.current_task()
        await self.adopt(self.legacy)
        first = True
        while not self._stopped.is_set():
            if not await self.renew() and not first:
                log.warning("task worker %s: its lease had lapsed; renewed", self.owner)
            first = False
            await self.reclaim()
            raise_if_cancelled()  # a fast stop cancels this loop rather than release() it
            try:  # the stop event, not a cancellation redis-py might swallow, ends the wait
                await asyncio.wait_for(self._stopped.wait(), self.lease / 3)
            except TimeoutError:
                pass

    async def take_one(self, queue: str, taken: str, owners: str) -> bytes | None:
        """Move the head of ``queue`` to this owner's ``taken`` list, registered beside it."""
        return cast(
            bytes | None,
            await self._take_one(keys=[queue, taken, owners], args=self.script_args()),
        )

    async def adopt(self, legacy: Sequence[str]) -> int:
        """Register each of the ``legacy`` owners that has a taken list and no registration,
        with a lease from now (module docstring); returns how many lists were adopted."""
        if not legacy:
            return 0
        adopted = 0
        for leased in self.queues:
            keys = [leased.owners, *(leased.taken(owner) for owner in legacy)]
            count = int(await self._adopt(keys=keys, args=[self.lease_ms, *legacy]))
            if count:
                log.warning(
                    "task worker %s: adopted %d taken lists of %s left by a version before "
                    "owner leases; taken over in %gs unless given back",
                    self.owner,
                    count,
                    leased.queue,
                    self.lease,
                )
            adopted += count
        return adopted

    async def renew(self) -> bool:
        """Extend this owner's lease on every queue; False when a registration had lapsed
        (a list of it may have been taken over; writing its batch again is harmless)."""
        lapsed = False
        for leased in self.queues:
            lapsed |= bool(await self._renew(keys=[leased.owners], args=self.script_args()))
        return not lapsed

    async def reclaim(self) -> int:
        """Take over the taken lists of every owner whose lease has expired, putting their
        items back at the head of their queue; returns how many items moved."""
        moved = 0
        for leased in self.queues:
            expired = cast(
                list[bytes], await self._expired(keys=[leased.owners], args=[EXPIRED_PAGE])
            )
            for raw in expired:
                dead = raw.decode()
                if dead == self.owner:  # our own lapsed lease: renew() registers it again
                    continue
                keys = [leased.owners, leased.taken(dead), leased.queue]
                count = int(await self._give_back(keys=keys, args=[dead, 0]))
                if count > 0:
                    log.warning(
                        "task worker %s: took over %d items of %s from %s, whose lease expired",
                        self.owner,
                        count,
                        leased.queue,
                        dead,
                    )
                    moved += count
        self.reclaimed += moved
        return moved

    async def release(self) -> int:
        """Stop :meth:`run` (no renewal may follow), give this owner's taken lists back to
        the head of their queues, in order, and leave the registries; returns how many items
        went back. Whoever took into the lists must have stopped."""
        self._stopped.set()
        task = self._task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=STOP_WAIT)
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        returned = 0
        for leased in self.queues:
            keys = [leased.owners, leased.taken(self.owner), leased.queue]
            returned += int(await self._give_back(keys=keys, args=[self.owner, 1]))
        return returned
