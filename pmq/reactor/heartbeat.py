"""The socket worker's heartbeat: one loop pings every quiet connection and drops the silent.

websockets' own keepalive runs a task per connection that sleeps, pings and waits for the
pong under a timeout: at 12,500 connections a worker held that many tasks, timers and
futures (1.4 KB a connection) and spent a quarter of its time during a broadcast in them.
Here each connection only notes when it last heard from its peer (any frame counts, a pong
included) and when it was last pinged; every tick one pass over the connection table pings
each connection once per ``heartbeat.interval`` and fails those silent for
``heartbeat.timeout`` with 1011, as websockets did.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from pmq.reactor.connections import ConnectionTable
from pmq.wire.client import CloseCode

log = logging.getLogger(__name__)

CLOSE_SECONDS = 2.0  # after failing a connection, how long its close frame may take


class WatchedConnection(ServerConnection):
    """A server connection that notes when it last received anything (loop time)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.heard = self.loop.time()
        self.pinged = self.heard

    def data_received(self, data: bytes) -> None:
        self.heard = self.loop.time()
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        """Also close websockets' parser: a generator whose frame holds the protocol (and
        with it the reader, logger and close frames), a reference cycle that only the
        garbage collector would free, and the heap freezer (pmq.workers.heap) only at its
        hourly full collection. Nothing is parsed once the connection is lost."""
        super().connection_lost(exc)
        self.protocol.parser.close()


def ping(ws: WatchedConnection, now: float) -> None:
    """Queue a ping without waiting (the pong only has to arrive, as any frame would)."""
    ws.protocol.send_ping(b"")
    ws.send_data()
    ws.pinged = now


def fail_silent(ws: WatchedConnection) -> None:
    """Close a peer that stopped answering: 1011, and the TCP connection soon after."""
    ws.protocol.fail(CloseCode.INTERNAL_ERROR, "heartbeat timeout")
    ws.send_data()
    ws.loop.call_later(CLOSE_SECONDS, ws.transport.abort)


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
            ws: WatchedConnection = client.ws  # type: ignore[assignment]
            due = now - ws.pinged >= self.interval
            silent = now - ws.heard >= self.timeout
            if not (due or silent) or ws.protocol.state is not State.OPEN:
                continue  # most connections, most ticks: the cheap tests first
            if silent:
                log.info("closing silent client conn=%s uid=%s", client.conn_id, client.uid)
                fail_silent(ws)
                failed += 1
            else:
                ping(ws, now)
                pinged += 1
        return pinged, failed
