"""pmq.reactor.unread.UnreadPusher on its own: badges wait for a fan-out and one interval after
it, and come once per interval otherwise."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from pmq.reactor.unread import UnreadPusher

INTERVAL = 0.3


class FakeClient:
    class identity:  # stands for an Identity
        groups: tuple[str, ...] = ()


class FakeTable:
    """The users online here, and when each got a frame."""

    def __init__(self, *uids: str) -> None:
        self.uids = set(uids)
        self.sent: list[tuple[str, float]] = []

    def of_user(self, uid: str) -> list[FakeClient]:
        return [FakeClient()] if uid in self.uids else []

    def send_to_user(self, uid: str, frame: bytes) -> int:
        self.sent.append((uid, time.monotonic()))
        return 1


class FakeUnread:
    async def counts_many(self, users: Sequence[tuple[str, Any]]) -> list[dict[str, int]]:
        return [{"comment": 1, "total": 1} for _ in users]


async def until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_badges_wait_for_a_fan_out_and_one_interval_after_it() -> None:
    table = FakeTable("7", "8")
    pusher = UnreadPusher(INTERVAL, table, FakeUnread())  # type: ignore[arg-type]

    async def scenario() -> tuple[float, float, float]:
        running = asyncio.create_task(pusher.run())
        try:
            began = time.monotonic()
            pusher.changed("7")
            await until(lambda: table.sent)  # no fan-out: within about an interval
            first = table.sent[0][1] - began
            with pusher.held():  # a fan-out lasting three intervals
                pusher.changed("8")
                await asyncio.sleep(3 * INTERVAL)
            released = time.monotonic()
            await until(lambda: len(table.sent) == 2)
            return first, released, table.sent[1][1]
        finally:
            running.cancel()

    first, released, second = asyncio.run(scenario())
    assert first < 3 * INTERVAL
    assert second >= released + INTERVAL
    assert [uid for uid, _ in table.sent] == ["7", "8"]
