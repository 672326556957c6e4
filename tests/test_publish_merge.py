"""Publishes without an idempotency key made in one loop iteration go to Redis as one
inbox_publish call (pmq.redis.batching's merge), and each still gets its own ids, its
recipients' connections and unread counters; one with a key goes alone, as its script looks
the key up first."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import redis.asyncio as aioredis
import uvloop

from pmq.domain.ids import IdGenerator
from pmq.domain.inbox import Accepted, Inbox
from pmq.redis.keys import Keys
from pmq.wire.relay import UnreadState
from tests.helpers import REDIS_URL
from tests.test_batching import writes  # noqa: F401  # the fixture

ONLINE, OFFLINE, OTHER = "7", "8", "9"


def publish_together(prefix: str, dedupe_key: str | None = None) -> tuple[list[Accepted], Any]:
    """Four publishes in one iteration: notices to ONLINE (one connection), OFFLINE and
    OTHER together, ONLINE again, and a comment of ONLINE's own to ONLINE (counts
    nothing); the last of them with ``dedupe_key``. Returns what each accepted and the
    storage queue."""

    async def scenario() -> tuple[list[Accepted], Any]:
        client = aioredis.Redis.from_url(REDIS_URL)
        keys = Keys(prefix)
        try:
            await client.hset(keys.user_conns(ONLINE), "c1", "w1")
            inbox = Inbox(client, keys, IdGenerator(1), 86400, 86400)
            await inbox.publish([OTHER], "notice", None, {"warm": 1})  # connected, loaded
            await client.delete(keys.unread(OTHER), keys.store_queue())
            accepted = await asyncio.gather(
                inbox.publish([ONLINE], "notice", None, {"n": 1}),
                inbox.publish([OFFLINE, OTHER], "notice", None, {"n": 2}),
                inbox.publish([ONLINE], "notice", "5", {"n": 3}),
                inbox.publish([ONLINE], "comment", ONLINE, {"n": 4}, dedupe_key),
            )
            queued = await client.lrange(keys.store_queue(), 0, -1)
            return list(accepted), queued
        finally:
            await client.aclose()

    return uvloop.run(scenario())


def test_publishes_of_one_iteration_are_one_call_each_with_its_own_reply(
    redis_prefix: str,
    writes: list[int],  # noqa: F811
) -> None:
    accepted, queued = publish_together(redis_prefix)
    assert writes[-1] == 1  # the four publishes' one call
    one, two, three, own = accepted
    assert [len(a.ids) for a in accepted] == [1, 2, 1, 1]
    assert len({i for a in accepted for i in a.ids}) == 5
    assert two.recipients == [OFFLINE, OTHER] and two.connections == [{}, {}]
    assert two.unread == [None, None]  # offline: no badge to send
    for a in (one, three, own):
        assert a.recipients == [ONLINE] and a.connections == [{"c1": "w1"}]
    # the counters as each message left them: Redis ran them in the order they came
    assert one.unread == [UnreadState([b"notice", b"1"], 0)]
    assert three.unread == [UnreadState([b"notice", b"2"], 0)]
    assert own.unread == [None]  # a comment on one's own content counts nothing
    stored = [orjson.loads(item)["msg"]["id"] for item in queued]
    assert stored == [i for a in accepted for i in a.ids]


def test_a_publish_with_an_idempotency_key_goes_alone(
    redis_prefix: str,
    writes: list[int],  # noqa: F811
) -> None:
    accepted, queued = publish_together(redis_prefix, dedupe_key="k1")
    assert writes[-1] == 2  # the three publishes' call, and the keyed one's
    assert not any(a.duplicate for a in accepted)
    assert len(queued) == 5


def test_a_publish_keeps_the_inbox_for_the_retention_from_now(redis_prefix: str) -> None:
    """A merged call still gives the user's inbox and bodies the retention as their time to
    live, from this publish: a later publish moves it on."""
    retention = 3600

    async def scenario() -> list[int]:
        client = aioredis.Redis.from_url(REDIS_URL)
        keys = Keys(redis_prefix)
        try:
            inbox = Inbox(client, keys, IdGenerator(1), 86400, retention)
            await inbox.publish([OFFLINE], "notice", None, {"n": 1})
            await client.pexpire(keys.inbox(OFFLINE), 5000)  # as if published long ago
            await client.pexpire(keys.inbox_bodies(OFFLINE), 5000)
            await inbox.publish([OFFLINE], "notice", None, {"n": 2})
            return [await client.pttl(k) for k in (keys.inbox(OFFLINE), keys.inbox_bodies(OFFLINE))]
        finally:
            await client.aclose()

    for left in uvloop.run(scenario()):
        assert retention * 1000 - 60_000 < left <= retention * 1000
