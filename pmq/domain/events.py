"""Events to the site, as the socket workers make them (docs/webhooks.md): each one queued in
its user's bucket's outbox in Redis (``keys.hook_outbox``), which the task workers send
(pmq.tasks.webhooks).

- ``user.online``: a connection registered (pmq.reactor.registration) runs one script that
  cancels a user.offline due and, if the site was not told the user is online, queues it.
- ``user.offline``: closed connections, once removed from the registry
  (pmq.domain.routing.Routes), schedule a user.offline ``webhooks.offline_grace`` later for
  users left with none; the task workers send it if the user is still away then.
- ``message.undelivered``: each accepted unicast message gets a timer
  (``keys.hook_undelivered``) sent with its publish; the task workers queue the event for
  those still in their user's inbox when it falls due. An ack needs no step of its own.
- ``message.acked``, ``message.read``, ``cs.assigned``, ``cs.closed``: queued by the script
  that makes the change they tell of (the ack's, the read's, the chat's), given the outbox
  and the event's id and time (:meth:`Events.queued_by`); the cs.* events wait in the chat's
  own outbox (``keys.hook_chat_outbox``), in the chat's slot.

With ``webhooks.url`` unset, or for a type ``webhooks.events`` leaves out, nothing here
touches Redis: publishing, connecting and acking cost what they cost without webhooks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import Any

from pmq.config import WebhooksConfig
from pmq.redis import scripts
from pmq.redis.batching import Batcher
from pmq.redis.keys import Keys
from pmq.wire import events
from pmq.wire.events import EventType


class Events:
    """One socket worker's producer of events; ``batch`` None (or no ``settings.url``):
    off."""

    def __init__(self, batch: Batcher | None, keys: Keys, settings: WebhooksConfig) -> None:
        self.batch = batch
        self.keys = keys
        on = batch is not None and bool(settings.url)
        self.types = frozenset(EventType(t) for t in settings.events) if on else frozenset()
        self.presence = bool(self.types & {EventType.ONLINE, EventType.OFFLINE})
        self.grace_ms = int(settings.offline_grace * 1000)
        self.undelivered_ms = int(settings.undelivered_after * 1000)
        if batch is not None and self.presence:
            redis = batch.redis
            self._online = scripts.register(redis, "hooks_online")
            self._left = scripts.register(redis, "hooks_left")

    def _event(self, kind: EventType, data: dict[str, Any]) -> bytes:
        return events.encode(kind, data) if kind in self.types else b""

    def queued_by(self, kind: EventType, outbox: str) -> tuple[list[str], list[Any]]:
        """The extra key and arguments of a script that queues a ``kind`` event itself in
        ``outbox``: ([outbox], [event id, now in unix ms]); ([], []) when the site does not
        take ``kind``, and the script then writes nothing for it."""
        if kind not in self.types:
            return [], []
        return [outbox], [events.new_id(), int(time.time() * 1000)]

    async def online(self, uid: str) -> None:
        """A connection of ``uid`` registered: user.online if the site thought them away."""
        if self.presence:
            assert self.batch is not None
            bucket = self.keys.bucket(uid)
            keys = [
                self.keys.hook_online(bucket),
                self.keys.hook_leaving(bucket),
                self.keys.hook_outbox(bucket),
            ]
            event = self._event(EventType.ONLINE, {"uid": uid})
            await self.batch.script(self._online, keys, [uid, event])

    async def online_again(self, uids: Iterable[str], chunk: int = 1000) -> None:
        """Connections of ``uids`` were written to the registry again (Redis lost them):
        the users are online for the site again if Redis lost that too, so that their
        user.offline comes when they leave."""
        if self.presence:
            users = list(dict.fromkeys(uids))
            for start in range(0, len(users), chunk):
                await asyncio.gather(*(self.online(uid) for uid in users[start : start + chunk]))

    async def left(self, uids: Iterable[str]) -> None:
        """Connections of ``uids`` left the registry: those with none left get a user.offline
        due in ``webhooks.offline_grace`` (sent if they are still away then)."""
        if not self.presence:
            return
        assert self.batch is not None
        users = list(dict.fromkeys(uids))
        due = int(time.time() * 1000) + self.grace_ms
        for bucket, indexes in self.keys.by_bucket(users).items():
            part = [users[i] for i in indexes]
            keys = [self.keys.hook_online(bucket), self.keys.hook_leaving(bucket)]
            keys += [self.keys.user_conns(uid) for uid in part]
            await self.batch.script(self._left, keys, [due, *part])

    def timers(
        self, bucket: int, messages: Sequence[tuple[str, int, str]]
    ) -> asyncio.Future[Any] | None:
        """Set the message.undelivered timers of ``messages`` (uid, id, kind) of one bucket:
        sent with the next loop iteration's commands, while the caller sends its publish;
        await the future before answering. None when the site takes no
        message.undelivered."""
        if EventType.UNDELIVERED not in self.types or not messages:
            return None
        assert self.batch is not None
        due = int(time.time() * 1000) + self.undelivered_ms
        members: list[Any] = []
        for uid, message_id, kind in messages:
            members += [due, f"{uid} {message_id} {kind}"]
        setting = asyncio.ensure_future(
            self.batch.call("ZADD", self.keys.hook_undelivered(bucket), *members)
        )
        setting.add_done_callback(retrieved)  # a publish that failed never awaits it
        return setting


def retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a future's error seen (its caller may have failed before awaiting it)."""
    if not future.cancelled():
        future.exception()


def timer_fields(member: bytes | str) -> tuple[str, str, str]:
    """A timer of ``keys.hook_undelivered`` as (uid, message id, kind)."""
    text = member.decode() if isinstance(member, bytes) else member
    uid, message_id, kind = text.split(" ")
    return uid, message_id, kind


NO_EVENTS = Events(None, Keys(), WebhooksConfig())
