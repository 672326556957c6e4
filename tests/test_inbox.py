"""pmq.inbox.Inbox.publish on a real Redis: publishes of one loop iteration share a PUBLISH
call, and each caller still gets exactly its own messages back."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import redis.asyncio as aioredis
import uvloop
from redis.exceptions import ConnectionError as RedisConnectionError

from pmq.ids import IdGenerator
from pmq.inbox import Inbox
from pmq.keys import Keys
from tests.helpers import REDIS_URL

DAY = 86400


def counted_calls(inbox: Inbox) -> list[int]:
    """The number of messages of every PUBLISH call ``inbox`` makes from now on."""
    calls: list[int] = []
    call = inbox._call_publish

    async def counting(bucket: int, messages: list[Any], dedupe_key: str | None) -> Any:
        calls.append(len(messages))
        return await call(bucket, messages, dedupe_key)

    inbox._call_publish = counting  # type: ignore[method-assign]
    return calls


def test_publishes_of_one_iteration_share_a_call_and_each_gets_its_own(redis_prefix: str) -> None:
    keys = Keys(redis_prefix)

    async def scenario() -> tuple[list[Any], list[int], list[Any]]:
        async with aioredis.Redis.from_url(REDIS_URL) as r:
            await r.hset(keys.user_conns("2"), "c2", "w1")  # user 2 is online
            inbox = Inbox(r, keys, IdGenerator(1), DAY, DAY)
            calls = counted_calls(inbox)
            results = await asyncio.gather(
                inbox.publish(["1"], "comment", "9", {"n": 1}),
                inbox.publish(["2", "3"], "letter", "9", {"n": 2}),
                inbox.publish(["4"], "comment", "4", {"n": 3}),  # own comment: counts nothing
            )
            bodies = [await r.hvals(keys.inbox_bodies(uid)) for uid in "1234"]
            inbox.batch.close()
            return list(results), calls, bodies

    (one, two, own), calls, bodies = uvloop.run(scenario())
    assert calls == [4]  # one call for the three publishes
    assert one.recipients == ["1"] and two.recipients == ["2", "3"] and own.recipients == ["4"]
    assert one.connections == [{}] and two.connections == [{"c2": "w1"}, {}]
    assert [orjson.loads(w)["body"] for w in two.encoded] == [{"n": 2}, {"n": 2}]
    assert one.unread[0] is not None and own.unread == [None]
    assert len({*one.ids, *two.ids, *own.ids}) == 4
    stored_to = [[orjson.loads(b)["to"] for b in found] for found in bodies]
    assert stored_to == [["1"], ["2"], ["3"], ["4"]]


def test_a_keyed_publish_goes_alone_and_its_repeat_is_a_duplicate(redis_prefix: str) -> None:
    keys = Keys(redis_prefix)

    async def scenario() -> tuple[list[Any], list[int]]:
        async with aioredis.Redis.from_url(REDIS_URL) as r:
            inbox = Inbox(r, keys, IdGenerator(1), DAY, DAY)
            calls = counted_calls(inbox)
            first = await asyncio.gather(
                inbox.publish(["1"], "notice", None, {"n": 1}, dedupe_key="once"),
                inbox.publish(["1"], "notice", None, {"n": 2}),
            )
            again = await inbox.publish(["1"], "notice", None, {"n": 1}, dedupe_key="once")
            inbox.batch.close()
            return [*first, again], calls

    (keyed, plain, again), calls = uvloop.run(scenario())
    assert sorted(calls) == [1, 1, 1]
    assert not keyed.duplicate and not plain.duplicate
    assert again.duplicate and again.ids == keyed.ids


def test_a_failed_shared_call_fails_every_publish_in_it() -> None:
    async def scenario() -> list[Any]:
        async with aioredis.Redis.from_url("redis://127.0.0.1:1/0") as r:  # nothing there
            inbox = Inbox(r, Keys("pmqtest:"), IdGenerator(1), DAY, DAY)
            return await asyncio.gather(
                *(inbox.publish([str(n)], "comment", "9", {}) for n in range(1, 4)),
                return_exceptions=True,
            )

    assert all(isinstance(r, RedisConnectionError) for r in uvloop.run(scenario()))
