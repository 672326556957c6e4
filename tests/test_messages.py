"""End-to-end: publishing, delivery, inbox, unread and storage (docs/protocol.md).

Every test starts a real node (master, two socket workers, one task worker) and talks to it
as the main site does (HTTP on the ingest port) and as users do (WebSocket clients), against
the real Redis and, for the storage cases, a throw-away MariaDB database.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from websockets.exceptions import ConnectionClosed

from pmq.redis.keys import Keys
from tests.helpers import (
    Ingest,
    MysqlDatabase,
    Node,
    RedisServer,
    TcpProxy,
    WsClient,
    wait_for,
    ws_client,
)

pytestmark = pytest.mark.e2e

SHARDS = 4
NODE = {"server": {"workers": 2, "task_workers": 1}, "storage": {"shards": SHARDS}}
KINDS = ("comment", "notice", "letter", "system", "cs")
STORAGE_DEADLINE = 60.0  # seconds for the task worker to catch up after an outage
# The kill -9 test slows storage writes to this, so 2,000 rows (about 150 KB of INSERTs) take
# seconds, and kills the task worker once this much has been sent.
ROWS_BYTES_PER_SECOND = 40_000
KILL_AFTER_BYTES = 60_000


def settings(**sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """NODE's settings with ``sections`` merged over them."""
    merged = {name: dict(values) for name, values in NODE.items()}
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    return merged


def node_with(make_node: Callable[..., Node], **sections: dict[str, Any]) -> Node:
    """A started node with NODE's settings and ``sections``."""
    return make_node(**settings(**sections)).start()


def counts(**nonzero: int) -> dict[str, int]:
    """What unread.get answers: every kind, 0 unless given, and the total."""
    found = dict.fromkeys(KINDS, 0) | nonzero
    return found | {"total": sum(found.values())}


def published(answer: tuple[int, Any], status: int = 202) -> list[str]:
    code, reply = answer
    assert code == status, reply
    assert reply["code"] == status, reply
    return list(reply["data"]["ids"])


def healthz(ingest: Ingest) -> tuple[int, Any]:
    return ingest.call("GET", "/healthz")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def ingest_of() -> Iterator[Callable[..., Ingest]]:
    """Factory of ingest clients, closed at teardown."""
    made: list[Ingest] = []

    def make(node: Node, api_key: str = "") -> Ingest:
        made.append(Ingest(node, api_key))
        return made[-1]

    yield make
    for client in made:
        client.close()


@pytest.fixture
def mysql_db() -> Iterator[MysqlDatabase]:
    """A throw-away MariaDB database (skips the test if no server answers)."""
    db = MysqlDatabase()
    yield db
    db.drop()


@pytest.fixture
def mysql_proxy(mysql_db: MysqlDatabase) -> Iterator[TcpProxy]:
    """A TCP proxy to the MariaDB server that the test can cut and restore."""
    proxy = TcpProxy(mysql_db.host, mysql_db.port)
    yield proxy
    proxy.close()


def mysql_node(
    make_node: Callable[..., Node],
    db: MysqlDatabase,
    port: int | None = None,
    **sections: dict[str, Any],
) -> Node:
    """A started node storing in ``db`` (through ``port`` if given), schema made by pmqctl."""
    node = make_node(**settings(storage={"shards": SHARDS, "url": db.url(port)}, **sections))
    result = node.ctl("db", "init")
    assert result.returncode == 0, result.stdout + result.stderr
    return node.start()


# Online delivery ------------------------------------------------------------------------


def test_online_push_carries_every_field(make_node, ingest_of):
    node = node_with(make_node)
    site = ingest_of(node)
    body = {"text": "nice post", "post": 9, "nested": {"a": [1, 2]}}
    with ws_client(node, 7) as user:
        before = int(time.time() * 1000)
        code, reply = site.publish({"to": 7, "kind": "comment", "from": 42, "body": body})
        after = int(time.time() * 1000)
        assert code == 202 and reply["code"] == 202, reply
        assert reply["data"]["online"] == 1
        [message_id] = reply["data"]["ids"]
        assert isinstance(message_id, str) and message_id.isdigit()
        assert 0 < int(message_id) < 2**63

        push = user.next("push")
        assert set(push) == {"type", "msg"}
        message = push["msg"]
        assert set(message) == {"id", "kind", "from", "to", "body", "ts"}
        assert message["id"] == message_id
        assert message["kind"] == "comment"
        assert message["from"] == "42" and message["to"] == "7"
        assert message["body"] == body
        assert isinstance(message["ts"], int) and before <= message["ts"] <= after


