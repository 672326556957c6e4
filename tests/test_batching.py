"""pmq.redis.batching on a real Redis: the commands of one loop iteration share a write (one round
trip), and each caller still gets its own reply or error; a pipeline's commands go in one write
and reply as redis-py's pipeline would."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

import pytest
import redis
import redis.asyncio as aioredis
import uvloop
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from pmq.redis import batching
from pmq.redis import pipe as redispipe
from pmq.redis import resp as respconn
from pmq.redis.batching import Batcher
from tests.helpers import REDIS_URL

INCR_BY = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many commands each write of a RespConnection carried, in order."""
    counts: list[int] = []
    flush = respconn.RespConnection._flush

    def counted(self: Any) -> None:
        counts.append(len(self.outgoing))
        flush(self)

    monkeypatch.setattr(respconn.RespConnection, "_flush", counted)
    return counts


def run(scenario: Any) -> Any:
    async def with_client() -> Any:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            return await scenario(client)
        finally:
            await client.aclose()

    return uvloop.run(with_client())


def test_one_iterations_commands_share_one_write(redis_prefix: str, writes: list[int]) -> None:
    async def scenario(client: Any) -> list[Any]:
        batcher = Batcher(client)
        await batcher.call("PING")  # connected
        writes.clear()
        try:
            return await asyncio.gather(
                *(batcher.call("INCRBY", f"{redis_prefix}n{i % 5}", i) for i in range(50))
            )
        finally:
            batcher.close()

    replies = run(scenario)
    assert writes == [50]
    totals: dict[int, int] = {}  # each caller sees the counter as its own INCRBY left it
    for i, reply in enumerate(replies):
        totals[i % 5] = totals.get(i % 5, 0) + i
        assert reply == totals[i % 5]


def test_an_error_fails_only_its_caller(redis_prefix: str) -> None:
    async def scenario(client: Any) -> list[Any]:
        await client.set(f"{redis_prefix}text", "not a number")
        batcher = Batcher(client)
        return await asyncio.gather(
            batcher.call("INCR", f"{redis_prefix}ok"),
            batcher.call("INCR", f"{redis_prefix}text"),
            batcher.call("INCR", f"{redis_prefix}ok"),
            return_exceptions=True,
        )

    first, failed, third = run(scenario)
    assert (first, third) == (1, 2)
    assert isinstance(failed, ResponseError)


def test_scripts_are_loaded_again_after_redis_lost_them(redis_prefix: str) -> None:
    async def scenario(client: Any) -> list[Any]:
        batcher = Batcher(client)
        script = client.register_script(INCR_BY)
        key = f"{redis_prefix}scripted"
        first = await batcher.script(script, [key], [2])
        await client.script_flush()
        again = await asyncio.gather(*(batcher.script(script, [key], [1]) for _ in range(3)))
        return [first, *again]

    assert run(scenario) == [2, 3, 4, 5]


def test_a_failed_round_trip_reaches_every_caller() -> None:
    async def scenario() -> list[Any]:
        client = aioredis.Redis.from_url("redis://127.0.0.1:1")  # nothing listens there
        try:
            batcher = Batcher(client)
            return await asyncio.gather(
                *(batcher.call("PING") for _ in range(3)), return_exceptions=True
            )
        finally:
            await client.aclose()

    for result in uvloop.run(scenario()):
        assert isinstance(result, Exception)


@pytest.mark.parametrize("calls", [1, 300])
def test_every_caller_gets_a_reply_however_many(redis_prefix: str, calls: int) -> None:
    async def scenario(client: Any) -> list[Any]:
        batcher = Batcher(client)
        return await asyncio.gather(
            *(batcher.call("SET", f"{redis_prefix}k{i}", i) for i in range(calls))
        )

    assert run(scenario) == [b"OK"] * calls


