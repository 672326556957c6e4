"""Broadcast fan-out on one socket worker: write one encoded frame to every local member.

The task worker publishes each broadcast once on the broadcast channel; every socket
worker of every node gets it here. Connections are written in chunks with a yield to the
event loop between them, so pings and other clients keep being served while thousands of
sockets are written (a slice of at most SLICE_SECONDS: a count of writes would stall the
loop for longer on a loaded machine); the frame is encoded once, and no write ever waits
for a client.

A broadcast reaches each connection once: a connection that replayed it on connect leaves
the live copy out (pmq.reactor.connections), and a broadcast published again (its task
worker died before it was stored, and a successor published it once more) is skipped here
while it is among the last RECENT_IDS fanned out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from pmq import metrics
from pmq.domain.broadcast import ALL
from pmq.reactor.connections import ConnectionTable, text_frame
from pmq.reactor.unread import UnreadPusher
from pmq.wire import relay
from pmq.wire.client import message_id_of

log = logging.getLogger(__name__)

SLICE_SECONDS = 0.01  # the longest the fan-out writes before it yields to the loop
CHECK_EVERY = 32  # writes between two looks at the clock
RECENT_IDS = 1024  # broadcast ids remembered, so one published twice is written once


class Fanout:
    def __init__(self, table: ConnectionTable, unread: UnreadPusher) -> None:
        self.table = table
        self.unread = unread
        self.queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.delivered = 0
        self.delivering = False
        self.max_stall_ms = 0.0  # the longest the loop went without a yield, for stats
        self.recent: dict[int, None] = {}  # the last RECENT_IDS broadcasts, oldest first

    def on_message(self, message: dict[str, Any]) -> None:
        """pub/sub callback: queue the broadcast; run() delivers them one at a time. A
        malformed one (anything can publish on the channel) is logged and dropped here."""
        try:
            group, frame = relay.decode_broadcast(message["data"])
            # Parsed here so that deliver() never meets a frame it cannot read: a fault
            # there ends the fan-out loop, and with it every socket worker at once.
            message_id_of(frame)
        except (KeyError, ValueError, UnicodeDecodeError):
            log.warning("dropped a malformed broadcast message")
            return
        self.queue.put_nowait((group, frame))

    @property
    def busy(self) -> bool:
        """A broadcast is being written or waits to be."""
        return self.delivering or not self.queue.empty()

    async def run(self) -> None:
        while True:
            group, frame = await self.queue.get()
            self.delivering = True
            try:
                with self.unread.held():
                    await self.deliver(group, frame)
            finally:
                self.delivering = False

    def first_time(self, message_id: int) -> bool:
        """True unless broadcast ``message_id`` was fanned out here lately."""
        if message_id in self.recent:
            return False
        self.recent[message_id] = None
        if len(self.recent) > RECENT_IDS:
            del self.recent[next(iter(self.recent))]
        return True

    async def deliver(self, group: str, frame: bytes) -> int:
        """Write ``frame`` to every local connection of ``group``; returns how many (0 for
        a broadcast fanned out here lately)."""
        message_id = message_id_of(frame)
        if message_id and not self.first_time(message_id):
            return 0
        clients = [c for c in self.table if group == ALL or group in c.identity.groups]
        wire = text_frame(frame)
        began = time.perf_counter()
        for n, client in enumerate(clients, 1):
            client.send_frame(wire, message_id)
            if n % CHECK_EVERY == 0 and time.perf_counter() - began >= SLICE_SECONDS:
                self.note_stall(began)
                await asyncio.sleep(0)
                began = time.perf_counter()
        self.note_stall(began)
        for uid in {c.uid for c in clients}:
            self.unread.changed(uid)
        self.delivered += len(clients)
        metrics.BROADCAST_DELIVERIES.inc(len(clients))
        return len(clients)

    def note_stall(self, began: float) -> None:
        self.max_stall_ms = max(self.max_stall_ms, (time.perf_counter() - began) * 1000)
