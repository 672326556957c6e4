"""The socket worker's heartbeat pass (pmq.reactor.heartbeat), on fake connections.

The end-to-end side (a silent raw client is dropped, one that answers stays) is in
tests/test_gateway.py; here each decision of one pass is checked at chosen times.
"""

from __future__ import annotations

from pmq.domain.auth import Identity
from pmq.reactor.connections import Client, ConnectionTable
from pmq.reactor.heartbeat import Heartbeat
from pmq.wire.client import CloseCode


class FakeConnection:
    """What the heartbeat uses of a pmq.reactor.websocket.Connection, noting its calls."""

    def __init__(self, heard: float, pinged: float = 0.0) -> None:
        self.heard = heard
        self.pinged = pinged
        self.open = True
        self.events: list[str] = []

    def ping(self) -> None:
        self.events.append("ping")

    def close(self, code: int, reason: str) -> None:
        self.events.append(f"close {code} {reason}")
        self.open = False


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
    assert due.events == ["ping"] and due.pinged == 100.0  # busy or not, once an interval
    assert silent.events == [f"close {CloseCode.INTERNAL_ERROR} heartbeat timeout"]


def test_a_connection_is_pinged_once_an_interval() -> None:
    ws = FakeConnection(heard=0.0)
    heartbeat = Heartbeat(table_of(u1=ws), interval=25, timeout=60)
    pings = [t for t in range(0, 60) if heartbeat.beat(float(t))[0]]
    assert pings == [25, 50]


def test_closed_connections_are_left_alone() -> None:
    ws = FakeConnection(heard=0.0)
    ws.open = False
    assert Heartbeat(table_of(u1=ws), interval=25, timeout=60).beat(100.0) == (0, 0)
    assert ws.events == []
