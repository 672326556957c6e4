"""Live unread badges: when a user's counters change, push them, at most one frame per user
per ``unread.push_interval``.

A new message brings its user's counters along (the publish script read them; see
pmq.wire.relay's Op.MESSAGE), so a user who had no badge this interval gets it at once, in
the same write as the push: one system call for both and no Redis read. Any other change,
or one inside the interval, only marks the user dirty; one loop per worker, every interval,
reads the counters of the dirty users whose interval has passed in one pipelined round trip
and pushes them. So a burst of messages, or a broadcast to thousands, costs one frame per
user per interval, never one per message.

``system`` counts broadcasts to the user's groups (pmq.domain.unread). For the badges sent with a
push the loop keeps the broadcast times of the groups seen here, read again every interval
and not used from the end of a fan-out until read again.

While a broadcast is fanned out, and for one interval after, no badges go out: one frame per
connection would otherwise compete for the CPU with the fan-outs other workers of the node
are still writing, delaying the broadcast's last deliveries. A fan-out that begins while
badges go stops them at the next chunk; the users not yet sent theirs come first after it.
The interval is counted from the end of the first fan-out since the badges last went, so
broadcasts coming faster than one an interval hold the badges back no longer than that
interval and the fan-outs themselves (counting from the latest, they never went out).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Iterator, Sequence

from pmq.domain.broadcast import groups_of
from pmq.domain.unread import Unread, counts_of
from pmq.reactor.connections import ConnectionTable, text_frame
from pmq.wire.client import FrameType, encode_event, message_id_of
from pmq.wire.relay import UnreadState

CHUNK = 500
HOLD_POLL_SECONDS = 0.02


@functools.lru_cache(maxsize=4096)
def reach(groups: tuple[str, ...]) -> tuple[str, ...]:
    """groups_of() a token's groups, made once per set of groups (most users share theirs)."""
    return tuple(groups_of(groups))


class UnreadPusher:
    def __init__(self, interval: float, table: ConnectionTable, unread: Unread) -> None:
        self.interval = interval
        self.table = table
        self.unread = unread
        # Users whose counters changed, in the order they did: a flush cut short by a
        # fan-out puts those it had not reached first, so the next serves them first.
        self.dirty: dict[str, None] = {}
        self.pushed: dict[str, float] = {}  # uid -> when its last badge went (this interval)
        self.times: dict[str, list[float]] = {}  # broadcast times of the groups seen here
        self.fresh = False  # self.times read since the last fan-out
        self.holds = 0  # fan-outs in progress: badges wait, the broadcast itself goes first
        # time.monotonic() when the first fan-out since the badges last went ended
        self.released = -interval
        self.waiting = False  # a fan-out ended since the badges last went

    def changed(self, uid: str) -> None:
        """The counters of ``uid`` changed: push them at the next tick."""
        self.dirty[uid] = None

    async def watch(self, groups: Sequence[str]) -> None:
        """A user of ``groups`` connected: keep their broadcast times (read now if new)."""
        new = [g for g in groups_of(groups) if g not in self.times]
        if new:
            first = not self.times
            self.times.update(await self.unread.timelines(new))
            if first:  # the worker's first user: every time kept was read just now
                self.fresh = not self.holding

    def push_message(self, uid: str, frame: bytes, unread: UnreadState | None) -> int:
        """Push a new message's ``frame`` to the user's connections here, with its badge
        when one may go now (``unread``: the state the publish read), else mark it dirty.
        Returns how many connections took it."""
        badge = self._badge(uid, unread)
        if badge is None:
            self.dirty[uid] = None
            return self.table.send_to_user(uid, frame)
        self.dirty.pop(uid, None)
        self.pushed[uid] = time.monotonic()
        return self.table.send_frame_to_user(
            uid, text_frame(frame) + text_frame(badge), message_id_of(frame)
        )

    def _badge(self, uid: str, unread: UnreadState | None) -> bytes | None:
        if unread is None or not self.fresh or self.holding:
            return None
        if time.monotonic() - self.pushed.get(uid, -self.interval) < self.interval:
            return None
        client = self.table.any_of_user(uid)
        if client is None:
            return None
        groups = reach(client.identity.groups)
        if any(g not in self.times for g in groups):
            return None
        system = self.unread.system_count(unread.last_clear, groups, self.times)
        return encode_event(FrameType.UNREAD, data=counts_of(unread.counts, system))

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """No badge goes out inside this block (a fan-out writing to every connection: its
        frames must not queue behind a second frame to every connection), nor for one
        interval after it; the broadcast times are read again before use."""
        self.holds += 1
        try:
            yield
        finally:
            self.holds -= 1
            if not self.waiting:
                self.released, self.waiting = time.monotonic(), True
            self.fresh = False

    @property
    def holding(self) -> bool:
        return bool(self.holds) or time.monotonic() - self.released < self.interval

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            while self.holding:
                await asyncio.sleep(HOLD_POLL_SECONDS)
            # An error ends the run (it is supervised): this tick's users are dropped, and
            # their next change pushes again.
            if self.times:  # update, not replace: watch() may add a group meanwhile
                self.times.update(await self.unread.timelines(sorted(self.times)))
                self.fresh = not self.holding
            await self.flush()

    async def flush(self) -> None:
        """Push the counters of the dirty users whose last badge is an interval old."""
        now = time.monotonic()
        self.pushed = {u: t for u, t in self.pushed.items() if now - t < self.interval}
        due = [uid for uid in self.dirty if uid not in self.pushed]
        for uid in due:
            del self.dirty[uid]
        users = []
        for uid in due:
            client = self.table.any_of_user(uid)
            if client is not None:
                users.append((uid, client.identity.groups))
        if not users:
            self.waiting = False  # nothing owed: the next fan-out's end starts a new wait
        frames: dict[tuple[tuple[str, int], ...], bytes] = {}  # after a broadcast most
        for start in range(0, len(users), CHUNK):  # users share their counts: encode once
            if self.holding:  # a fan-out began: it goes first, then these users first
                self.dirty = {**dict.fromkeys(uid for uid, _ in users[start:]), **self.dirty}
                return
            self.waiting = False  # badges went: the next fan-out's end starts a new wait
            chunk = users[start : start + CHUNK]
            for (uid, _), counts in zip(chunk, await self.unread.counts_many(chunk), strict=True):
                key = tuple(counts.items())
                frame = frames.get(key)
                if frame is None:
                    frame = frames[key] = encode_event(FrameType.UNREAD, data=counts)
                self.table.send_to_user(uid, frame)
                self.pushed[uid] = time.monotonic()
