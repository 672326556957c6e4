"""pmq.reactor.unread.UnreadPusher on its own: a badge rides with a new message's push when
the user had none this interval, system counted from the kept broadcast times; badges wait
for a fan-out and one interval after it, and come once per interval otherwise."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from pmq.domain.unread import Unread
from pmq.reactor.connections import text_frame
from pmq.reactor.unread import CHUNK, UnreadPusher
from pmq.wire.client import FrameType, encode_event
from pmq.wire.relay import UnreadState
from tests.helpers import wait_for_async

INTERVAL = 0.3


class FakeClient:
    class identity:  # stands for an Identity
        groups: tuple[str, ...] = ("author",)


class FakeTable:
    """The users online here, and what each got when."""

    def __init__(self, *uids: str) -> None:
        self.uids = set(uids)
        self.sent: list[tuple[str, float]] = []
        self.wire: list[bytes] = []

    def of_user(self, uid: str) -> list[FakeClient]:
        return [FakeClient()] if uid in self.uids else []

    def any_of_user(self, uid: str) -> FakeClient | None:
        return FakeClient() if uid in self.uids else None

    def send_to_user(self, uid: str, frame: bytes) -> int:
        return self.send_frame_to_user(uid, text_frame(frame))

    def send_frame_to_user(self, uid: str, frame: bytes, message_id: int = 0) -> int:
        self.sent.append((uid, time.monotonic()))
        self.wire.append(frame)
        return 1


NOW_MS = int(time.time() * 1000)
TIMES = {"all": [NOW_MS - 9000.0, NOW_MS - 5000.0], "author": [NOW_MS - 1000.0]}


class FakeUnread(Unread):
    """Counts from no Redis: every counted user has one comment; broadcasts are TIMES."""

    def __init__(self) -> None:
        self.retention_ms = 86_400_000

    async def counts_many(self, users: Sequence[tuple[str, Any]]) -> list[dict[str, int]]:
        return [{"comment": 1, "total": 1} for _ in users]

    async def timelines(self, groups: Sequence[str]) -> dict[str, list[float]]:
        return {g: TIMES.get(g, []) for g in groups}


def test_badges_wait_for_a_fan_out_and_one_interval_after_it() -> None:
    table = FakeTable("7", "8")
    pusher = UnreadPusher(INTERVAL, table, FakeUnread())  # type: ignore[arg-type]

    async def scenario() -> tuple[float, float, float]:
        running = asyncio.create_task(pusher.run())
        try:
            began = time.monotonic()
            pusher.changed("7")
            # No fan-out: within about an interval.
            await wait_for_async(lambda: table.sent, 5, "the first badge")
            first = table.sent[0][1] - began
            with pusher.held():  # a fan-out lasting three intervals
                pusher.changed("8")
                await asyncio.sleep(3 * INTERVAL)
            released = time.monotonic()
            await wait_for_async(lambda: len(table.sent) == 2, 5, "the second badge")
            return first, released, table.sent[1][1]
        finally:
            running.cancel()

    first, released, second = asyncio.run(scenario())
    assert first < 3 * INTERVAL
    assert second >= released + INTERVAL
    assert [uid for uid, _ in table.sent] == ["7", "8"]


def test_broadcasts_faster_than_one_an_interval_hold_the_badges_back_only_once() -> None:
    """SPEC 4 keeps badges live: with a fan-out every 0.8 interval, counting the interval
    from the latest one's end never let a badge go (a user in no broadcast's group saw one
    after eight broadcasts). The wait counts from the first fan-out's end."""
    table = FakeTable("7")
    pusher = UnreadPusher(INTERVAL, table, FakeUnread())  # type: ignore[arg-type]

    async def scenario() -> float:
        running = asyncio.create_task(pusher.run())
        try:
            began = time.monotonic()
            pusher.changed("7")
            while not table.sent and time.monotonic() - began < 10 * INTERVAL:
                with pusher.held():  # a small group's fan-out
                    pass
                await asyncio.sleep(0.8 * INTERVAL)
            return time.monotonic() - began
        finally:
            running.cancel()

    waited = asyncio.run(scenario())
    assert [uid for uid, _ in table.sent] == ["7"], waited