def queue_each_command(pipe: Any, prefix: str) -> None:
    """One of each command a pipeline carries, as the connect's registration queues them."""
    pipe.set(f"{prefix}groups", b'["vip"]', ex=60)
    pipe.hset(f"{prefix}conns", "c1", "w1")
    pipe.expire(f"{prefix}conns", 60)
    pipe.expire(f"{prefix}absent", 60)
    pipe.hgetall(f"{prefix}conns")
    pipe.hgetall(f"{prefix}absent")
    pipe.hexists(f"{prefix}conns", "c1")
    pipe.hexists(f"{prefix}conns", "c2")
    pipe.zrangebyscore(f"{prefix}inbox", "-inf", "+inf", start=0, num=2)
    pipe.zrangebyscore(f"{prefix}inbox", "(1", "+inf")
    pipe.zrevrangebyscore(f"{prefix}inbox", "+inf", 0, 0, 2)
    pipe.get(f"{prefix}groups")
    pipe.get(f"{prefix}absent")
    pipe.hdel(f"{prefix}conns", "c1", "c9")


def test_a_pipeline_s_commands_share_one_write_and_reply_as_redis_py_s(
    redis_prefix: str, writes: list[int]
) -> None:
    """Batcher.pipeline: on one server, the lean pipeline, whose replies (after the same
    commands on the same data) are those of redis-py's pipeline, value and type; an error
    reply raises and leaves the connection in step. On TLS, redis-py's pipeline."""
    async def scenario(client: Any) -> tuple[Any, ...]:
        await client.zadd(f"{redis_prefix}inbox", {"1": 1, "2": 2, "3": 3})
        batcher = Batcher(client)
        try:
            await batcher.call("PING")  # connected
            writes.clear()
            lean = batcher.pipeline()
            queue_each_command(lean, redis_prefix)
            leaned = await lean.execute()
            sent = list(writes)
            reference = client.pipeline(transaction=False)
            queue_each_command(reference, redis_prefix)
            expected = await reference.execute()
            await client.set(f"{redis_prefix}text", "a string")
            failing = batcher.pipeline().get(f"{redis_prefix}text")
            failing.hgetall(f"{redis_prefix}text").get(f"{redis_prefix}groups")
            failed = await asyncio.gather(failing.execute(), return_exceptions=True)
            after = await batcher.pipeline().get(f"{redis_prefix}text").execute()
            return type(lean), sent, leaned, expected, failed[0], after
        finally:
            batcher.close()

    kind, sent, replies, expected, failed, after = run(scenario)
    assert kind is redispipe.Pipeline
    assert sent == [14]  # one write
    assert replies == expected
    assert [type(r) for r in replies] == [type(r) for r in expected]
    assert isinstance(failed, ResponseError) and "WRONGTYPE" in str(failed)
    assert after == [b"a string"]
    tls = Batcher(aioredis.Redis.from_url("rediss://127.0.0.1:6390/0"))
    assert isinstance(tls.pipeline(), Pipeline)


# A script with a head (KEYS[1], ARGV[1]) and items (one key, one step each): it adds each
# step to its key and to the head's total, and replies 1, then per item its key's value and
# the total as it stood then (two elements per item, as inbox_publish replies).
ADD_ITEMS = """
local reply = {1}
for i = 2, #KEYS do
    reply[#reply + 1] = redis.call('INCRBY', KEYS[i], ARGV[i])
    reply[#reply + 1] = redis.call('INCRBY', KEYS[1], ARGV[i] * ARGV[1])
end
return reply
"""


def add_items(batcher: Batcher, script: Any, prefix: str, steps: list[int], scale: int = 1) -> Any:
    keys = [f"{prefix}item{step}" for step in steps]
    head = ((f"{prefix}total",), (scale,))
    return batcher.script_merged(script, head, keys, steps, len(steps), 2)