def test_every_device_gets_the_push_and_online_counts_them(make_node, ingest_of):
    node = node_with(make_node)
    site = ingest_of(node)
    with ws_client(node, 7) as phone, ws_client(node, 7) as browser:
        code, reply = site.publish({"to": "7", "kind": "notice", "body": {"n": 1}})
        assert code == 202 and reply["data"]["online"] == 2
        ids = reply["data"]["ids"]
        for device in (phone, browser):
            message = device.next("push")["msg"]
            assert message["id"] == ids[0] and message["from"] is None


def test_multicast_reaches_each_user_once(make_node, ingest_of):
    node = node_with(make_node)
    site = ingest_of(node)
    with ws_client(node, 7) as seven, ws_client(node, 8) as eight:
        ids = published(site.publish({"to": [7, 8, "7", 9], "kind": "letter", "body": {}}))
        assert len(ids) == 3 and len(set(ids)) == 3  # repeats of a uid are one recipient
        assert seven.next("push")["msg"]["to"] == "7"
        assert eight.next("push")["msg"]["to"] == "8"
        assert seven.request("ping")["code"] == 200
        assert eight.request("ping")["code"] == 200
        assert not [f for f in seven.kept + eight.kept if f["type"] == "push"]


# Offline delivery, replay, ack, pull ------------------------------------------------------


def test_offline_messages_replay_after_hello_in_id_order(make_node, ingest_of):
    node = node_with(make_node)
    site = ingest_of(node)
    ids: list[str] = []
    for n in range(5):
        ids += published(site.publish({"to": 7, "kind": "notice", "from": 1, "body": {"n": n}}))
    ids += published(site.publish({"to": [8, 7], "kind": "letter", "body": {"n": 5}}))[1:]
    assert len(set(ids)) == 6

    # ws_client checks that the hello comes first, then waits for the reply to a ping sent
    # right after it: the whole replay, and nothing else, comes between the two.
    with ws_client(node, 7) as user:
        assert user.hello["heartbeat"] == 2 and user.hello["conn_id"]
        assert [f["type"] for f in user.kept] == ["push"] * 6
        replayed = user.pushes(6)
        assert [m["id"] for m in replayed] == sorted(ids, key=int)
        assert sorted(m["body"]["n"] for m in replayed) == list(range(6))
        assert all(m["to"] == "7" for m in replayed)
        assert [m["from"] for m in replayed].count("1") == 5
    # Unacked messages stay: the next connect replays them again.
    with ws_client(node, 7) as user:
        assert [m["id"] for m in user.pushes(6)] == sorted(ids, key=int)


def test_replay_pages_through_a_large_inbox(make_node, ingest_of):
    node = node_with(make_node)

    def publish_some(first: int) -> list[str]:
        site = ingest_of(node)
        return [
            published(site.publish({"to": 7, "kind": "letter", "body": {"n": n}}))[0]
            for n in range(first, first + 150)
        ]

    with ThreadPoolExecutor(3) as pool:  # both workers make ids at once
        ids = [i for some in pool.map(publish_some, (0, 150, 300)) for i in some]
    assert len(set(ids)) == 450
    with ws_client(node, 7) as user:  # replay goes page by page, 200 at a time
        replayed = [m["id"] for m in user.pushes(450)]
        assert replayed == sorted(ids, key=int)
        assert not user.kept


