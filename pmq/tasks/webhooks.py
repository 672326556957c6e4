"""Events to the site, sent by the task workers (docs/webhooks.md): each bucket's outbox
POSTed in order, and the timers of user.offline and message.undelivered fired.

One task worker of the cluster at a time serves a bucket: it holds the bucket's lease
(``keys.hook_lease``, pmq.redis.locks.Lease.hold, renewed every pass). Serving is:

1. fire the bucket's timers that fell due: user.offline for users still away
   (``hooks_offline``), message.undelivered for messages still unacked
   (``hooks_undelivered``); each script checks and queues the event in one step, so an event
   is never lost between the check and the queue;
2. once a heartbeat interval, look for users the site was told are online whose connections
   are all gone without a departure seen (their node died: its entries expired or were swept)
   and give them a user.offline due (``hooks_left``);
3. POST the head of the outbox (``webhooks.batch`` events at most) to ``webhooks.url``,
   signed (pmq.wire.events), and only once the site answered 2xx remove what was sent
   (``hooks_trim``, which checks that the lease is still ours). A worker killed during the
   POST leaves the events at the head of the outbox; the next holder of the lease sends them
   again. Delivery is at least once, in order per bucket, hence per user.

The chat's events (cs.assigned, cs.closed) are queued by the chat's scripts in the chat's
own outbox (``keys.hook_chat_outbox``, the chat's slot), served the same way under its own
lease: in order among themselves.

A failed POST (no answer within ``webhooks.timeout``, a refused connection, any answer but
2xx) is tried again after an exponential back-off with full jitter (pmq.backoff, its
window from RETRY_BASE seconds up to ``webhooks.max_backoff``); the head of the outbox
waits, so a user's events stay in order. Events older than ``webhooks.retry_seconds`` that
still fail are dropped (counted). Nothing here runs on a socket worker: a slow or failing
site holds back only its own events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any, cast

import httpx
import redis.asyncio as aioredis

from pmq import metrics
from pmq.backoff import Backoff
from pmq.cancel import raise_if_cancelled
from pmq.config import WebhooksConfig
from pmq.domain.events import timer_fields
from pmq.log import Throttled
from pmq.redis import scripts
from pmq.redis.keys import Keys
from pmq.redis.locks import Lease
from pmq.wire import events
from pmq.wire.events import SIGNATURE_HEADER, EventType

log = logging.getLogger(__name__)
FAILING = Throttled(log, every=30.0)

POLL_SECONDS = 0.2  # pause of a pass that found nothing to send
LEASE_SECONDS = 3.0  # a bucket's lease: how soon a dead holder's buckets are served again
RETRY_BASE = 0.5  # seconds: the first window of the retries' back-off (pmq.backoff)
TIMER_PAGE = 500  # timers fired per bucket and pass at most
SCAN_PAGE = 1000  # online users looked at per script call


class DeliveryError(Exception):
    """The site did not take a POST: no answer, or not a 2xx."""


class Poster:
    """POSTs signed bodies to the site's URL (httpx, one pooled client per task worker)."""

    def __init__(self, settings: WebhooksConfig) -> None:
        self.url = settings.url
        self.secret = settings.secret
        self.client = httpx.AsyncClient(timeout=settings.timeout, follow_redirects=False)

    async def post(self, payload: bytes) -> None:
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: events.signature(self.secret, payload),
            "User-Agent": "pmq-webhooks",
        }
        try:
            response = await self.client.post(self.url, content=payload, headers=headers)
        except (httpx.HTTPError, TimeoutError) as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
        if not 200 <= response.status_code < 300:
            raise DeliveryError(f"answered {response.status_code}")

    async def close(self) -> None:
        await self.client.aclose()


@dataclasses.dataclass
class Failing:
    """An outbox's failed POSTs in a row, and when the next may go (monotonic seconds)."""

    failures: int = 0
    next_try: float = 0.0


