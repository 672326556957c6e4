"""The socket worker's heartbeat: one loop pings every quiet connection and drops the silent.

A keepalive task per connection that sleeps, pings and waits for the pong under a timeout
(websockets' own, which PMQ used before picows) cost 1.4 KB a connection at 12,500
connections and a quarter of a worker's time during a broadcast. Here each connection only
notes when it last heard from its peer (any frame counts, a pong included) and when it was
last pinged (pmq.reactor.websocket.Connection); every tick one pass over the connection
table pings each connection once per ``heartbeat.interval`` and closes those silent for
``heartbeat.timeout`` with 1011 (the TCP connection ends CLOSE_SECONDS later at most).
"""

from __future__ import annotations

import asyncio
import logging

from pmq.reactor.connections import ConnectionTable
from pmq.wire.client import CloseCode

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, table: ConnectionTable, interval: float, timeout: float) -> None:
        self.table = table
        self.interval = interval
        self.timeout = timeout
        self.tick = min(1.0, interval / 4)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.tick)
            self.beat(loop.time())

    def beat(self, now: float) -> tuple[int, int]:
        """One pass: (connections pinged, connections failed)."""
        pinged = failed = 0
        for client in self.table:
            ws = client.ws
            due = now - ws.pinged >= self.interval
            silent = now - ws.heard >= self.timeout
            if not (due or silent) or not ws.open:
                continue  # most connections, most ticks: the cheap tests first
            if silent:
                log.info("closing silent client conn=%s uid=%s", client.conn_id, client.uid)
                ws.close(CloseCode.INTERNAL_ERROR, "heartbeat timeout")
                failed += 1
            else:
                ws.ping()  # the pong only has to arrive, as any frame would
                ws.pinged = now
                pinged += 1
        return pinged, failed
