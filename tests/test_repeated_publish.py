"""A repeated publish (the same idempotency key) pushes what its first request's publisher
never pushed: that one can die after its script accepted the messages and before its push
(with redis.durability = "aof" it waits for WAITAOF in between), and the site, left without
an answer, sends the request again (pmq.domain.messaging.push_again). A connection that had the
message does not get it twice."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from pmq.domain.auth import Identity
from pmq.domain.ids import IdGenerator
from pmq.domain.inbox import Inbox
from pmq.reactor import connections
from pmq.reactor.connections import RECENT_PUSHES, Client, ConnectionTable
from pmq.redis.keys import Keys
from pmq.wire.client import push_of
from tests.helpers import REDIS_URL, Ingest, Node, WsClient, ws_client
from tests.test_relay_gap import Socket

UID = "41"


def accept_without_push(prefix: str, key: str, body: dict[str, int]) -> str:
    """What a publisher that died right after its script leaves: the message accepted under
    ``key``, in the inbox, pushed to no one. Returns its id."""

    async def accept() -> str:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            inbox = Inbox(client, Keys(prefix), IdGenerator(1), 86400, 86400)
            accepted = await inbox.publish([UID], "notice", None, body, key)
            return accepted.ids[0]
        finally:
            await client.aclose()

    return asyncio.run(accept())


def next_push_is(user: WsClient, site: Ingest, key: str) -> None:
    """The next push the user gets is a new message (``key``): nothing came in between."""
    status, reply = site.publish({"to": [int(UID)], "kind": "notice", "body": {}, "id": key})
    assert status == 202, reply
    assert user.pushes(1)[0]["id"] == reply["data"]["ids"][0]


def test_a_repeat_pushes_what_the_first_publisher_never_did(
    make_node: Callable[..., Node], redis_prefix: str
) -> None:
    node = make_node().start()
    site = Ingest(node)
    with ws_client(node, UID) as user:
        first_id = accept_without_push(redis_prefix, "k-died", {"n": 1})
        status, reply = site.publish(
            {"to": [int(UID)], "kind": "notice", "body": {"n": 1}, "id": "k-died"}
        )
        assert status == 200 and reply["data"]["duplicate"], reply
        assert reply["data"]["ids"] == [first_id]
        assert user.pushes(1)[0]["id"] == first_id  # before: never, until a reconnect
        # a third time: the connection has it now, nothing is pushed
        status, reply = site.publish(
            {"to": [int(UID)], "kind": "notice", "body": {"n": 1}, "id": "k-died"}
        )
        assert status == 200, reply
        next_push_is(user, site, "k-marker-1")


def test_a_repeat_of_a_pushed_message_pushes_nothing(make_node: Callable[..., Node]) -> None:
    node = make_node().start()
    site = Ingest(node)
    with ws_client(node, UID) as user:
        request = {"to": [int(UID)], "kind": "notice", "body": {"n": 2}, "id": "k-once"}
        status, reply = site.publish(request)
        assert status == 202, reply
        assert user.pushes(1)[0]["id"] == reply["data"]["ids"][0]
        for _ in range(4):  # fresh connections: either worker, so the push may be relayed
            status, reply = Ingest(node).publish(request)
            assert status == 200 and reply["data"]["duplicate"], reply
        next_push_is(user, site, "k-marker-2")


def test_a_repeat_of_an_acked_message_pushes_nothing(
    make_node: Callable[..., Node], redis_prefix: str
) -> None:
    node = make_node().start()
    site = Ingest(node)
    with ws_client(node, UID) as user:
        first_id = accept_without_push(redis_prefix, "k-acked", {"n": 3})
        assert user.request("msg.ack", {"ids": [first_id]})["code"] == 200
        status, reply = site.publish(
            {"to": [int(UID)], "kind": "notice", "body": {"n": 3}, "id": "k-acked"}
        )
        assert status == 200, reply
        next_push_is(user, site, "k-marker-3")


def test_a_repeat_during_the_replay_then_the_first_push_reaches_the_connection_once() -> None:
    """The first publisher stalls between its script and its push (a worker starved in a
    reconnect storm); the site, left without an answer, sends the request again, and the
    repeat's push reaches a connection still replaying (held back, then written at the
    release: the replay's look came before the message). The first push, when it comes at
    last, is a copy the connection has had: dropped, as after a replay. Seen once by
    bench.storm: the same message twice on one connection, 74 ms apart."""
    socket = Socket()
    table = ConnectionTable()
    client = Client(socket, "c1", Identity(UID), 1 << 20, 50)  # type: ignore[arg-type]
    table.add(client)
    payload = push_of({"id": str(client.opened + 1), "kind": "notice", "body": {}})[0]
    client.hold()  # connecting: its replay runs
    assert table.push_again(UID, payload) == 1  # the repeat's push: held back
    client.release()  # the replay had not seen it: written now
    table.send_to_user(UID, payload)  # the first publisher's push, late
    assert socket.pushed_ids() == [str(client.opened + 1)]


def test_a_repeat_and_the_first_push_both_during_the_replay_reach_the_connection_once() -> None:
    """The same, the first publisher's push coming while the replay still runs: both copies
    are held back, and the release writes one."""
    socket = Socket()
    table = ConnectionTable()
    client = Client(socket, "c1", Identity(UID), 1 << 20, 50)  # type: ignore[arg-type]
    table.add(client)
    payload = push_of({"id": str(client.opened + 1), "kind": "notice", "body": {}})[0]
    client.hold()
    assert table.push_again(UID, payload) == 1  # the repeat's push: held back
    table.send_to_user(UID, payload)  # the first publisher's push: held back too
    client.release()
    assert socket.pushed_ids() == [str(client.opened + 1)]


def test_a_repeat_long_after_the_first_push_pushes_nothing_again() -> None:
    """The site repeats a request long after its message was pushed (its answer was lost,
    or came after the site's timeout), the message still unacked: more than RECENT_PUSHES
    pushes later, 3 s of a worker pushing 10,000 a second. The table still knows the id
    (REPEAT_MEMORY) and the connection does not get it twice."""
    socket, busy = Socket(), Socket()
    table = ConnectionTable()
    client = Client(socket, "c1", Identity(UID), 1 << 20, 50)  # type: ignore[arg-type]
    other = Client(busy, "c2", Identity("42"), 1 << 30, 50)  # type: ignore[arg-type]
    table.add(client)
    table.add(other)
    message_id = str(client.opened + 1)
    payload = push_of({"id": message_id, "kind": "notice", "body": {}})[0]
    table.send_to_user(UID, payload)  # the first publisher's push
    for n in range(RECENT_PUSHES + 1):  # the worker's other pushes since
        table.send_to_user("42", push_of({"id": str(client.opened + 2 + n), "kind": "notice"})[0])
    assert table.push_again(UID, payload) == 0
    assert socket.pushed_ids() == [message_id]


def test_the_table_remembers_the_last_ids_pushed_and_forgets_older_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The id memory, made small: every id of the last REPEAT_MEMORY pushes is found, in
    whichever block, the one being written too, in push order or not; an id pushed before
    them, or never, is not."""
    monkeypatch.setattr(connections, "REPEAT_MEMORY", 64)
    monkeypatch.setattr(connections, "REPEAT_BLOCK", 8)
    recent = connections.RecentPushes()
    pushed = [1000 + 10 * n + (5 if n % 3 else -5) for n in range(64 * 3 + 5)]  # not sorted
    for message_id in pushed:
        recent.add(UID, message_id)
    assert all(message_id in recent for message_id in pushed[-64:])
    assert not any(message_id in recent for message_id in pushed[: -64 - 8])
    assert 1001 not in recent and 10**12 not in recent
    assert len(recent.ids) == 64 * 8  # bytes: the memory stops growing