def test_ack_on_one_device_removes_for_all(make_node, ingest_of):
    node = node_with(make_node)
    site = ingest_of(node)
    with ws_client(node, 7) as phone, ws_client(node, 7) as browser:
        ids = [published(site.publish({"to": 7, "kind": "notice", "body": {"n": n}}))[0]
               for n in range(3)]
        for device in (phone, browser):
            assert sorted((m["id"] for m in device.pushes(3)), key=int) == sorted(ids, key=int)
        reply = phone.request("msg.ack", {"ids": ids[:2]})
        assert reply["code"] == 200 and reply["data"] == {"acked": 2}
        # The other device sees the ack too: its inbox holds only the third.
        pulled = browser.request("msg.pull", {})["data"]["messages"]
        assert [m["id"] for m in pulled] == ids[2:]
        with ws_client(node, 7) as tablet:
            assert [m["id"] for m in tablet.pushes(1)] == ids[2:]
            assert tablet.request("msg.ack", {"ids": [int(ids[2])]})["data"] == {"acked": 1}
    # A reconnect after the acks replays nothing, and acking again is harmless.
    with ws_client(node, 7) as user:
        assert not user.kept, user.kept
        assert user.request("msg.ack", {"ids": ids})["data"] == {"acked": 0}
        assert user.request("msg.pull", {})["data"] == {"messages": []}


def test_msg_pull_pages_with_after_and_limit(make_node, ingest_of):
    node = node_with(make_node)
    site = ingest_of(node)
    ids = [published(site.publish({"to": 7, "kind": "letter", "body": {"n": n}}))[0]
           for n in range(5)]
    ids.sort(key=int)
    with ws_client(node, 7) as user:
        user.pushes(5)
        pages = []
        after: str | None = None
        while True:
            data: dict[str, Any] = {"limit": 2} if after is None else {"limit": 2, "after": after}
            reply = user.request("msg.pull", data)
            assert reply["code"] == 200, reply
            page = [m["id"] for m in reply["data"]["messages"]]
            if not page:
                break
            pages.append(page)
            after = page[-1]
        assert pages == [ids[0:2], ids[2:4], ids[4:5]]
        whole = user.request("msg.pull", {})["data"]["messages"]
        assert [m["id"] for m in whole] == ids
        assert set(whole[0]) == {"id", "kind", "from", "to", "body", "ts"}
        rest = user.request("msg.pull", {"after": int(ids[2])})["data"]["messages"]
        assert [m["id"] for m in rest] == ids[3:]
        for bad in ({"limit": 0}, {"limit": 201}, {"after": "x"}):
            reply = user.request("msg.pull", bad)
            assert reply["code"] == 400, (bad, reply)
        for bad_ack in ({}, {"ids": []}, {"ids": ["abc"]}, {"ids": "1"}):
            reply = user.request("msg.ack", bad_ack)
            assert reply["code"] == 400 and "ids" in reply["msg"], (bad_ack, reply)


def test_paging_never_skips_under_concurrent_publishing(make_node, ingest_of):
    """Both socket workers make ids for the same users at once, many per millisecond; paging
    by ``after`` must still see every message exactly once."""
    node = node_with(make_node)
    users = list(range(1, 1001))
    threads, rounds = 6, 8

    def publish_some(_: int) -> None:
        site = ingest_of(node)
        for n in range(rounds):
            published(site.publish({"to": users, "kind": "notice", "body": {"n": n}}))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(publish_some, range(threads)))
    # A multicast makes its ids over a few milliseconds: the users late in the list are
    # where ids made on one worker interleave with ids made just before on the other.
    for uid in users[500::25]:
        with ws_client(node, uid) as user:
            replayed = [f["msg"]["id"] for f in user.kept if f["type"] == "push"]
            assert len(replayed) == threads * rounds and replayed == sorted(replayed, key=int)
            paged: list[str] = []
            while True:
                data: dict[str, Any] = {"limit": 1, "after": paged[-1]} if paged else {"limit": 1}
                page = user.request("msg.pull", data)["data"]["messages"]
                if not page:
                    break
                paged.append(page[0]["id"])
            assert paged == replayed, f"uid {uid}: paging skipped or repeated messages"


# Unread counters -----------------------------------------------------------------------