class WebhookSender:
    """One task worker's part of sending the events; ``owner`` names it in the leases."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        settings: WebhooksConfig,
        owner: str,
        heartbeat_interval: float,
        poster: Poster,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.owner = owner
        self.poster = poster
        self.types = frozenset(EventType(t) for t in settings.events)
        self.reconcile_every = heartbeat_interval
        self.grace_ms = int(settings.offline_grace * 1000)
        # Short, so that when its holder dies another worker serves the bucket within
        # seconds; renewed by every pass, and during a POST (which may take
        # webhooks.timeout) by a task of its own.
        ttl_ms = int(LEASE_SECONDS * 1000)
        # Outbox number n < buckets is bucket n's; number ``buckets``, the last, the chat's.
        self.outboxes = [keys.hook_outbox(b) for b in range(keys.buckets)]
        self.leases = [Lease(keys.hook_lease(b), owner, ttl_ms) for b in range(keys.buckets)]
        self.outboxes.append(keys.hook_chat_outbox())
        self.leases.append(Lease(keys.hook_chat_lease(), owner, ttl_ms))
        self.failing = [Failing() for _ in self.outboxes]
        self.retries = Backoff(RETRY_BASE, settings.max_backoff)
        self.chat = bool(self.types & {EventType.CS_ASSIGNED, EventType.CS_CLOSED})
        self.next_reconcile = [0.0] * keys.buckets
        self._offline = scripts.register(redis, "hooks_offline")
        self._undelivered = scripts.register(redis, "hooks_undelivered")
        self._left = scripts.register(redis, "hooks_left")
        self._trim = scripts.register(redis, "hooks_trim")
        self.delivered = self.failed = self.dropped = 0

    def stats(self) -> dict[str, int]:
        return {"delivered": self.delivered, "failed": self.failed, "dropped": self.dropped}

    async def run(self) -> None:
        """Serve every bucket whose lease this worker holds or can take, forever."""
        while True:
            serving = [self.serve(b) for b in range(self.keys.buckets)]
            busy = await asyncio.gather(*serving, self.serve_chat())
            if not any(busy):
                await asyncio.sleep(POLL_SECONDS)

    async def release(self) -> None:
        """Let go of the leases (a graceful stop): another worker takes over at once."""
        for lease in self.leases:
            await lease.release(self.redis)

    async def serve(self, bucket: int) -> bool:
        """One pass over ``bucket`` if its lease is ours; True when it sent events."""
        if not await self.leases[bucket].hold(self.redis):
            return False
        now = time.time()
        await self.fire_offline(bucket, int(now * 1000))
        await self.fire_undelivered(bucket, int(now * 1000))
        if time.monotonic() >= self.next_reconcile[bucket]:
            self.next_reconcile[bucket] = time.monotonic() + self.reconcile_every
            await self.reconcile(bucket, int(now * 1000) + self.grace_ms)
        return await self.send(bucket)

    async def serve_chat(self) -> bool:
        """One pass over the chat's outbox if its lease is ours; True when it sent events."""
        chat = self.keys.buckets
        if not self.chat or not await self.leases[chat].hold(self.redis):
            return False
        return await self.send(chat)

    # Timers ---------------------------------------------------------------------------
    async def _due(self, timers: str, now_ms: int) -> list[bytes]:
        """The first TIMER_PAGE members of the ZSET ``timers`` due by ``now_ms``."""
        return cast(
            list[bytes],
            await self.redis.zrangebyscore(timers, "-inf", now_ms, start=0, num=TIMER_PAGE),
        )

    async def fire_offline(self, bucket: int, now_ms: int) -> None:
        leaving = self.keys.hook_leaving(bucket)
        due = await self._due(leaving, now_ms)
        if not due:
            return
        uids = [raw.decode() for raw in due]
        keys = [self.keys.hook_online(bucket), leaving, self.keys.hook_outbox(bucket)]
        keys += [self.keys.user_conns(uid) for uid in uids]
        args: list[Any] = [now_ms]
        wanted = EventType.OFFLINE in self.types
        for uid in uids:
            args += [uid, events.encode(EventType.OFFLINE, {"uid": uid}) if wanted else b""]
        await self._offline(keys=keys, args=args)

    async def fire_undelivered(self, bucket: int, now_ms: int) -> None:
        timers = self.keys.hook_undelivered(bucket)
        due = await self._due(timers, now_ms)
        if not due:
            return
        keys = [timers, self.keys.hook_outbox(bucket)]
        args: list[Any] = [now_ms]
        for member in due:
            uid, message_id, kind = timer_fields(member)
            keys.append(self.keys.inbox(uid))
            data = {"uid": uid, "id": message_id, "kind": kind}
            args += [member, message_id, events.encode(EventType.UNDELIVERED, data)]
        await self._undelivered(keys=keys, args=args)

    async def reconcile(self, bucket: int, due_ms: int) -> None:
        """Users the site was told are online but with no connection entry left (their
        node died, or a departure was never seen) get a user.offline due at ``due_ms``."""
        online = self.keys.hook_online(bucket)
        cursor = 0
        while True:
            cursor, found = await self.redis.hscan(online, cursor, count=SCAN_PAGE)
            uids = [raw.decode() for raw in cast(dict[bytes, bytes], found)]
            if uids:
                keys = [online, self.keys.hook_leaving(bucket)]
                keys += [self.keys.user_conns(uid) for uid in uids]
                await self._left(keys=keys, args=[due_ms, *uids])
            if not cursor:
                return

    # Delivery -------------------------------------------------------------------------
    async def send(self, number: int) -> bool:
        """POST the head of outbox ``number`` unless it is backing off; True when the site
        took it."""
        failing = self.failing[number]
        if time.monotonic() < failing.next_try:
            return False
        outbox = self.outboxes[number]
        head = cast(list[bytes], await self.redis.lrange(outbox, 0, self.settings.batch - 1))
        if not head:
            return False
        try:
            await self.post_holding(number, events.body(head))
        except DeliveryError as exc:
            self.failed += 1
            metrics.WEBHOOK_FAILURES.inc()
            pause = self.retries.delay(failing.failures)
            failing.failures += 1
            failing.next_try = time.monotonic() + pause
            FAILING.warning(
                "webhooks: POST of %d events to %s failed (%s); retrying in %.1fs",
                len(head), self.settings.url, exc, pause,
            )
            await self.drop_expired(number, head)
            return False
        failing.failures, failing.next_try = 0, 0.0
        await self._trim(
            keys=[self.leases[number].key, outbox], args=[self.owner, len(head), head[0]]
        )
        self.delivered += len(head)
        metrics.WEBHOOK_EVENTS.labels("delivered").inc(len(head))
        now_ms = time.time() * 1000
        for raw in head:
            metrics.WEBHOOK_SECONDS.observe(max(0.0, now_ms - events.parse(raw)["ts"]) / 1000)
        return True

    async def post_holding(self, number: int, body: bytes) -> None:
        """POST ``body``, renewing the lease of outbox ``number`` meanwhile. A lease lost
        anyway (this worker stalled) lets another worker send the same events again; the
        trim after the POST then finds the lease not ours and removes nothing."""
        lease = self.leases[number]

        async def keep() -> None:
            while await lease.renew(self.redis):
                raise_if_cancelled()  # redis-py may have swallowed the POST's end
                await asyncio.sleep(LEASE_SECONDS / 3)

        keeping = asyncio.create_task(keep())
        try:
            await self.poster.post(body)
        finally:
            keeping.cancel()
            await asyncio.gather(keeping, return_exceptions=True)

    async def drop_expired(self, number: int, head: Sequence[bytes]) -> None:
        """Drop the events at the head of outbox ``number`` older than
        ``webhooks.retry_seconds``."""
        cutoff = (time.time() - self.settings.retry_seconds) * 1000
        old = 0
        for raw in head:
            if events.parse(raw)["ts"] >= cutoff:
                break
            old += 1
        if not old:
            return
        dropped = await self._trim(
            keys=[self.leases[number].key, self.outboxes[number]], args=[self.owner, old, head[0]]
        )
        if dropped:
            self.dropped += old
            metrics.WEBHOOK_EVENTS.labels("dropped").inc(old)
            log.error(
                "webhooks: dropped %d events older than webhooks.retry_seconds (%ds)",
                old, self.settings.retry_seconds,
            )
