"""Events queued in the same step as the change they tell of (docs/webhooks.md, "Order,
duplicates, faults"), on a real Redis with 8 buckets: the ack's, the read's and the chat's
scripts queue message.acked, message.read, cs.assigned and cs.closed themselves, in their
keys' slot, so a socket worker killed after the change cannot lose the event; a type the
site does not take writes nothing."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import orjson
import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from pmq import backoff
from pmq.config import CsConfig, WebhooksConfig
from pmq.domain.chat import Chat
from pmq.domain.events import Events
from pmq.domain.ids import IdGenerator
from pmq.domain.inbox import Inbox
from pmq.domain.reads import Reads
from pmq.domain.routing import Routes
from pmq.redis.batching import Batcher
from pmq.redis.keys import Keys
from pmq.store.rows import ReadRows
from pmq.tasks.webhooks import RETRY_BASE, DeliveryError, Poster, WebhookSender
from pmq.wire import events
from pmq.wire.events import EventType
from tests.helpers import REDIS_URL
from tests.test_redis_cluster import Recording

SITE = WebhooksConfig(url="http://127.0.0.1:9/events", secret="s" * 40)


async def nothing_stored(uid: str, since_ms: int) -> ReadRows:
    return ReadRows(int(uid), [], {})


class RecordingBatcher(Batcher):
    """A Batcher that adds the keys of each script it calls alone (an ack's) to the
    recording client's: those go on its own connection, which the client does not see."""

    def __init__(self, client: Recording) -> None:
        super().__init__(client)
        self.client = client

    async def script(
        self, script: Any, keys: list[Any], args: list[Any], confirmed: bool = True
    ) -> Any:
        self.client.record(("EVALSHA", script.sha, len(keys), *keys))
        return await super().script(script, keys, args, confirmed)


class Steps:
    """An inbox, read state and chat on one recording client, sending events as ``site``."""

    def __init__(self, client: Recording, keys: Keys, site: WebhooksConfig) -> None:
        self.client, self.keys = client, keys
        client.scripts = []
        self.events = Events(Batcher(client), keys, site)
        self.routes = Routes(client, keys, "w1", 1.0, events=self.events)
        self.inbox = Inbox(
            client, keys, IdGenerator(3), 86400, 3600, RecordingBatcher(client), events=self.events
        )
        self.reads = Reads(client, keys, 3600, nothing_stored)
        self.chat = Chat(client, keys, self.routes, self.inbox, CsConfig, 3600)

    async def queued(self, outbox: str, kind: EventType) -> list[dict[str, Any]]:
        """The data of the ``kind`` events waiting in ``outbox``, in order."""
        found = [orjson.loads(raw) for raw in await self.client.lrange(outbox, 0, -1)]
        return [e["data"] for e in found if e["type"] == kind]

    async def first_script(self, step: Any) -> list[str]:
        """The keys of the first script call ``step`` makes, the change (all in one slot)."""
        self.client.scripts = []
        await step
        called = self.client.scripts[0]
        assert len({key_slot(k.encode()) for k in called}) == 1, called
        return called

    async def read(self, uid: str, ids: list[str]) -> list[str]:
        outbox = self.keys.hook_outbox(self.keys.bucket(uid))
        items = [{"id": i, "kind": "notice"} for i in ids]
        return await self.reads.mark_read(
            uid, items, {}, lambda: self.events.queued_by(EventType.READ, outbox)
        )


def test_each_event_is_queued_by_the_script_of_its_change(redis_prefix: str) -> None:
    keys = Keys(redis_prefix, 8)
    outbox, chat_outbox = keys.hook_outbox(keys.bucket("101")), keys.hook_chat_outbox()

    async def scenario() -> None:
        client = cast(Recording, Recording.from_url(REDIS_URL))
        try:
            steps = Steps(client, keys, SITE)
            first, second = [
                (await steps.inbox.publish(["101"], "notice", None, {"n": n})).ids[0]
                for n in (1, 2)
            ]
            called = await steps.first_script(steps.inbox.ack("101", [int(first), int(first)]))
            assert keys.inbox("101") in called and outbox in called
            assert await steps.queued(outbox, EventType.ACKED) == [{"uid": "101", "ids": [first]}]

            # message.read lists only the ids that turned read; the reply counts them.
            await client.hset(keys.redis_mark(keys.bucket("101")), "epoch", "1")  # complete
            await steps.reads.view("101")  # loaded: one script call per read below
            called = await steps.first_script(steps.read("101", [first]))
            assert keys.reads("101") in called and outbox in called
            assert await steps.read("101", [first, second]) == [second]
            assert await steps.read("101", [first, second]) == []
            assert await steps.queued(outbox, EventType.READ) == [
                {"uid": "101", "ids": [first]}, {"uid": "101", "ids": [second]}
            ]

            # The chat's: a queued session drained, one assigned at once, one closed.
            queued = (await steps.chat.open("102"))["session_id"]
            await steps.routes.register("900", "c900")
            await steps.chat.agent_online("900")  # drains 102's session to 900
            called = await steps.first_script(steps.chat.open("101"))
            assert chat_outbox in called
            sid = (await steps.chat.open("101"))["session_id"]  # the same session again
            called = await steps.first_script(steps.chat.close(sid, "101"))
            assert chat_outbox in called
            assert await steps.queued(chat_outbox, EventType.CS_ASSIGNED) == [
                {"session_id": queued, "user": "102", "agent": "900"},
                {"session_id": sid, "user": "101", "agent": "900"},
            ]
            assert await steps.queued(chat_outbox, EventType.CS_CLOSED) == [
                {"session_id": sid, "user": "101", "agent": "900"}
            ]
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_types_the_site_does_not_take_write_nothing(redis_prefix: str) -> None:
    keys = Keys(redis_prefix, 8)
    presence_only = WebhooksConfig(url=SITE.url, secret=SITE.secret, events=["user.online"])

    async def scenario() -> None:
        client = cast(Recording, Recording.from_url(REDIS_URL))
        try:
            for site in (WebhooksConfig(), presence_only):
                steps = Steps(client, keys, site)
                sent = (await steps.inbox.publish(["101"], "notice", None, {})).ids[0]
                called = await steps.first_script(steps.inbox.ack("101", [int(sent)]))
                await client.hset(keys.redis_mark(keys.bucket("101")), "epoch", "1")
                await steps.reads.view("101")
                called += await steps.first_script(steps.read("101", [sent]))
                await steps.routes.register("900", "c900")
                await steps.chat.agent_online("900")
                sid = (await steps.chat.open("101"))["session_id"]
                await steps.chat.close(sid, "101")
                outboxes = [keys.hook_outbox(b) for b in range(8)] + [keys.hook_chat_outbox()]
                assert not set(called) & set(outboxes)
                kinds = {
                    orjson.loads(raw)["type"]
                    for key in outboxes
                    for raw in await client.lrange(key, 0, -1)
                }
                assert kinds <= {"user.online"}
        finally:
            await client.aclose()

    asyncio.run(scenario())


class Refusing:
    """A site that takes no POST."""

    def __init__(self) -> None:
        self.posts = 0

    async def post(self, payload: bytes) -> None:
        self.posts += 1
        raise DeliveryError("refused")


class TopOfWindow:
    """A random source whose every draw is the top of its range."""

    def uniform(self, low: float, high: float) -> float:
        return high


def test_a_failing_site_is_tried_again_after_the_back_off_of_its_failures(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each failed POST in a row doubles the window of the pause before the next (full
    jitter, pmq.backoff: the draws pinned to the top of the window here), from RETRY_BASE
    up to webhooks.max_backoff; meanwhile nothing is posted and the head waits."""
    monkeypatch.setattr(backoff, "_RANDOM", TopOfWindow())
    keys = Keys(redis_prefix)
    site = WebhooksConfig(url=SITE.url, secret=SITE.secret, max_backoff=3.0)

    async def scenario() -> None:
        client = aioredis.Redis.from_url(REDIS_URL)
        refusing = Refusing()
        sender = WebhookSender(client, keys, site, "t:0", 25.0, cast(Poster, refusing))
        await client.rpush(keys.hook_outbox(0), events.encode(EventType.ONLINE, {"uid": "7"}))
        assert await sender.leases[0].hold(client)
        for failures, window in enumerate([RETRY_BASE, 2 * RETRY_BASE, 4 * RETRY_BASE, 3.0]):
            before = time.monotonic()
            assert not await sender.send(0)
            after = time.monotonic()
            failing = sender.failing[0]
            assert failing.failures == failures + 1
            assert before + window <= failing.next_try <= after + window
            assert not await sender.send(0)  # backing off: not posted again
            assert refusing.posts == failures + 1
            failing.next_try = 0.0  # the pause is over
        assert await client.llen(keys.hook_outbox(0)) == 1  # the head waits
        await client.aclose()

    asyncio.run(scenario())