def test_unread_counts_per_kind_without_self_comments(make_node, ingest_of):
    node = node_with(make_node)
    site = ingest_of(node)
    published(site.publish({"to": 7, "kind": "comment", "from": 42, "body": {}}))
    published(site.publish({"to": 7, "kind": "comment", "from": 7, "body": {"own": 1}}))
    published(site.publish({"to": 7, "kind": "notice", "body": {}}))
    published(site.publish({"to": [7, 8], "kind": "letter", "from": 8, "body": {}}))
    published(site.publish({"to": 7, "kind": "letter", "from": 9, "body": {}}))
    published(site.publish({"to": 7, "kind": "cs", "from": 5, "body": {}}))
    expected = counts(comment=1, notice=1, letter=2, cs=1)

    code, reply = site.call("GET", "/api/v1/users/7")
    assert code == 200 and reply["data"]["online"] is False
    assert reply["data"]["connections"] == 0 and reply["data"]["unread"] == expected
    with ws_client(node, 7) as user:
        assert len(user.pushes(6)) == 6  # the self-comment is delivered, only not counted
        assert user.request("unread.get")["data"] == expected
        code, reply = site.call("GET", "/api/v1/users/7")
        assert reply["data"]["online"] is True and reply["data"]["connections"] == 1
        assert reply["data"]["unread"] == expected

        # A self-comment while online: pushed, counters untouched.
        published(site.publish({"to": 7, "kind": "comment", "from": 7, "body": {}}))
        user.next("push")
        assert user.request("unread.get")["data"] == expected

        reply = user.request("unread.clear", {"kinds": ["comment", "letter"]})
        assert reply["code"] == 200 and sorted(reply["data"]["cleared"]) == ["comment", "letter"]
        assert user.request("unread.get")["data"] == counts(notice=1, cs=1)
        assert site.call("GET", "/api/v1/users/7")[1]["data"]["unread"] == counts(notice=1, cs=1)

        reply = user.request("unread.clear")
        assert reply["code"] == 200 and set(KINDS) <= set(reply["data"]["cleared"])
        assert user.request("unread.get")["data"] == counts()
        assert site.call("GET", "/api/v1/users/8")[1]["data"]["unread"] == counts(letter=1)

        reply = user.request("unread.clear", {"kinds": "comment"})
        assert reply["code"] == 400 and "kinds" in reply["msg"]


def test_live_unread_frames_are_coalesced(make_node, ingest_of):
    node = node_with(make_node, unread={"push_interval": 1})
    site = ingest_of(node)
    with ws_client(node, 7) as user:
        started = time.monotonic()
        for n in range(10):
            published(site.publish({"to": 7, "kind": "comment", "from": 42, "body": {"n": n}}))
        publishing = time.monotonic() - started
        user.pushes(10)
        final = counts(comment=10)
        frames: list[dict[str, Any]] = [f for f in user.kept if f["type"] == "unread"]
        for frame in frames:  # taken, so next() does not return them again
            user.kept.remove(frame)
        deadline = time.monotonic() + 5
        while not frames or frames[-1]["data"] != final:
            frames.append(user.next("unread", timeout=max(0.01, deadline - time.monotonic())))
        # At most one per interval while publishing, and one after (a loaded machine may
        # stretch the publishing over more than one interval).
        assert 1 <= len(frames) <= 2 + int(publishing), (publishing, frames)
        assert len(frames) < 10
        # That was the last change: whatever else comes carries the same final counts.
        assert all(f["data"] == final for f in user.quiet(1.5) if f["type"] == "unread")

        # A clear on another device reaches this one as a live frame too.
        with ws_client(node, 7) as other:
            assert other.request("unread.clear", {"kinds": ["comment"]})["code"] == 200
        assert user.next("unread", timeout=5)["data"] == counts()


def test_a_quiet_users_badge_comes_with_the_push_and_the_next_waits_an_interval(
    make_node, ingest_of
):
    node = node_with(make_node, unread={"push_interval": 30})
    site = ingest_of(node)
    with ws_client(node, 7) as user:
        published(site.publish({"to": 7, "kind": "comment", "from": 42, "body": {"n": 1}}))
        assert user.next("push")["msg"]["body"] == {"n": 1}
        # With the push, not at the next tick 30 s away: the publish read the counters.
        assert user.next("unread", timeout=5)["data"] == counts(comment=1)
        published(site.publish({"to": 7, "kind": "letter", "from": 42, "body": {"n": 2}}))
        assert user.next("push")["msg"]["body"] == {"n": 2}
        assert [f for f in user.quiet(1.5) if f["type"] == "unread"] == []  # one per interval


