"""The socket worker's heartbeat pass (pmq.reactor.heartbeat), on fake connections.

The end-to-end side (a silent raw client is dropped, one that answers stays) is in
tests/test_gateway.py; here each decision of one pass is checked at chosen times.
"""

from __future__ import annotations

from typing import Any

from websockets.protocol import State

from pmq.domain.auth import Identity
from pmq.reactor.connections import Client, ConnectionTable
from pmq.reactor.heartbeat import CLOSE_SECONDS, Heartbeat
from pmq.wire.client import CloseCode


class FakeProtocol:
    def __init__(self, ws: FakeConnection) -> None:
        self.ws = ws
        self.state = State.OPEN

    def send_ping(self, data: bytes) -> None:
        self.ws.events.append("ping")

    def fail(self, code: int, reason: str) -> None:
        self.ws.events.append(f"fail {code} {reason}")
        self.state = State.CLOSING


class FakeLoop:
    def __init__(self, ws: FakeConnection) -> None:
        self.ws = ws

    def call_later(self, delay: float, callback: Any) -> None:
        assert callback == self.ws.transport.abort
        self.ws.events.append(f"abort in {delay}")


class FakeTransport:
    def abort(self) -> None:
        raise AssertionError("aborted at once, not after the close frame's time")


class FakeConnection:
    def __init__(self, heard: float, pinged: float = 0.0) -> None:
        self.heard = heard
        self.pinged = pinged
        self.events: list[str] = []
        self.protocol = FakeProtocol(self)
        self.loop = FakeLoop(self)
        self.transport = FakeTransport()

    def send_data(self) -> None:
        self.events.append("sent")


def table_of(**connections: FakeConnection) -> ConnectionTable:
    table = ConnectionTable()
    for uid, ws in connections.items():
        table.add(Client(ws, uid, Identity(uid.lstrip("u")), 1 << 20, 50))  # type: ignore[arg-type]
    return table


def test_a_pass_pings_those_due_and_fails_the_silent() -> None:
    fresh = FakeConnection(heard=99.0, pinged=90.0)
    due, silent = FakeConnection(heard=99.0, pinged=70.0), FakeConnection(heard=39.0)
    heartbeat = Heartbeat(table_of(u1=fresh, u2=due, u3=silent), interval=25, timeout=60)
    assert heartbeat.beat(100.0) == (1, 1)
    assert fresh.events == []  # pinged 10 s ago
    assert due.events == ["ping", "sent"] and due.pinged == 100.0  # busy or not, once an interval
    assert silent.events == [
        f"fail {CloseCode.INTERNAL_ERROR} heartbeat timeout",
        "sent",
        f"abort in {CLOSE_SECONDS}",
    ]


def test_a_connection_is_pinged_once_an_interval() -> None:
    ws = FakeConnection(heard=0.0)
    heartbeat = Heartbeat(table_of(u1=ws), interval=25, timeout=60)
    pings = [t for t in range(0, 60) if heartbeat.beat(float(t))[0]]
    assert pings == [25, 50]


def test_closed_connections_are_left_alone() -> None:
    ws = FakeConnection(heard=0.0)
    ws.protocol.state = State.CLOSED
    assert Heartbeat(table_of(u1=ws), interval=25, timeout=60).beat(100.0) == (0, 0)
    assert ws.events == []
