"""Live unread badges: when a user's counters change, push them, coalesced per user.

Changes only mark the user dirty; one loop per worker, every ``unread.push_interval``,
reads the counters of every dirty user in one pipelined round trip and pushes an
``unread`` frame to their connections here. So a burst of messages, or a broadcast to
thousands, costs one frame per user per interval, never one per message.

While a broadcast is fanned out, and for one interval after, no flush starts: the badges it
causes (one frame per connection) would otherwise compete for the CPU with the fan-outs
other workers of the node are still writing, delaying the broadcast's last deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator

from pmq.protocol import FrameType, encode_event
from pmq.reactor.connections import ConnectionTable
from pmq.unread import Unread

log = logging.getLogger(__name__)

CHUNK = 500
HOLD_POLL_SECONDS = 0.02


class UnreadPusher:
    def __init__(self, interval: float, table: ConnectionTable, unread: Unread) -> None:
        self.interval = interval
        self.table = table
        self.unread = unread
        self.dirty: set[str] = set()
        self.holds = 0  # fan-outs in progress: badges wait, the broadcast itself goes first
        self.released = -interval  # time.monotonic() when the last fan-out ended

    def changed(self, uid: str) -> None:
        """The counters of ``uid`` changed: push them at the next tick."""
        self.dirty.add(uid)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """No flush starts inside this block (a fan-out writing to every connection: its
        frames must not queue behind a second frame to every connection), nor for one
        interval after it."""
        self.holds += 1
        try:
            yield
        finally:
            self.holds -= 1
            self.released = time.monotonic()

    @property
    def holding(self) -> bool:
        return bool(self.holds) or time.monotonic() - self.released < self.interval

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            while self.holding:
                await asyncio.sleep(HOLD_POLL_SECONDS)
            try:
                await self.flush()
            except Exception:  # this tick's users are dropped; their next change retries
                log.exception("unread push failed")

    async def flush(self) -> None:
        dirty, self.dirty = self.dirty, set()
        users = []
        for uid in dirty:
            clients = self.table.of_user(uid)
            if clients:
                users.append((uid, clients[0].identity.groups))
        frames: dict[tuple[tuple[str, int], ...], bytes] = {}  # after a broadcast most
        for start in range(0, len(users), CHUNK):  # users share their counts: encode once
            chunk = users[start : start + CHUNK]
            for (uid, _), counts in zip(chunk, await self.unread.counts_many(chunk), strict=True):
                key = tuple(counts.items())
                frame = frames.get(key)
                if frame is None:
                    frame = frames[key] = encode_event(FrameType.UNREAD, data=counts)
                self.table.send_to_user(uid, frame)
