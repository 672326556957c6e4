"""Customer-service chat on Redis (docs/protocol.md): agent presence, sessions, assignment.

Agents are users whose token role is "agent". An agent is online while it holds a
connection (the socket worker calls :meth:`Chat.agent_online` / :meth:`Chat.agent_offline`);
its load is the number of its open sessions. Every change of sessions, loads and the queue,
and every message kept, is one Lua script (pmq/redis/scripts/chat_*.lua), so two workers on two
nodes never give one agent more than ``cs.max_sessions_per_agent`` sessions nor one user two
open sessions. All chat keys carry the ``{cs}`` hash tag (one Redis Cluster slot); which
agents hold a connection is read from the registry just before a script that picks an agent.

A session is ``queued`` (no agent yet), ``open`` or ``closed``. Messages go through the
durable inbox (pmq.domain.inbox.Inbox.accept, then pmq.domain.messaging.push; kind
``cs``): ack, offline delivery and unread work as for any message. Each session also keeps
its newest messages in Redis for ``cs.history`` and queues every message and the closed
session for SQL (``pmq_cs_message``, ``pmq_cs_session``), where history outlives Redis;
reading sessions and history back is pmq.domain.chatreads, trimming old history the sweep's
pmq.domain.chattrim.

Events go to every connection of a party: ``cs.assigned`` (``session_id``, ``user`` and, for
the user, ``agent``) and ``cs.closed`` (``session_id``, ``by``, ``reason``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import orjson
import redis.asyncio as aioredis

from pmq.config import CsConfig
from pmq.domain.chatreads import Archive, ChatReads, refused
from pmq.domain.ids import timestamp_ms
from pmq.domain.inbox import Inbox
from pmq.domain.journal import SHARED
from pmq.domain.messaging import push
from pmq.domain.routing import Routes
from pmq.errors import ActionError
from pmq.redis import scripts
from pmq.redis.keys import CHAT_TAG, Keys, key_template
from pmq.redis.locks import Lease
from pmq.wire import storeops
from pmq.wire.client import (
    LATER_RECIPIENT,
    Code,
    FrameType,
    Kind,
    Message,
    around_recipient,
    encode_event,
)
from pmq.wire.events import EventType

HISTORY_MAX = 1000  # newest messages of a session kept in Redis; older ones are in SQL
DRAIN_MAX = 100  # queued sessions assigned per script call
IDLE_BATCH = 200  # idle sessions looked at per sweep
CLOSED = "closed"
IDLE = "idle"


class Chat(ChatReads):
    """One socket worker's chat service. ``settings`` returns the current ``[cs]`` section;
    the reads (describe, history, sessions) are :class:`~pmq.domain.chatreads.ChatReads`'."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        routes: Routes,
        inbox: Inbox,
        settings: Callable[[], CsConfig],
        retention_seconds: int,
        archive: Archive | None = None,
    ) -> None:
        super().__init__(redis, keys, archive)
        self.routes = routes
        self.inbox = inbox
        self.settings = settings
        self.ttl = retention_seconds
        self.templates = orjson.dumps(
            {
                "session": key_template(keys.cs_session),
                "history": key_template(keys.cs_history),
                "bodies": key_template(keys.cs_bodies),
                "user_session": key_template(keys.cs_user_session),
                "user_sessions": key_template(keys.cs_user_sessions),
                "last": key_template(keys.cs_last_agent),
                "agent_sessions": key_template(keys.cs_agent_sessions),
            }
        )
        self.common_keys = [
            keys.cs_online(),
            keys.cs_load(),
            keys.cs_active(),
            keys.cs_queue(),
            keys.store_queue(CHAT_TAG),
            keys.cs_history_index(),
        ]
        self._open = scripts.register(redis, "chat_open")
        self._drain = scripts.register(redis, "chat_drain")
        self._close = scripts.register(redis, "chat_close")
        self._send = scripts.register(redis, "chat_send")

    async def _run(
        self,
        script: Any,
        keys: Sequence[str],
        *args: Any,
        live: Sequence[str] = (),
        hook: EventType | None = None,
    ) -> Any:
        """Call a chat script with its own ``keys`` after the common ones; ``live`` lists
        the online agents with a connection now (only scripts that pick an agent need it);
        ``hook``: the event the script queues for the site, in the chat's outbox, in the
        same step as its change, if the site takes it (pmq.domain.events)."""
        now = int(time.time() * 1000)
        outbox = self.keys.hook_chat_outbox()
        hook_keys, hook_args = self.routes.events.queued_by(hook, outbox) if hook else ([], [])
        args = (self.templates, now, orjson.dumps(list(live)), *args, *hook_args)
        return await script(keys=[*self.common_keys, *keys, *hook_keys], args=args)

    async def _live_agents(self) -> list[str]:
        """The online agents that hold a connection; members whose connections are gone
        (their worker died) leave the online set on first sight."""
        members = sorted(
            m.decode() for m in cast(set[bytes], await self.redis.smembers(self.keys.cs_online()))
        )
        if not members:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for agent in members:
            pipe.exists(self.keys.user_conns(agent))
        present = await pipe.execute()
        live = [a for a, n in zip(members, present, strict=True) if n]
        for agent in set(members) - set(live):
            await self._forget_agent(agent)
        return live

    async def _forget_agent(self, agent: str) -> None:
        """Take the agent out of the online set unless it holds a connection. Checked again
        after the removal: a connection registered meanwhile (its SADD may have come just
        before our SREM) puts the agent back."""
        conns = self.keys.user_conns(agent)
        if await self.redis.exists(conns):
            return
        await self.redis.srem(self.keys.cs_online(), agent)
        if await self.redis.exists(conns):
            await self.redis.sadd(self.keys.cs_online(), agent)

    # Presence -------------------------------------------------------------------------
    async def agent_online(self, agent: str) -> None:
        """Call after the agent's connection is registered: it may take queued sessions."""
        await self.redis.sadd(self.keys.cs_online(), agent)
        await self.drain()

    async def agent_offline(self, agent: str) -> None:
        """Call after a connection of the agent is unregistered; the agent leaves the online
        set with its last connection. Its open sessions stay open (offline delivery)."""
        await self._forget_agent(agent)

    # Sessions -------------------------------------------------------------------------
    async def open(self, user: str) -> dict[str, Any]:
        """The user's open or queued session, else a new one assigned (or queued) at once.

        Returns ``{"session_id", "agent", "queued"}`` plus ``"position"`` (1 = next) when
        queued. A new assigned session is announced to its agent with ``cs.assigned``.
        ActionError 429 when the user opened ``cs.max_opens_per_hour`` new sessions in the
        last hour (each is kept for the retention: the bound keeps a user from filling
        Redis and storage with sessions)."""
        settings = self.settings()
        cap, most = settings.max_sessions_per_agent, settings.max_opens_per_hour
        new_id = str(self.inbox.ids.next())
        seed = random.randrange(2**31)
        live = await self._live_agents()
        keys = [
            self.keys.cs_user_session(user),
            self.keys.cs_user_sessions(user),
            self.keys.cs_last_agent(user),
            self.keys.cs_session(new_id),
        ]
        result = await self._run(
            self._open, keys, cap, seed, user, new_id, self.ttl, most, live=live,
            hook=EventType.CS_ASSIGNED,
        )
        if int(result[0]) == 3:
            raise ActionError(
                Code.RATE_LIMITED, f"cs.open: at most {most} new sessions an hour; try later"
            )
        state, sid, agent = int(result[0]), result[1].decode(), result[2].decode()
        reply: dict[str, Any] = {"session_id": sid, "agent": agent or None, "queued": not agent}
        if not agent:
            reply["position"] = int(result[3])
        if state == 1:
            event = encode_event(FrameType.CS_ASSIGNED, session_id=sid, user=user)
            await self.routes.deliver(agent, event)
        return reply

    async def drain(self) -> int:
        """Assign queued sessions in order while an agent is under the cap; both parties get
        ``cs.assigned``. Returns how many were assigned."""
        cap = self.settings().max_sessions_per_agent
        assigned = 0
        while True:
            if not await self.redis.llen(self.keys.cs_queue()):
                return assigned
            live = await self._live_agents()
            flat = await self._run(
                self._drain, (), cap, random.randrange(2**31), DRAIN_MAX, live=live,
                hook=EventType.CS_ASSIGNED,
            )
            for i in range(0, len(flat), 3):
                sid, user, agent = (v.decode() for v in flat[i : i + 3])
                await self.routes.deliver(
                    agent, encode_event(FrameType.CS_ASSIGNED, session_id=sid, user=user)
                )
                await self.routes.deliver(
                    user,
                    encode_event(FrameType.CS_ASSIGNED, session_id=sid, user=user, agent=agent),
                )
            assigned += len(flat) // 3
            if len(flat) // 3 < DRAIN_MAX:
                return assigned

    async def close(self, session_id: str, by: str) -> None:
        """Close the session for one of its parties (ActionError 404/403/409 otherwise);
        both get ``cs.closed``, and the agent's freed place goes to the queue."""
        await self._close_one(session_id, by, CLOSED, None)

    async def _close_one(self, session_id: str, by: str, reason: str, cutoff: int | None) -> bool:
        """Close and notify; False when the idle closer (``cutoff`` set) found the session
        active again or closed by someone else; ActionError when a party's close is refused."""
        op = storeops.encode_cs_session(session_id, reason)  # the script fills in the rest
        result = await self._run(
            self._close,
            [self.keys.cs_session(session_id)],
            session_id,
            by,
            reason,
            "" if cutoff is None else cutoff,
            self.ttl,
            op,
            hook=EventType.CS_CLOSED,
        )
        code = int(result[0])
        if cutoff is not None and code in (304, 404, 409):
            return False  # the idle closer lost a race with activity or another closer
        if code != 200:
            raise refused(code, session_id)
        user, agent = result[1].decode(), result[2].decode()
        event = encode_event(
            FrameType.CS_CLOSED, session_id=session_id, by=by or None, reason=reason
        )
        for party in (user, agent) if agent else (user,):
            await self.routes.deliver(party, event)
        if agent:
            await self.drain()
        return True

    async def close_idle(self) -> int:
        """Close the open sessions without a message for ``cs.idle_seconds`` (reason
        "idle", both parties told). Safe to run anywhere at once: each close is atomic and
        re-checks the session's last activity. Returns how many closed."""
        cutoff = int(time.time() * 1000) - self.settings().idle_seconds * 1000
        idle = cast(
            list[bytes],
            await self.redis.zrangebyscore(self.keys.cs_active(), "-inf", cutoff, 0, IDLE_BATCH),
        )
        closed = 0
        for sid in idle:
            closed += await self._close_one(sid.decode(), "", IDLE, cutoff)
        return closed

    async def run_idle_closer(self, owner: str) -> None:
        """Forever: while this worker holds the cluster's idle lock, close idle sessions and
        assign what waits in the queue. Errors end it (a worker runs it supervised)."""
        while True:
            tick = min(5.0, max(0.2, self.settings().idle_seconds / 4))
            lock = Lease(self.keys.cs_idle_lock(), owner, int(tick * 3000) + 1000)
            if await lock.hold(self.redis):
                await self.close_idle()
                await self.drain()
            await asyncio.sleep(tick)

    # Messages -------------------------------------------------------------------------
    async def send(self, sender: str, session_id: str, content: dict[str, Any]) -> str:
        """Send ``content`` ({"text"} or {"image"}, already checked) to the sender's peer in
        the session as a ``cs`` message; returns its id. ActionError 404/403/409 when the
        session is unknown, the sender no party, or the session not open.

        One chat script checks the sender and keeps the message in the session's history
        and storage queue, atomically: a message is kept only while its session is open, so
        a close names the session's true last message. The inbox then accepts it for the
        peer, in the peer's bucket: another Redis Cluster slot, beyond any chat script."""
        message = Message(
            self.inbox.ids.next(),
            Kind.CS,
            sender,
            LATER_RECIPIENT,  # the peer, known to chat_send
            {"session_id": session_id, **content},
            int(time.time() * 1000),
        )
        wire = message.encode()
        op = storeops.encode_cs_message(session_id, wire)
        keys = [
            self.keys.cs_session(session_id),
            self.keys.cs_history(session_id),
            self.keys.cs_bodies(session_id),
        ]
        args = (session_id, sender, message.id, timestamp_ms(message.id))
        parts = (*around_recipient(wire), *around_recipient(op))
        result = await self._run(self._send, keys, *args, *parts, HISTORY_MAX, self.ttl)
        code = int(result[0])
        if code == 409 and result[1] == b"queued":
            raise ActionError(Code.CONFLICT, "session_id: still waiting for an agent")
        if code != 200:
            raise refused(code, session_id)
        message = message._replace(to=result[1].decode())
        if self.inbox.journal is not None:  # so an emptied Redis loses no history either
            op = storeops.encode_cs_message(session_id, message.encode())
            self.inbox.journal.note(SHARED, self.keys.store_queue(CHAT_TAG), None, op)
        await push(self.routes, await self.inbox.accept([message]), Kind.CS)
        return str(message.id)
