"""This worker's end of the relay: its channels read, decoded and delivered to its sockets.

Other workers reach the connections held here through two channels (pmq.wire.relay): the
worker's own sharded channel, one relay message per user (pmq.domain.routing.Routes publishes
them), and the broadcast channel every socket worker reads (pmq.reactor.fanout queues its
broadcasts). :class:`Relay` turns a relay op into what it does to the connection table, the
unread pusher and the fan-out; what this worker's own publishes hold for its own
connections never leaves the process: Routes hands them to :meth:`Relay.deliver` as values,
with nothing encoded.

:class:`Channels` subscribes both channels, each under a :class:`pmq.reactor.catchup.Gap`
that catches up on what a broken subscription missed, and reads them in supervised loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pmq import metrics
from pmq.reactor.catchup import CatchUp, Gap
from pmq.reactor.connections import ConnectionTable
from pmq.reactor.fanout import Fanout
from pmq.reactor.unread import UnreadPusher
from pmq.redis import conn as redisconn
from pmq.redis.keys import Keys
from pmq.wire import relay
from pmq.wire.client import message_id_of
from pmq.wire.relay import Op, UnknownOp, UnreadState

log = logging.getLogger(__name__)
# The relay's ops bound once: Op.X, looked up on the enum class, costs about 100 ns a time,
# and a relayed message's path compares several.
PUSH, MESSAGE, AGAIN, UNREAD = Op.PUSH, Op.MESSAGE, Op.AGAIN, Op.UNREAD
KICK, EVICT = Op.KICK, Op.EVICT
DELIVERY_SECONDS = metrics.buffered(metrics.DELIVERY_SECONDS)

# The relay's pause between two subscriptions stays short: what is published on a channel
# while nobody reads it reaches its users only through the catch-up after (pmq.reactor.catchup).
RETRY_SECONDS = 0.5

Supervise = Callable[..., "asyncio.Task[None]"]  # pmq.workers.base.Worker.supervise


class Relay:
    """Relay ops applied to this worker's connections."""

    def __init__(self, table: ConnectionTable, unread: UnreadPusher) -> None:
        self.table = table
        self.unread = unread

    def deliver(
        self, op: Op, uid: str, payload: bytes, sent: float, state: UnreadState | None = None
    ) -> int:
        """Apply ``op`` for ``uid`` to the connections here; returns how many it reached.
        ``sent`` is the unix time the op left its publisher. In process an
        :data:`Op.MESSAGE` comes apart: ``payload`` is the push frame and ``state`` the
        unread state the publish read (pmq.domain.routing.Here)."""
        if op is MESSAGE:
            pushed = self.unread.push_message(uid, payload, state)
        elif op is PUSH:
            pushed = self.table.send_to_user(uid, payload)
        else:
            return self._apply(op, uid, payload)
        if pushed:
            DELIVERY_SECONDS.observe(max(0.0, time.time() - sent))
        return pushed

    def _apply(self, op: Op, uid: str, payload: bytes) -> int:
        if op is UNREAD:
            self.unread.changed(uid)
            return 0
        if op is AGAIN:
            return self.table.push_again(uid, payload)
        if op is KICK:
            return self.table.kick_user(uid, payload.decode())
        if op is EVICT:
            return self.table.evict(uid, payload.decode().split())
        log.warning("relay op %s for uid %s not applied here", op, uid)
        return 0

    def on_message(self, message: dict[str, Any]) -> None:
        """pub/sub callback for this worker's channel: decode, then deliver(). A message
        this version cannot read (anything can publish on the channel) is logged and
        dropped here, so that delivery never meets it."""
        state = None
        try:
            op, uid, sent, payload = relay.decode(message["data"])
            if op is MESSAGE:
                payload, state = relay.decode_message(payload)
            # Read now what delivery reads: the text of a kick's reason or an evict's ids,
            # the message id of a push frame.
            if op is KICK or op is EVICT:
                payload.decode()
            else:
                message_id_of(payload)
        except UnknownOp as exc:  # a newer node's: nothing here knows what it asks
            log.warning("unknown relay op %r for uid %s", exc.op, exc.uid)
            return
        except (KeyError, ValueError, UnicodeDecodeError):
            log.warning("dropped a malformed relay message")
            return
        self.deliver(op, uid, payload, sent, state)


class Channels:
    """The worker's channel and the broadcast channel, subscribed and read.

    :meth:`start` subscribes both and starts their read loops under ``supervise``;
    :meth:`stop` ends the loops and the catch-ups (nothing delivers after it);
    :meth:`close` closes the subscriptions' connections."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        worker_id: str,
        relay: Relay,
        fanout: Fanout,
        catch_up: CatchUp,
    ) -> None:
        self.unicast_gap = Gap(relay.on_message, catch_up.unicast)
        self.gaps = [self.unicast_gap, Gap(fanout.on_message, catch_up.broadcasts)]
        self.subscriptions = [
            redisconn.subscribe(redis, keys.worker_channel(worker_id), self.gaps[0].listen),
            redisconn.subscribe(redis, keys.broadcast_channel(), self.gaps[1].listen),
        ]
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, supervise: Supervise) -> None:
        for subscription, gap in zip(self.subscriptions, self.gaps, strict=True):
            await subscription.start()
            read = functools.partial(self.read, subscription, gap)
            self.tasks.append(supervise("relay", read, cap=RETRY_SECONDS))

    def missed_since(self, wall_time: float) -> None:
        """Unicasts published since ``wall_time`` may have missed this worker's users
        (Redis lost or expired their route entries): catch up on them."""
        self.unicast_gap.missed_since(wall_time)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for gap in self.gaps:
            await gap.close()

    async def close(self) -> None:
        for subscription in self.subscriptions:
            await subscription.close()

    @staticmethod
    async def read(subscription: redisconn.Subscription, gap: Gap) -> None:
        """Dispatch one channel's messages (relayed frames, or broadcasts) as they come.

        The subscription handles buffered messages back to back, a bounded number between
        two yields to the loop. When its connection fails this subscribes again on a fresh
        one (or leaves that to the next failure) and raises, for the supervisor to start the
        read again after a pause: one Redis outage must not end the relay for good. What
        was published meanwhile is caught up on once subscribed again (``gap``)."""
        try:
            while True:
                await subscription.dispatch()
                await asyncio.sleep(0)
        except (RedisError, OSError):
            gap.opened()
            with contextlib.suppress(RedisError, OSError):
                await subscription.recover()
                gap.closed()
            raise
