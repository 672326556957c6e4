"""A connect's replay, and the late replay of cold messages after a storage outage.

On connect the user gets the oldest unacked messages (storage's older ones, then Redis's),
at most ``inbox.replay_max`` of them, and the broadcasts above their watermark, interleaved
in one id order. When more messages wait, an ``inbox.more`` frame with the last id replayed
follows, and the client pages through the rest with ``msg.pull`` from that id: a connect
never reads more than its bound, however full the inbox. When storage does not answer
(an outage, or no answer within COLD_TIMEOUT), the connect still goes on: Redis's messages
and the broadcasts are replayed at once, and :class:`LateReplays` retries the storage read
in the background, with back-off, until it answers; then it pushes, in id order, the unacked
messages this connection has not had yet (replayed or pushed live meanwhile: the connection
notes the ids it is sent until then). The order is relaxed only in that case: the older
messages that only storage held arrive after newer ones and after live pushes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from pmq.domain.broadcast import Broadcasts
from pmq.domain.inbox import ColdReader, Inbox, Look
from pmq.errors import StorageError
from pmq.reactor.connections import Client
from pmq.wire.client import FrameType, encode_event, push_of

log = logging.getLogger(__name__)

PAGE = 200  # messages per inbox read
LOOK = PAGE + 1  # hot ids a connect's first look reads: a page, and one to tell if more wait
COLD_TIMEOUT = 3.0  # seconds a connect waits for storage before replaying without it
RETRY_FIRST = 0.5  # seconds before the first late read, doubling up to RETRY_MAX
RETRY_MAX = 10.0


def bounded(cold: ColdReader) -> ColdReader:
    """``cold`` failing with TimeoutError when storage takes longer than COLD_TIMEOUT."""

    async def read(uid: str, after: int, limit: int) -> list[dict[str, Any]]:
        return await asyncio.wait_for(cold(uid, after, limit), COLD_TIMEOUT)

    return read


async def replay(
    client: Client,
    inbox: Inbox,
    cold: ColdReader,
    look: Look,
    broadcasts: deque[dict[str, Any]],
    most: int,
) -> bool:
    """Replay the oldest ``most`` messages of the inbox (from ``look``, read at after = 0
    with limit LOOK) with ``broadcasts`` interleaved, in id order, on ``client`` (held: see
    Client.hold), then ``inbox.more`` when more wait. Each page reads one message more than
    it replays, to tell. Returns False when storage did not answer: Redis's messages were
    replayed without it, and the connection notes the ids it is sent from now on
    (Client.sent) for LateReplays.start()."""
    reader: ColdReader | None = bounded(cold)
    after = replayed = 0
    more = False
    page_look: Look | None = look
    while True:
        want = min(PAGE, most - replayed)
        try:
            batch = await inbox.pending(client.uid, reader, after, want + 1, page_look)
        except (StorageError, TimeoutError) as exc:
            log.warning("replay for uid=%s without storage, retried later: %r", client.uid, exc)
            reader = None
            client.sent = set(client.replayed or ())  # what earlier pages replayed
            continue  # the same page, Redis's part only
        page_look = None  # later pages look again
        page = batch[:want]
        for message in page:  # broadcasts interleaved: one id order for both
            while broadcasts and int(broadcasts[0]["id"]) < int(message["id"]):
                client.replay(*push_of(broadcasts.popleft()))
            client.replay(*push_of(message))
        replayed += len(page)
        if len(batch) <= want:
            break
        after = int(page[-1]["id"])
        if replayed >= most:
            more = True
            break
    for message in broadcasts:
        client.replay(*push_of(message))
    if more:
        client.write(encode_event(FrameType.INBOX_MORE, after=str(after)))
    return reader is not None


class ConnectReplay:
    """A connect's replay (:func:`replay`), and its late part when storage did not answer
    (:class:`LateReplays`): ``most`` reads ``inbox.replay_max`` at each connect."""

    def __init__(
        self, inbox: Inbox, broadcasts: Broadcasts, cold: ColdReader, most: Callable[[], int]
    ) -> None:
        self.inbox = inbox
        self.broadcasts = broadcasts
        self.cold = cold
        self.most = most
        self.late = LateReplays(inbox, cold, most)

    async def run(self, client: Client, look: Look, broadcast_ids: list[int]) -> None:
        """Replay on ``client`` (held) from the registration's ``look`` and the broadcasts
        of ``broadcast_ids``, then let its live frames through (Client.release). What only
        storage holds comes later if storage does not answer."""
        bodies = await self.broadcasts.bodies(broadcast_ids) if broadcast_ids else ()
        complete = await replay(client, self.inbox, self.cold, look, deque(bodies), self.most())
        client.release()
        if not complete:  # storage did not answer: what it holds comes when it does
            self.late.start(client)

    def stop(self, client: Client) -> None:
        """``client`` closed: its late replay, if any, is no longer due."""
        self.late.stop(client)

    async def close(self) -> None:
        await self.late.close()


class LateReplays:
    """The background replays of what storage held back on connect, one task per
    connection; ``cold`` reads storage as in :func:`replay`; ``most`` says how many messages
    a connect replays at most (``inbox.replay_max``, read at each late replay)."""

    def __init__(self, inbox: Inbox, cold: ColdReader, most: Callable[[], int]) -> None:
        self.inbox = inbox
        self.cold = bounded(cold)
        self.most = most
        self.tasks: dict[str, asyncio.Task[None]] = {}  # conn id -> its late replay

    def start(self, client: Client) -> None:
        """Replay what ``client`` missed (see :func:`replay`) once storage answers."""
        task = asyncio.create_task(self._deliver(client), name=f"late-replay-{client.conn_id}")
        self.tasks[client.conn_id] = task
        task.add_done_callback(lambda _: self.tasks.pop(client.conn_id, None))

    def stop(self, client: Client) -> None:
        """The connection closed: its late replay is no longer due."""
        task = self.tasks.pop(client.conn_id, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        self.tasks.clear()

    async def _deliver(self, client: Client) -> None:
        delay = RETRY_FIRST
        try:
            while client.ws.open:
                await asyncio.sleep(delay)
                try:
                    messages = await self._unacked(client.uid, self.most())
                except (StorageError, TimeoutError):
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                sent = client.sent or set()  # newer messages came live, or will
                missed = [
                    m for m in messages if int(m["id"]) < client.opened and int(m["id"]) not in sent
                ]
                for message in missed:
                    client.push_missed(*push_of(message))
                log.info("late replay for uid=%s: %d messages", client.uid, len(missed))
                return
        except Exception:  # the outer boundary of this task: log with context, carry on
            log.exception("late replay for conn=%s uid=%s failed", client.conn_id, client.uid)
        finally:
            client.sent = None

    async def _unacked(self, uid: str, most: int) -> list[dict[str, Any]]:
        """The oldest ``most`` unacked messages of ``uid``, storage's and Redis's, in id
        order: those the connect would have replayed (the client pulls the rest)."""
        found: list[dict[str, Any]] = []
        after = 0
        while len(found) < most:
            want = min(PAGE, most - len(found))
            batch = await self.inbox.pending(uid, self.cold, after, want)
            found += batch
            if len(batch) < want:
                break
            after = int(batch[-1]["id"])
        return found