def test_a_new_message_brings_its_badge_along_once_an_interval() -> None:
    table = FakeTable("7")
    pusher = UnreadPusher(INTERVAL, table, FakeUnread())  # type: ignore[arg-type]
    frame = b'{"type":"push","msg":{}}'
    last_clear = NOW_MS - 6000  # the user cleared system after the first broadcast

    async def scenario() -> None:
        await pusher.watch(["author"])  # the first user here: the times are read
        state = UnreadState(["comment", "2", "letter", "1"], last_clear)
        assert pusher.push_message("7", frame, state) == 1
        state = UnreadState(["comment", "3", "letter", "1"], last_clear)
        assert pusher.push_message("7", frame, state) == 1

    asyncio.run(scenario())
    badge = encode_event(
        FrameType.UNREAD,
        data={"comment": 2, "notice": 0, "letter": 1, "system": 2, "cs": 0, "total": 5},
    )
    assert table.wire == [text_frame(frame) + text_frame(badge), text_frame(frame)]
    assert list(pusher.dirty) == ["7"]  # the second change waits for the interval to pass


class FanOutDuringRead(FakeUnread):
    """Counts whose first read of each flush (``armed``) lets ``meanwhile`` act on the
    pusher: a broadcast's fan-out arriving while the badges go."""

    def __init__(self, meanwhile: Callable[[UnreadPusher], None]) -> None:
        super().__init__()
        self.meanwhile = meanwhile
        self.pusher: UnreadPusher | None = None
        self.armed = True

    async def counts_many(self, users: Sequence[tuple[str, Any]]) -> list[dict[str, int]]:
        if self.armed and self.pusher is not None:
            self.armed = False
            self.meanwhile(self.pusher)
        return await super().counts_many(users)


def fan_out_begins(pusher: UnreadPusher) -> None:
    pusher.holds += 1


def whole_fan_out(pusher: UnreadPusher) -> None:
    with pusher.held():  # a small group's: over at once
        pass


def flush_rig(
    uids: list[str], meanwhile: Callable[[UnreadPusher], None]
) -> tuple[FakeTable, FanOutDuringRead, UnreadPusher]:
    """A pusher whose ``uids`` all changed, its counts read as FanOutDuringRead does."""
    table = FakeTable(*uids)
    unread = FanOutDuringRead(meanwhile)
    pusher = UnreadPusher(INTERVAL, table, unread)  # type: ignore[arg-type]
    unread.pusher = pusher
    for uid in uids:
        pusher.changed(uid)
    return table, unread, pusher


def test_a_fan_out_that_begins_during_a_badge_flush_stops_it_until_after() -> None:
    """The badges of a broadcast's users go one interval after its fan-out, one frame for
    every connection; the next broadcast, arriving while they go, must not share the CPU
    with them: the flush stops before its next chunk, and the users it had not reached wait
    for after that fan-out (bench.broadcast, 50,000 connections, broadcasts 2 s apart: the
    one that met the badges of the one before took 990 to 1,080 ms, the others 560 to 720).
    With a broadcast during every flush, the users cut off come first the next time: each
    broadcast marks every user changed again, and none may wait for ever."""
    uids = [str(n) for n in range(3 * CHUNK)]
    table, unread, pusher = flush_rig(uids, fan_out_begins)

    asyncio.run(pusher.flush())
    assert len(table.sent) == CHUNK  # the chunk read went; then the fan-out came first
    assert len(pusher.dirty) == 2 * CHUNK  # the rest waits for after it
    for _ in range(2):  # two more broadcasts, each during a flush
        pusher.holds -= 1
        pusher.released = -INTERVAL  # and the interval after the fan-out has passed
        pusher.pushed.clear()
        for uid in uids:  # the fan-out's users' counters changed
            pusher.changed(uid)
        unread.armed = True
        asyncio.run(pusher.flush())
    assert sorted(uid for uid, _ in table.sent) == sorted(uids)  # each once, none left out


def test_a_fan_out_over_before_the_next_chunk_still_stops_the_badges_for_an_interval() -> None:
    """Other workers of the node may still be writing that broadcast: badges wait for one
    interval after any fan-out here, even one that began and ended inside a read."""
    table, _, pusher = flush_rig([str(n) for n in range(2 * CHUNK)], whole_fan_out)
    asyncio.run(pusher.flush())
    assert len(table.sent) == CHUNK