def test_seed_comment_alias_is_a_comment_from_comment_uid(make_node, ingest_of):
    node = node_with(make_node)
    site = ingest_of(node)
    msg = {"comment_uid": 42, "content": "hello", "post_id": 5}
    with ws_client(node, 7) as user:
        code, reply = site.call(
            "POST", "/api/comment/message", form={"uid": "7", "msg": json.dumps(msg)}
        )
        assert code == 202, reply
        assert reply["data"]["online"] == 1
        message = user.next("push")["msg"]
        assert message["id"] == reply["data"]["ids"][0]
        assert message["kind"] == "comment" and message["from"] == "42" and message["to"] == "7"
        assert message["body"] == msg
        assert user.request("unread.get")["data"] == counts(comment=1)
    for form, field in (
        ({"uid": "x", "msg": json.dumps(msg)}, "uid"),
        ({"uid": "7", "msg": "{nope"}, "msg"),
        ({"uid": "7", "msg": json.dumps({"content": "no sender"})}, "comment_uid"),
    ):
        code, reply = site.call("POST", "/api/comment/message", form=form)
        assert code == 400 and field in reply["msg"], (form, reply)


# Idempotent publish and bad input ---------------------------------------------------------


def test_repeated_id_is_one_message(make_node, ingest_of):
    node = node_with(make_node)
    site = ingest_of(node)
    request = {"to": [7, 8], "kind": "notice", "body": {"x": 1}, "id": "order-1:paid"}
    with ws_client(node, 7) as user:
        first = published(site.publish(request))
        assert user.next("push")["msg"]["id"] == first[0]
        code, reply = site.publish(request)
        assert code == 200 and reply["code"] == 200, reply
        assert reply["data"]["duplicate"] is True and reply["data"]["ids"] == first
        # A later message arrives; nothing of the repeat came before it.
        marker = published(site.publish({"to": 7, "kind": "notice", "body": {"x": 2}}))
        assert user.next("push")["msg"]["id"] == marker[0]
        assert user.request("ping")["code"] == 200  # frames before the reply are kept
        assert not [f for f in user.kept if f["type"] == "push"], user.kept
        pulled = user.request("msg.pull", {})["data"]["messages"]
        assert [m["id"] for m in pulled] == sorted([first[0], marker[0]], key=int)
        assert user.request("unread.get")["data"] == counts(notice=2)
    with ws_client(node, 8) as other:
        assert [m["id"] for m in other.pushes(1)] == [first[1]]
        assert other.request("ping")["code"] == 200 and not other.kept


def test_bad_publish_is_400_naming_the_field(make_node, ingest_of):
    node = node_with(make_node)
    site = ingest_of(node)
    good = {"to": 7, "kind": "comment", "from": 42, "body": {"text": "hi"}}
    cases: list[tuple[dict[str, Any] | bytes, str]] = [
        ({k: v for k, v in good.items() if k != "to"}, "to"),
        (good | {"to": "abc"}, "to"),
        (good | {"to": 0}, "to"),
        (good | {"to": -3}, "to"),
        (good | {"to": []}, "to"),
        (good | {"to": [7, "x"]}, "to"),
        (good | {"to": list(range(1, 1002))}, "to"),
        ({k: v for k, v in good.items() if k != "kind"}, "kind"),
        (good | {"kind": "Bad-Kind"}, "kind"),
        (good | {"kind": "x" * 33}, "kind"),
        (good | {"from": "someone"}, "from"),
        (good | {"from": 1.5}, "from"),
        ({k: v for k, v in good.items() if k != "body"}, "body"),
        (good | {"body": "text"}, "body"),
        (good | {"id": "has space"}, "id"),
        (good | {"id": 12}, "id"),
        (good | {"id": "x" * 129}, "id"),
        (b"{not json", "JSON"),
        (b"", "body"),
        (b"[1, 2]", "body"),
    ]
    for body, field in cases:
        if isinstance(body, bytes):
            code, reply = site.call("POST", "/api/v1/messages", raw=body,
                                    headers={"Content-Type": "application/json"})
        else:
            code, reply = site.publish(body)
        assert code == 400 and reply["code"] == 400, (body, reply)
        assert field in reply["msg"], (body, reply)
    # 1,000 recipients is the limit, not over it.
    ids = published(site.publish(good | {"to": list(range(1, 1001))}))
    assert len(ids) == 1000
    # Nothing of the rejected requests was accepted.
    code, reply = site.call("GET", "/api/v1/users/7")
    assert reply["data"]["unread"] == counts(comment=1)
    code, reply = site.call("GET", "/api/v1/users/abc")
    assert code == 400 and "uid" in reply["msg"]


