"""Reading the customer-service chat back: a session, its history, an agent's sessions.

:class:`ChatReads` reads what pmq.domain.chat keeps in Redis (a session's hash, its newest messages
in ``cs.history``) and, beyond what Redis still holds, the SQL tables through an
:class:`Archive`. Nothing here changes a session.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import orjson
import redis.asyncio as aioredis

from pmq.domain.ids import timestamp_ms
from pmq.errors import ActionError, StorageError
from pmq.redis.keys import Keys
from pmq.wire.client import Code


class Archive(Protocol):
    """Reads the chat's SQL tables (off the event loop); ids are decimal strings."""

    async def cs_session(self, session_id: int) -> dict[str, Any] | None:
        """A stored session as {"user", "agent"}, or None."""
        ...

    async def cs_messages(self, session_id: int, before: int, limit: int) -> list[dict[str, Any]]:
        """The session's stored messages with id < ``before`` (0 = no bound), newest first."""
        ...

    async def cs_messages_between(
        self, user: str, agent: str, before: int, limit: int
    ) -> list[dict[str, Any]]:
        """The stored messages of the closed sessions between ``user`` and ``agent`` with
        id < ``before`` (0 = no bound), newest first."""
        ...


def refused(code: int, what: str) -> ActionError:
    """The ActionError for a chat script's refusal ``code`` (404, 403, 409) of session
    ``what``."""
    messages = {
        404: f"session_id: no such session {what}",
        403: "session_id: not a party to this session",
        409: f"session_id: session {what} is closed",
    }
    return ActionError(code, messages.get(code, f"session_id: refused ({code})"))


class ChatReads:
    """Sessions and history of the chat; ``archive`` reads the SQL tables (None: Redis only)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, archive: Archive | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.archive = archive

    async def describe(self, session_id: str) -> dict[str, Any] | None:
        """{"session_id", "user", "agent" (None while queued), "status"} of a session, from
        Redis or else the archive (then "closed"); None when unknown."""
        found = cast(
            list[bytes | None],
            await self.redis.hmget(self.keys.cs_session(session_id), ["user", "agent", "status"]),
        )
        user, agent, status = (v.decode() if v is not None else None for v in found)
        if user is None and self.archive is not None:
            row = await self.archive.cs_session(int(session_id))
            if row is not None:
                user, agent, status = str(row["user"]), row["agent"], "closed"
        if user is None:
            return None
        return {"session_id": session_id, "user": user, "agent": agent or None, "status": status}

    async def history(
        self, caller: str, session_id: str, before: int, limit: int
    ) -> dict[str, Any]:
        """{"messages": the session's messages with id < ``before`` (0 = newest), newest
        first, at most ``limit`` (Redis's, then the archive's beyond them), "session":
        :meth:`describe`}. 404/403 as for send."""
        session = await self.describe(session_id)
        if session is None:
            raise refused(Code.NOT_FOUND, session_id)
        if caller not in (session["user"], session["agent"]):
            raise refused(Code.FORBIDDEN, session_id)
        return {"messages": await self._messages(session_id, before, limit), "session": session}

    async def history_with(
        self, user: str, agent: str, before: int, limit: int
    ) -> list[dict[str, Any]]:
        """The messages of every session between ``user`` and ``agent``, newest first
        (sessions of one user never overlap, so their ids never interleave): those Redis
        keeps, then, below them, those of the sessions storage has (all of them, after
        Redis lost its data)."""
        key = self.keys.cs_user_sessions(user)
        sids = [s.decode() for s in cast(list[bytes], await self.redis.zrevrange(key, 0, -1))]
        pipe = self.redis.pipeline(transaction=False)
        for sid in sids:
            pipe.hget(self.keys.cs_session(sid), "agent")
        agents = await pipe.execute()
        found: list[dict[str, Any]] = []
        for sid, who in zip(sids, agents, strict=True):
            if who is None or who.decode() != agent:
                continue
            found += await self._messages(sid, before, limit - len(found))
            if len(found) >= limit:
                return found
        if self.archive is not None:
            seen = {m["id"] for m in found}
            floor = min((int(i) for i in seen), default=before)
            try:
                older = await self.archive.cs_messages_between(
                    user, agent, floor, limit - len(found)
                )
            except StorageError:  # storage away: what Redis keeps is still an answer
                if not found:
                    raise
                return found
            found += [m for m in older if m["id"] not in seen]
        return found

    async def _messages(self, session_id: str, before: int, limit: int) -> list[dict[str, Any]]:
        high: int | str = timestamp_ms(before) if before else "+inf"
        key = self.keys.cs_history(session_id)
        # A few more than asked: ids of the same millisecond as ``before`` share its score.
        members = cast(
            list[bytes], await self.redis.zrevrangebyscore(key, high, "-inf", 0, limit + 32)
        )
        wanted = sorted((i for i in map(int, members) if not before or i < before), reverse=True)
        found: list[dict[str, Any]] = []
        if wanted[:limit]:
            raw = await self.redis.hmget(
                self.keys.cs_bodies(session_id), [str(i) for i in wanted[:limit]]
            )
            found = [orjson.loads(b) for b in raw if b is not None]
        if len(found) < limit and self.archive is not None and await self._trimmed(session_id):
            floor = int(found[-1]["id"]) if found else before
            found += await self.archive.cs_messages(int(session_id), floor, limit - len(found))
        return found

    async def _trimmed(self, session_id: str) -> bool:
        """Whether storage may hold messages of the session that Redis no longer has."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(self.keys.cs_session(session_id), "count")
        pipe.zcard(self.keys.cs_history(session_id))
        count, kept = await pipe.execute()
        return count is None or int(count) > int(kept)

    async def sessions(self, agent: str) -> dict[str, Any]:
        """The agent's open sessions, oldest first, each with its user and last message
        (or None), and how many sessions wait in the queue."""
        key = self.keys.cs_agent_sessions(agent)
        sids = [s.decode() for s in cast(list[bytes], await self.redis.zrange(key, 0, -1))]
        pipe = self.redis.pipeline(transaction=False)
        for sid in sids:
            pipe.hmget(self.keys.cs_session(sid), ["user", "opened", "active", "last", "status"])
        pipe.llen(self.keys.cs_queue())
        *rows, queued = await pipe.execute()
        sessions = [
            {
                "session_id": sid,
                "user": user.decode(),
                "opened": int(opened),
                "active": int(active),
                "last": orjson.loads(last) if last else None,
            }
            for sid, (user, opened, active, last, status) in zip(sids, rows, strict=True)
            if status == b"open"
        ]
        return {"sessions": sessions, "queued": int(queued)}
