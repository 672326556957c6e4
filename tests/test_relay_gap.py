"""A socket worker whose pub/sub subscription was cut catches up once subscribed again: a
client that stayed connected gets every message and broadcast published meanwhile, each
once (pmq.reactor.catchup). The fault is real: Redis kills the workers' pub/sub
connections (CLIENT KILL TYPE pubsub), again and again, while the site publishes."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import Ingest, Node, RedisServer, WsClient, wait_for, ws_client

USERS = ("7", "8")


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server: killing pub/sub connections must not touch other tests'."""
    data = tmp_path / "redis"
    data.mkdir()
    server = RedisServer(data).start()
    yield server
    server.stop()


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