def test_api_key_guards_the_ingest_api(make_node, ingest_of):
    key = "k3y-" + "z" * 20
    node = node_with(make_node, ingest={"api_key": key})
    message = {"to": 7, "kind": "notice", "body": {}}
    anonymous = ingest_of(node)
    code, reply = anonymous.publish(message)
    assert code == 401 and reply["code"] == 401, reply
    for wrong in ("Bearer nope", f"Bearer {key}x", key, f"Basic {key}"):
        code, reply = anonymous.publish(message, headers={"Authorization": wrong})
        assert code == 401, (wrong, reply)
    assert anonymous.call("GET", "/api/v1/users/7")[0] == 401
    assert healthz(anonymous)[0] == 200  # the health check stays open to probes

    site = ingest_of(node, api_key=key)
    ids = published(site.publish(message))
    code, reply = site.publish(message | {"id": "once"})
    assert code == 202
    code, reply = site.publish(message | {"id": "once"})
    assert code == 200 and reply["data"]["duplicate"] is True
    code, reply = site.call("GET", "/api/v1/users/7")
    assert code == 200 and reply["data"]["unread"] == counts(notice=2)
    with ws_client(node, 7) as user:
        assert ids[0] in [m["id"] for m in user.pushes(2)]


def test_body_over_max_body_is_413(make_node, ingest_of):
    node = node_with(make_node, ingest={"max_body": 1024})
    site = ingest_of(node)
    code, reply = site.publish({"to": 7, "kind": "notice", "body": {"pad": "x" * 2000}})
    assert code == 413 and reply["code"] == 413, reply
    published(site.publish({"to": 7, "kind": "notice", "body": {"pad": "x" * 500}}))
    code, reply = site.call("GET", "/api/v1/users/7")
    assert reply["data"]["unread"] == counts(notice=1)


def test_a_redis_restart_fails_no_publish(make_node, tmp_path: Path):
    """Connections pooled before a Redis restart are dead; a publish that draws one is sent
    again on a fresh connection instead of being answered 503 (503 is for a Redis
    that is down, not for one that is back)."""
    own = RedisServer(tmp_path).start()
    try:
        node = node_with(make_node, redis={"url": own.url})

        def burst(tag: str) -> list[int]:  # concurrent, so each worker pools many connections
            def one(n: int) -> int:
                site = Ingest(node)
                try:
                    body = {"to": 100 + n, "kind": "notice", "body": {"t": tag}}
                    return site.publish(body)[0]
                finally:
                    site.close()

            with ThreadPoolExecutor(32) as pool:
                return list(pool.map(one, range(64)))

        assert burst("before") == [202] * 64
        own.stop()
        own.start()
        site = Ingest(node)
        wait_for(lambda: healthz(site)[0] == 200, 15, "the node to see redis again")
        site.close()
        assert burst("after") == [202] * 64
    finally:
        own.stop()


