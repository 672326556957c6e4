"""Publishing a unicast message: accept it into the inbox, then push it to whoever is online.

Used by the ingest API and by handlers that send messages of their own (chat).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

from redis.exceptions import RedisError

from pmq import metrics
from pmq.domain.inbox import Accepted, Inbox
from pmq.domain.routing import Routes
from pmq.wire.client import push_frame

log = logging.getLogger(__name__)

@functools.cache
def counters(kind: str) -> tuple[Any, Any]:
    """The accepted and delivered counters of ``kind``, buffered (labels() takes a lock)."""
    return (
        metrics.buffered(metrics.MESSAGES_ACCEPTED.labels(kind)),
        metrics.buffered(metrics.MESSAGES_DELIVERED.labels(kind)),
    )


async def publish(
    inbox: Inbox,
    routes: Routes,
    recipients: Sequence[str],
    kind: str,
    sender: str | None,
    body: Any,
    dedupe_key: str | None = None,
) -> tuple[Accepted, int]:
    """Accept one message per recipient and push each to its user's live connections.

    Returns what was accepted and how many connections it reached now. Once this returns,
    the messages are durable in Redis and queued for storage. A push that fails once the
    messages are accepted (Redis lost between the two) is not sent again, which could push
    twice, nor raised, which would make the site send the message again: it counts as
    reaching no one, and the inbox keeps the messages for the next connect or msg.pull.
    """
    accepted = await inbox.publish(recipients, kind, sender, body, dedupe_key)
    return accepted, await push(routes, accepted, kind)


async def push(routes: Routes, accepted: Accepted, kind: str) -> int:
    """Push what the inbox accepted (:meth:`pmq.domain.inbox.Inbox.publish` or ``accept``) of
    ``kind`` to the recipients' live connections, as :func:`publish` does; returns how many
    connections it reached."""
    if accepted.repeated:  # rare: no coroutine for push_again() on every request
        await push_again(routes, accepted)
    if accepted.duplicate:
        return 0
    accepted_count, delivered_count = counters(kind)
    accepted_count.inc(len(accepted.recipients))
    # A comment on one's own content counts nothing: its state is None, no badge to push.
    pushes = [
        (to, conns, push_frame(wire), state)
        for to, conns, wire, state in zip(
            accepted.recipients,
            accepted.connections,
            accepted.encoded,
            accepted.unread,
            strict=True,
        )
    ]
    try:
        reached = await routes.push_messages(pushes)
    except (RedisError, OSError) as exc:
        log.warning("%d messages accepted, their live push failed: %s", len(pushes), exc)
        reached = 0
    delivered_count.inc(reached)
    return reached


async def push_again(routes: Routes, accepted: Accepted) -> None:
    """Push a repeated request's messages still unacked (``accepted.repeated``, not empty:
    push() checks) to their users' connections that have not had them: the first request's
    publisher may have died after its script ran and before its push (with
    redis.durability = "aof" it waits for WAITAOF in between), and the site, given no
    answer, sends the request again. Those that had them drop them
    (pmq.reactor.connections.ConnectionTable.push_again)."""
    pushes = [(to, conns, push_frame(wire)) for to, wire, conns in accepted.repeated]
    try:
        await routes.push_again(pushes)
    except (RedisError, OSError) as exc:  # they wait in the inbox for the next connect
        log.warning("%d repeated messages not pushed again: %s", len(pushes), exc)
