"""A socket worker whose pub/sub subscription was cut catches up once subscribed again: a
client that stayed connected gets every message and broadcast published meanwhile, each
once (pmq.reactor.catchup). The fault is real: Redis kills the workers' pub/sub
connections (CLIENT KILL TYPE pubsub), again and again, while the site publishes."""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from pmq.domain.auth import Identity
from pmq.domain.broadcast import Broadcasts
from pmq.domain.ids import IdGenerator, first_id_at
from pmq.domain.inbox import Inbox
from pmq.domain.unread import Unread
from pmq.reactor import catchup
from pmq.reactor.catchup import CatchUp
from pmq.reactor.connections import Client, ConnectionTable
from pmq.reactor.fanout import Fanout
from pmq.reactor.unread import UnreadPusher
from pmq.redis.keys import Keys
from pmq.wire.client import push_of
from tests.helpers import REDIS_URL, Ingest, Node, RedisServer, WsClient, wait_for, ws_client

USERS = ("7", "8")


def kill_subscriptions(url: str, stop: threading.Event) -> int:
    """Kill every pub/sub connection of the Redis at ``url`` every 50 ms until ``stop``;
    returns how many were killed."""
    client = redis.Redis.from_url(url)
    killed = 0
    while not stop.is_set():
        killed += int(client.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))
        time.sleep(0.05)
    client.close()
    return killed


def test_a_cut_subscription_catches_up_each_message_once(
    make_node: Callable[..., Node], own_redis: RedisServer
) -> None:
    node = make_node(redis={"url": own_redis.url}).start()
    site = Ingest(node)
    with ws_client(node, USERS[0]) as first, ws_client(node, USERS[1]) as second:
        stop = threading.Event()
        killed: list[int] = []
        killer = threading.Thread(
            target=lambda: killed.append(kill_subscriptions(own_redis.url, stop))
        )
        killer.start()
        expected: dict[str, set[str]] = {uid: set() for uid in USERS}
        broadcasts: set[str] = set()
        try:
            for n in range(60):  # 3 s of publishing while the subscriptions keep dying
                status, reply = site.publish(
                    {"to": list(map(int, USERS)), "kind": "notice", "body": {"n": n}}
                )
                assert status == 202, reply
                for uid, message_id in zip(USERS, reply["data"]["ids"], strict=True):
                    expected[uid].add(message_id)
                if n % 10 == 0:
                    status, reply = site.call(
                        "POST", "/api/v1/broadcast", {"group": "all", "body": {"n": n}}
                    )
                    assert status == 202, reply
                    broadcasts.add(reply["data"]["id"])
                time.sleep(0.05)
        finally:
            stop.set()
            killer.join(10)
        assert killed and killed[0] > 0

        for user, uid in ((first, USERS[0]), (second, USERS[1])):
            want = expected[uid] | broadcasts
            got: collections.Counter[str] = collections.Counter()

            def arrived(
                user: WsClient = user, got: collections.Counter[str] = got, want: set[str] = want
            ) -> bool:
                for frame in user.quiet(0.2):
                    if frame.get("type") == "push":
                        got[frame["msg"]["id"]] += 1
                return set(got) >= want

            wait_for(arrived, 30, f"user {uid}'s {len(want)} pushes")
            arrived()  # and nothing more comes
            for frame in user.quiet(1.0):
                if frame.get("type") == "push":
                    got[frame["msg"]["id"]] += 1
            assert set(got) == want
            assert [i for i, n in got.items() if n > 1] == []
    site.close()



class Socket:
    """What a Client writes to, kept as the frames' payloads."""

    open = True

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, frame: bytes) -> int:
        self.written.append(frame)
        return 0  # bytes not yet sent

    def pushed_ids(self) -> list[str]:
        ids = []
        for frame in self.written:
            header = {126: 4, 127: 10}.get(frame[1] & 0x7F, 2)
            payload = json.loads(frame[header:])
            ids.append(payload["msg"]["id"])
        return ids


def catch_up_rig(
    redis_prefix: str, storage: Any
) -> tuple[aioredis.Redis, Inbox, ConnectionTable, CatchUp]:
    """A worker's catch-up on the shared Redis under ``redis_prefix``, reading ``storage``
    for what Redis lost: (client, inbox, connection table, catch-up)."""
    client = aioredis.Redis.from_url(REDIS_URL)
    keys = Keys(redis_prefix)
    ids = IdGenerator(1)
    inbox = Inbox(client, keys, ids, 86400, 86400)
    table = ConnectionTable()
    unread = UnreadPusher(1, table, Unread(client, keys, 86400))
    broadcasts = Broadcasts(client, keys, ids, 900, 20, 86400)
    return client, inbox, table, CatchUp(table, inbox, broadcasts, Fanout(table, unread), storage)