def merged(
    prefix: str,
    writes: list[int],
    calls: Callable[[Batcher, Any], Iterable[Awaitable[Any]]],
    flush: bool = False,
) -> list[Any]:
    """The replies (or errors) of ``calls(batcher, script)`` made together on a Batcher
    already connected and with ADD_ITEMS loaded (``flush``: then lost by Redis); ``writes``
    counts only theirs."""

    async def scenario(client: Any) -> list[Any]:
        batcher = Batcher(client)
        script = client.register_script(ADD_ITEMS)
        await batcher.script(script, [f"{prefix}total"], [0])  # loaded, connected
        if flush:
            await client.script_flush()
        writes.clear()
        try:
            return await asyncio.gather(*calls(batcher, script), return_exceptions=True)
        finally:
            batcher.close()

    return cast(list[Any], run(scenario))


def test_merged_calls_of_one_iteration_go_as_one_call(redis_prefix: str, writes: list[int]) -> None:
    replies = merged(
        redis_prefix,
        writes,
        lambda batcher, script: [
            add_items(batcher, script, redis_prefix, [1]),
            add_items(batcher, script, redis_prefix, [2, 3]),
            add_items(batcher, script, redis_prefix, [4]),
        ],
    )
    assert writes == [1]  # one EVALSHA for the three callers
    # each caller gets the status and its own items, as Redis ran them one after another
    assert replies == [[1, 1, 1], [1, 2, 3, 3, 6], [1, 4, 10]]


def test_calls_with_another_head_are_not_merged(redis_prefix: str, writes: list[int]) -> None:
    replies = merged(
        redis_prefix,
        writes,
        lambda batcher, script: [
            add_items(batcher, script, redis_prefix, [1]),
            add_items(batcher, script, redis_prefix, [2], scale=10),
            add_items(batcher, script, redis_prefix, [3]),
        ],
    )
    # one write, two calls: scale 1 (the first and third callers), then scale 10
    assert writes == [2]
    assert replies == [[1, 1, 1], [1, 2, 24], [1, 3, 4]]


def test_a_merged_call_is_loaded_again_after_redis_lost_the_script(redis_prefix: str) -> None:
    replies = merged(
        redis_prefix,
        [],
        lambda batcher, script: [add_items(batcher, script, redis_prefix, [s]) for s in (1, 2)],
        flush=True,
    )
    assert replies == [[1, 1, 1], [1, 2, 3]]


def test_a_cancelled_caller_leaves_the_others_their_replies(redis_prefix: str) -> None:
    async def scenario(client: Any) -> list[Any]:
        batcher = Batcher(client)
        script = client.register_script(ADD_ITEMS)
        await batcher.script(script, [f"{redis_prefix}total"], [0])
        try:
            calls = [
                asyncio.ensure_future(add_items(batcher, script, redis_prefix, [step]))
                for step in (1, 2, 3)
            ]
            await asyncio.sleep(0)  # all three joined the merge
            calls[1].cancel()
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            batcher.close()

    first, cancelled, third = run(scenario)
    assert isinstance(cancelled, asyncio.CancelledError)
    assert (first, third) == ([1, 1, 1], [1, 3, 6])  # its items ran: it was written


def test_a_merged_call_holds_merge_max_items_at_most(
    redis_prefix: str, writes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batching, "MERGE_MAX", 4)
    replies = merged(
        redis_prefix,
        writes,
        lambda batcher, script: [
            add_items(batcher, script, redis_prefix, [step]) for step in range(1, 11)
        ],
    )
    assert writes == [3]  # 4 + 4 + 2 items
    total = 0
    for step, reply in zip(range(1, 11), replies, strict=True):
        total += step
        assert reply == [1, step, total]


def test_an_error_fails_every_caller_of_the_merged_call(redis_prefix: str) -> None:
    with redis.Redis.from_url(REDIS_URL) as client:
        client.set(f"{redis_prefix}item2", "not a number")
    replies = merged(
        redis_prefix,
        [],
        lambda batcher, script: [add_items(batcher, script, redis_prefix, [s]) for s in (1, 2)],
    )
    for reply in replies:
        assert isinstance(reply, ResponseError)