def test_unreachable_redis_is_503(make_node, ingest_of, tmp_path: Path, redis_prefix: str):
    own = RedisServer(tmp_path).start()
    try:
        node = node_with(make_node, redis={"url": own.url})
        site = ingest_of(node)
        message = {"to": 7, "kind": "notice", "body": {}, "id": "retry-me"}
        assert healthz(site)[0] == 200
        own.stop()
        code, reply = site.publish(message)
        assert code == 503 and reply["code"] == 503, reply
        assert "redis" in reply["msg"]
        code, reply = healthz(site)
        assert code == 503 and "redis" in reply["msg"], reply
        assert reply["data"]["storage"] == "ok" and reply["data"]["redis"] != "ok"
        code, reply = site.call("GET", "/api/v1/users/7")
        assert code == 503, reply

        # Redis back (empty, on the same port): the site's retry is accepted once.
        own.start()
        wait_for(lambda: healthz(site)[0] == 200, 15, "the node to see redis again")
        ids = published(site.publish(message))
        assert published(site.publish(message), status=200) == ids
        # Delivery works again on both workers, the relay between them included, once both
        # subscribed again. (A pooled Redis connection that predates the restart may fail
        # once: devices reconnect.)
        keys = Keys(redis_prefix)
        relay = redis.Redis.from_url(own.url, decode_responses=True)

        def subscribed() -> bool:  # sharded channels (SSUBSCRIBE)
            channels = set(relay.pubsub_shardchannels(keys.worker_channel("*")))
            broadcast = keys.broadcast_channel()
            return len(channels - {broadcast}) == 2 and relay.pubsub_shardnumsub(broadcast) == [
                (broadcast, 2)
            ]

        wait_for(subscribed, 10, "both relays to subscribe again")
        relay.close()
        with contextlib.ExitStack() as stack:
            devices = [connect_again(stack, node, 7) for _ in range(4)]
            assert all(ids[0] in [m["id"] for m in d.pushes(1)] for d in devices)
            for n in range(4):
                code, reply = site.publish({"to": 7, "kind": "notice", "body": {"n": n}})
                assert code == 202 and reply["data"]["online"] == 4, reply
                for device in devices:
                    assert device.next("push")["msg"]["id"] == reply["data"]["ids"][0]
    finally:
        own.stop()


def connect_again(stack: contextlib.ExitStack, node: Node, uid: int) -> WsClient:
    """A client of ``uid`` kept open in ``stack``, reconnecting (as real clients do) while
    the server closes the connection before its hello."""

    def attempt() -> WsClient | None:
        one = contextlib.ExitStack()
        try:
            client = one.enter_context(ws_client(node, uid))
        except ConnectionClosed:
            one.close()
            return None
        stack.enter_context(one)
        return client

    return wait_for(attempt, 10, f"a connection of user {uid}")  # type: ignore[no-any-return]


# Storage: MariaDB ----------------------------------------------------------------------


@pytest.mark.mysql
def test_replay_from_mariadb_after_the_hot_window(
    mysql_db, make_node, ingest_of, redis_client: redis.Redis, redis_prefix: str
):
    node = mysql_node(make_node, mysql_db, inbox={"hot_seconds": 1, "sweep_seconds": 1})
    site = ingest_of(node)
    keys = Keys(redis_prefix)
    sent = [
        {"to": 7, "kind": "comment", "from": 42, "body": {"text": "first"}},
        {"to": 7, "kind": "notice", "body": {"text": "second"}},
        {"to": 7, "kind": "letter", "from": 9, "body": {"text": "third", "n": [1, 2]}},
    ]
    ids = [published(site.publish(m))[0] for m in sent]
    table = f"pmq_msg_{7 % SHARDS}"

    def swept() -> bool:
        rows = mysql_db.query(f"SELECT id FROM {table} WHERE uid = 7 AND acked = 0")
        return (
            sorted(str(r[0]) for r in rows) == sorted(ids, key=int)
            and redis_client.zcard(keys.inbox("7")) == 0
            and redis_client.hlen(keys.inbox_bodies("7")) == 0
            and bool(redis_client.exists(keys.cold("7")))
        )

    wait_for(swept, 30, "the messages to move from Redis to MariaDB")
    with ws_client(node, 7) as user:
        replayed = user.pushes(3)
        assert [m["id"] for m in replayed] == sorted(ids, key=int)
        for message in replayed:
            request = sent[ids.index(message["id"])]
            assert message["kind"] == request["kind"]
            assert message["body"] == request["body"]
            assert message["to"] == "7"
            sender = request.get("from")
            assert message["from"] == (None if sender is None else str(sender))
            assert isinstance(message["ts"], int) and message["ts"] > 0
        assert not user.kept
        in_order = sorted(ids, key=int)
        pulled = user.request("msg.pull", {"after": in_order[0], "limit": 1})["data"]
        assert [m["id"] for m in pulled["messages"]] == in_order[1:2]

        reply = user.request("msg.ack", {"ids": ids})
        assert reply["code"] == 200 and reply["data"] == {"acked": 3}

    def acked() -> bool:
        rows = mysql_db.query(f"SELECT acked FROM {table} WHERE uid = 7")
        return len(rows) == 3 and all(r[0] == 1 for r in rows)

    wait_for(acked, 10, "the rows to be marked acked")
    with ws_client(node, 7) as user:  # nothing replayed, from Redis or MariaDB
        assert not user.kept, user.kept
        assert user.request("msg.pull", {})["data"] == {"messages": []}