def test_a_catch_up_sends_only_what_the_connection_never_had(redis_prefix: str) -> None:
    """Only messages made after the connection opened, and each once: an older unacked
    message (its connect replayed it, however long ago) is never sent again."""

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        client, inbox, table, catch_up = catch_up_rig(redis_prefix, no_storage)
        floor = first_id_at(int(time.time() * 1000) - 10_000)

        old = await inbox.publish(["7"], "notice", None, {"n": 0})  # replayed on connect
        await asyncio.sleep(0.01)
        socket = Socket()
        table.add(Client(socket, "c1", Identity("7"), 1 << 20, 50))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        new = await inbox.publish(["7"], "notice", None, {"n": 1})  # missed in a gap
        await catch_up.unicast(floor)
        first = socket.pushed_ids()
        await catch_up.unicast(floor)  # a second gap: what the first sent is not sent again
        again = socket.pushed_ids()
        await client.aclose()
        return old.ids + new.ids, first, again

    published, first, again = asyncio.run(scenario())
    assert first == [published[1]]
    assert again == [published[1]]


async def no_storage(uids: Sequence[str], after: int) -> dict[str, list[dict[str, Any]]]:
    raise AssertionError("a relay-gap catch-up reads Redis only")


def test_messages_lost_with_redis_come_from_storage_to_connections_that_stayed(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis emptied just after accepting a message whose live push went with it: the
    journals queue it again for storage and the users are flagged cold, but a relay-gap
    catch-up reads Redis, where it no longer is (the chaos suite's redis-empty: 4 to 11
    messages answered 202 never reached users who stayed connected). The catch-up after
    the loss reads storage, and sends each connection what it has not had, once, even one
    opened after Redis was last seen whole."""
    monkeypatch.setattr(catchup, "STORED_PASSES", (0.0, 0.0))
    whole_at = time.time() - 1
    made = [first_id_at(int(whole_at * 1000) + n) for n in (-5000, 100, 200, 300)]
    # In storage, unacked: one from before Redis was last seen whole (replayed long ago),
    # one the connection had live, one lost with its push, one made after it opened.
    stored = [
        {"id": str(i), "kind": "notice", "from": None, "to": "7", "body": {}, "ts": 1}
        for i in made
    ]
    reads: list[tuple[list[str], int]] = []

    async def storage(uids: Sequence[str], after: int) -> dict[str, list[dict[str, Any]]]:
        reads.append((list(uids), after))
        return {"7": [m for m in stored if int(m["id"]) > after]}

    async def scenario() -> list[str]:
        client, _, table, catch_up = catch_up_rig(redis_prefix, storage)
        socket = Socket()
        user = Client(socket, "c1", Identity("7"), 1 << 20, 50)  # type: ignore[arg-type]
        user.opened = made[1] + 1  # reconnected since Redis was last seen whole
        table.add(user)
        table.send_to_user("7", push_of(stored[1])[0])  # had it live
        await catch_up.unicast(first_id_at(int((whole_at - 2) * 1000)))  # Redis: nothing
        assert socket.pushed_ids() == [stored[1]["id"]] and not reads
        loss = catchup.LossCatchUp(catch_up)
        loss.start(whole_at)
        assert loss.task is not None
        await asyncio.wait_for(loss.task, 10)
        await client.aclose()
        return socket.pushed_ids()

    pushed = asyncio.run(scenario())
    assert pushed == [str(made[1]), str(made[2]), str(made[3])]  # each once, none older
    floor = first_id_at(int((whole_at - catchup.MARGIN_SECONDS) * 1000))
    assert reads == [(["7"], floor - 1)] * 2  # one read of storage per pass, for everyone


def test_a_late_replay_notes_only_ids_older_than_the_connection() -> None:
    """While storage is out, a connection notes the ids it is sent so that the late replay
    skips them; only those older than the connection can be storage's, so newer ones (every
    live push, for as long as the outage lasts) are not kept."""
    client = Client(Socket(), "c1", Identity("7"), 1 << 20, 50)  # type: ignore[arg-type]
    client.sent = set()
    older, newer = client.opened - 1, client.opened + 1
    client.send_frame(b"x", older)
    client.send_frame(b"y", newer)
    assert client.sent == {older}


def test_a_catch_up_that_fails_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis answering LOADING (still reading its AOF after a restart) or gone again makes
    a catch-up fail: it runs again from the same id, rather than leaving the gap unseen."""
    monkeypatch.setattr(catchup, "RETRY_FIRST", 0.01)
    floors: list[int] = []

    async def flaky(floor: int) -> None:
        floors.append(floor)
        if len(floors) < 3:
            raise redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory")

    async def scenario() -> None:
        gap = catchup.Gap(lambda message: None, flaky)
        gap.opened()
        gap.closed()
        assert gap.task is not None
        await asyncio.wait_for(gap.task, 5)

    asyncio.run(scenario())
    assert len(floors) == 3 and len(set(floors)) == 1
