"""Live unread badges: when a user's counters change, push them, coalesced per user.

At most one ``unread`` frame per ``unread.push_interval`` per user from this worker: a burst
of messages schedules one push at the end of the interval instead of one per message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from pmq.protocol import FrameType, encode_event
from pmq.reactor.connections import ConnectionTable

log = logging.getLogger(__name__)

PRUNE_AT = 10000


class UnreadPusher:
    def __init__(
        self,
        interval: float,
        table: ConnectionTable,
        read: Callable[[str], Awaitable[dict[str, int]]],
    ) -> None:
        self.interval = interval
        self.table = table
        self.read = read
        self.not_before: dict[str, float] = {}  # uid -> earliest next push (monotonic)
        self.scheduled: set[str] = set()

    def changed(self, uid: str) -> None:
        """The counters of ``uid`` changed: schedule a push unless one is already due."""
        if uid in self.scheduled or not self.table.of_user(uid):
            return
        self.scheduled.add(uid)
        delay = max(0.0, self.not_before.get(uid, 0.0) - time.monotonic())
        loop = asyncio.get_running_loop()
        loop.call_later(delay, lambda: loop.create_task(self.push(uid)))

    async def push(self, uid: str) -> None:
        self.scheduled.discard(uid)
        now = time.monotonic()
        self.not_before[uid] = now + self.interval
        if len(self.not_before) > PRUNE_AT:
            self.not_before = {u: t for u, t in self.not_before.items() if t > now}
        try:
            counts = await self.read(uid)
        except Exception:
            log.exception("unread push failed uid=%s", uid)
            return
        self.table.send_to_user(uid, encode_event(FrameType.UNREAD, data=counts))
