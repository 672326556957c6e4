"""A connect's replay, and the late replay of cold messages after a storage outage.

On connect the user gets every unacked message (storage's older ones, then Redis's) and the
broadcasts above their watermark, interleaved in one id order. When storage does not answer
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
from typing import Any

from websockets.protocol import State

from pmq.errors import StorageError
from pmq.inbox import ColdReader, Inbox, Look
from pmq.messaging import push_of
from pmq.reactor.connections import Client

log = logging.getLogger(__name__)

PAGE = 200  # messages per inbox read
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
) -> bool:
    """Replay the inbox (from ``look``, read at after = 0) with ``broadcasts`` interleaved,
    in id order, on ``client`` (held: see Client.hold). Returns False when storage did not
    answer: Redis's messages were replayed without it, and the connection notes the ids it
    is sent from now on (Client.sent) for LateReplays.start()."""
    reader: ColdReader | None = bounded(cold)
    after = 0
    page_look: Look | None = look
    while True:
        try:
            batch = await inbox.pending(client.uid, reader, after, PAGE, page_look)
        except (StorageError, TimeoutError) as exc:
            log.warning("replay for uid=%s without storage, retried later: %r", client.uid, exc)
            reader = None
            client.sent = set(client.replayed or ())  # what earlier pages replayed
            continue  # the same page, Redis's part only
        page_look = None  # later pages look again
        for message in batch:  # broadcasts interleaved: one id order for both
            while broadcasts and int(broadcasts[0]["id"]) < int(message["id"]):
                client.replay(*push_of(broadcasts.popleft()))
            client.replay(*push_of(message))
        if len(batch) < PAGE:
            break
        after = int(batch[-1]["id"])
    for message in broadcasts:
        client.replay(*push_of(message))
    return reader is not None


class LateReplays:
    """The background replays of what storage held back on connect, one task per
    connection; ``cold`` reads storage as in :func:`replay`."""

    def __init__(self, inbox: Inbox, cold: ColdReader) -> None:
        self.inbox = inbox
        self.cold = bounded(cold)
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
            while client.ws.protocol.state is State.OPEN:
                await asyncio.sleep(delay)
                try:
                    messages = await self._unacked(client.uid)
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

    async def _unacked(self, uid: str) -> list[dict[str, Any]]:
        """Every unacked message of ``uid``, storage's and Redis's, in id order."""
        found: list[dict[str, Any]] = []
        after = 0
        while True:
            batch = await self.inbox.pending(uid, self.cold, after, PAGE)
            found += batch
            if len(batch) < PAGE:
                return found
            after = int(batch[-1]["id"])

