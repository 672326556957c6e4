"""What the socket worker reads from storage: cold inbox messages, the notification centre's
feed, read state and look-ups by id, and the chat's archive.

The SQL store blocks, so every read here goes through the worker's thread pool
(pmq.workers.base.Worker.in_thread), never on the event loop. Rows come back as client
messages (pmq.wire.client.stored_message).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import orjson

from pmq.store import Store
from pmq.store.rows import ReadRows, StoredBroadcast, StoredCsMessage, StoredMessage
from pmq.wire.client import Kind, Message, stored_message

T = TypeVar("T")


class InThread(Protocol):
    """The worker's ``in_thread``: ``func(*args)`` on its thread pool."""

    def __call__(self, func: Callable[..., T], *args: Any) -> Awaitable[T]: ...


class StoredReads:
    """Storage reads for replays, catch-ups, the notification centre (a
    pmq.domain.feed.FeedArchive and pmq.domain.amend.AmendArchive) and chat history (a
    pmq.domain.chatreads.Archive)."""

    def __init__(self, store: Store, in_thread: InThread) -> None:
        self.store = store
        self.in_thread = in_thread

    async def cold_messages(self, uid: str, after: int, limit: int) -> list[dict[str, Any]]:
        """Unacked messages of ``uid`` in storage above ``after``, ``limit`` at most, in id
        order (a pmq.domain.inbox.ColdReader)."""
        return _messages(await self.in_thread(self.store.unacked, int(uid), after, limit))

    async def stored_since(
        self, uids: Sequence[str], after: int
    ) -> dict[str, list[dict[str, Any]]]:
        """Each user's unacked messages in storage above ``after`` (one read for all)."""
        numbered = [int(uid) for uid in uids if uid.isdigit()]  # storage's users are numbers
        found: dict[str, list[dict[str, Any]]] = {}
        for r in await self.in_thread(self.store.unacked_of, numbered, after):
            found.setdefault(str(r.uid), []).append(
                stored_message(r.id, r.kind, r.from_uid, r.uid, r.body, r.ts)
            )
        return found

    async def feed(
        self, uid: str, before: int, after: int, kind: str | None, limit: int
    ) -> list[dict[str, Any]]:
        rows = await self.in_thread(self.store.feed, int(uid), before, after, kind, limit)
        return _messages(rows)

    async def feed_broadcasts(
        self, groups: Sequence[str], before: int, after: int, kind: str | None, limit: int
    ) -> list[dict[str, Any]]:
        rows = await self.in_thread(self.store.feed_broadcasts, groups, before, after, kind, limit)
        return _broadcasts(rows)

    async def messages_by_ids(self, uid: str, ids: Sequence[int]) -> list[dict[str, Any]]:
        return _messages(await self.in_thread(self.store.messages_by_ids, int(uid), ids))

    async def broadcasts_by_ids(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        return _broadcasts(await self.in_thread(self.store.broadcasts_by_ids, ids))

    async def find_message(self, message_id: int) -> tuple[dict[str, Any], bool] | None:
        found = await self.in_thread(self.store.find_message, message_id)
        return None if found is None else (_messages([found[0]])[0], found[1])

    async def find_broadcast(self, broadcast_id: int) -> tuple[dict[str, Any], bool] | None:
        found = await self.in_thread(self.store.find_broadcast, broadcast_id)
        return None if found is None else (_broadcasts([found[0]])[0], found[1])

    async def read_state(self, uid: str, since_ms: int) -> ReadRows:
        return await self.in_thread(self.store.read_state, int(uid), since_ms)

    async def cs_session(self, session_id: int) -> dict[str, Any] | None:
        row = await self.in_thread(self.store.cs_session, session_id)
        if row is None:
            return None
        return {"user": str(row.uid), "agent": None if row.agent is None else str(row.agent)}

    async def cs_messages(self, session_id: int, before: int, limit: int) -> list[dict[str, Any]]:
        return _cs(await self.in_thread(self.store.cs_messages, session_id, before, limit))

    async def cs_messages_between(
        self, user: str, agent: str, before: int, limit: int
    ) -> list[dict[str, Any]]:
        rows = await self.in_thread(
            self.store.cs_messages_between, int(user), int(agent), before, limit
        )
        return _cs(rows)


def _cs(rows: Sequence[StoredCsMessage]) -> list[dict[str, Any]]:
    return [stored_message(r.id, Kind.CS.value, r.from_uid, r.to_uid, r.body, r.ts) for r in rows]


def _messages(rows: Sequence[StoredMessage]) -> list[dict[str, Any]]:
    return [stored_message(r.id, r.kind, r.from_uid, r.uid, r.body, r.ts) for r in rows]


def _broadcasts(rows: Sequence[StoredBroadcast]) -> list[dict[str, Any]]:
    return [
        Message(r.id, r.kind, None, None, orjson.loads(r.body), r.ts, r.group).wire() for r in rows
    ]
