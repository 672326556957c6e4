"""What the socket worker reads from storage: cold inbox messages and the chat's archive.

The SQL store blocks, so every read here goes through the worker's thread pool
(pmq.workers.base.Worker.in_thread), never on the event loop. Rows come back as client
messages (pmq.wire.client.stored_message).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from pmq.store import Store
from pmq.wire.client import Kind, stored_message

T = TypeVar("T")


class InThread(Protocol):
    """The worker's ``in_thread``: ``func(*args)`` on its thread pool."""

    def __call__(self, func: Callable[..., T], *args: Any) -> Awaitable[T]: ...


class StoredReads:
    """Storage reads for replays, catch-ups and chat history (a pmq.domain.chatreads.Archive)."""

    def __init__(self, store: Store, in_thread: InThread) -> None:
        self.store = store
        self.in_thread = in_thread

    async def cold_messages(self, uid: str, after: int, limit: int) -> list[dict[str, Any]]:
        """Unacked messages of ``uid`` in storage above ``after``, ``limit`` at most, in id
        order (a pmq.domain.inbox.ColdReader)."""
        rows = await self.in_thread(self.store.unacked, int(uid), after, limit)
        return [stored_message(r.id, r.kind, r.from_uid, r.uid, r.body, r.ts) for r in rows]

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

    async def cs_session(self, session_id: int) -> dict[str, Any] | None:
        row = await self.in_thread(self.store.cs_session, session_id)
        if row is None:
            return None
        return {"user": str(row.uid), "agent": None if row.agent is None else str(row.agent)}

    async def cs_messages(self, session_id: int, before: int, limit: int) -> list[dict[str, Any]]:
        rows = await self.in_thread(self.store.cs_messages, session_id, before, limit)
        cs = Kind.CS.value
        return [stored_message(r.id, cs, r.from_uid, r.to_uid, r.body, r.ts) for r in rows]