@pytest.mark.mysql
def test_storage_outage_loses_nothing(mysql_db, mysql_proxy, make_node, ingest_of):
    node = mysql_node(make_node, mysql_db, port=mysql_proxy.port)
    site = ingest_of(node)
    assert healthz(site)[0] == 200

    mysql_proxy.cut()
    code, reply = healthz(site)
    assert code == 503 and "storage" in reply["msg"], reply
    ids: list[str] = []
    for n in range(1000):
        message = {"to": 1 + n % 40, "kind": "notice", "body": {"n": n}, "id": f"down-{n}"}
        ids += published(site.publish(message))
    assert len(set(ids)) == 1000
    assert mysql_db.message_ids(SHARDS) == []  # nothing got through the cut

    mysql_proxy.restore()
    expected = sorted(map(int, ids))
    wait_for(
        lambda: len(mysql_db.message_ids(SHARDS)) >= 1000,
        STORAGE_DEADLINE,
        "the 1,000 messages to reach MariaDB",
    )
    assert sorted(mysql_db.message_ids(SHARDS)) == expected
    wait_for(lambda: healthz(site)[0] == 200, 15, "healthz to recover")
    # Each row sits in its user's shard.
    for n in range(SHARDS):
        uids = {r[0] for r in mysql_db.query(f"SELECT DISTINCT uid FROM pmq_msg_{n}")}
        assert uids and all(uid % SHARDS == n for uid in uids)


@pytest.mark.mysql
def test_kill_9_of_task_worker_mid_batch_loses_nothing(
    mysql_db, mysql_proxy, make_node, ingest_of
):
    node = mysql_node(make_node, mysql_db, port=mysql_proxy.port)
    site = ingest_of(node)
    # Hold storage back while publishing, so the queue is full when the writer starts on it.
    mysql_proxy.cut()
    ids = [
        published(site.publish({"to": 7, "kind": "notice", "body": {"n": n}, "id": f"k9-{n}"}))[0]
        for n in range(2000)
    ]
    assert len(set(ids)) == 2000
    assert mysql_db.message_ids(SHARDS) == []

    [victim] = node.workers("task")
    # Storage back, but slow: the writer's batches take a while on the wire.
    mysql_proxy.upstream_rate = ROWS_BYTES_PER_SECOND
    mark = mysql_proxy.upstream_bytes
    mysql_proxy.restore()
    # Some rows are on their way (past a handshake's worth of bytes): kill it mid-batch.
    wait_for(
        lambda: mysql_proxy.upstream_bytes - mark > KILL_AFTER_BYTES,
        STORAGE_DEADLINE,
        "the task worker to start writing",
    )
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for(lambda: gone(victim["pid"]), 5, "the task worker to die")
    stored_at_kill = len(mysql_db.message_ids(SHARDS))
    assert stored_at_kill < 2000  # the kill came while the queue was draining
    mysql_proxy.upstream_rate = None

    def replaced() -> bool:
        workers = node.workers("task")
        return bool(workers) and workers[0]["pid"] != victim["pid"] and workers[0]["ready"]

    wait_for(replaced, 20, "a new task worker")
    wait_for(
        lambda: len(mysql_db.message_ids(SHARDS)) >= 2000,
        STORAGE_DEADLINE,
        f"2,000 rows in MariaDB ({stored_at_kill} were there at the kill)",
    )
    stored = mysql_db.message_ids(SHARDS)
    assert len(stored) == 2000 and sorted(stored) == sorted(map(int, ids))
