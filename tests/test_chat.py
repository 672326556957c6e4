"""End-to-end: the customer-service chat (docs/protocol.md, "Customer-service chat") on a
real node with two socket workers, real WebSocket clients and real Redis."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from websockets.sync.client import connect

from pmq.config import StorageConfig
from pmq.domain.jwtauth import mint_token
from pmq.redis.keys import Keys
from pmq.store import Store, open_store
from pmq.store.rows import StoredCsMessage, StoredCsSession
from tests.helpers import SECRET, Ingest, MysqlDatabase, Node, RedisServer, WsClient, wait_for

pytestmark = pytest.mark.e2e

AGENT_A, AGENT_B, AGENT_C = "9001", "9002", "9003"


@contextlib.contextmanager
def connect_as(node: Node, uid: str, role: str = "user") -> Iterator[WsClient]:
    """A connection as ``uid`` with ``role``, returned once the server answered a ping:
    connect-time work (inbox replay, an agent's presence and queue drain) is then done."""
    token = mint_token(SECRET, uid, (), role, ttl=3600)
    with connect(f"{node.ws_url}?token={token}", open_timeout=5) as ws:
        hello = json.loads(ws.recv(timeout=5))
        assert hello["type"] == "hello" and hello["uid"] == uid, hello
        client = WsClient(ws, hello)
        assert client.request("ping")["code"] == 200
        yield client


def agent(node: Node, uid: str) -> contextlib.AbstractContextManager[WsClient]:
    return connect_as(node, uid, "agent")


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply["code"] == 200, reply
    return reply["data"]  # type: ignore[no-any-return]


def chat_node(make_node: Callable[..., Node], **cs: Any) -> Node:
    return make_node(cs={"max_sessions_per_agent": 5, **cs}).start()


def open_and_assign(user: WsClient, *agents: WsClient) -> tuple[str, str]:
    """cs.open as ``user``; (session id, agent uid), after its agent got cs.assigned."""
    reply = ok(user.request("cs.open"))
    assert reply["agent"] is not None and reply["queued"] is False, reply
    chosen = next(a for a in agents if a.hello["uid"] == reply["agent"])
    event = chosen.next("cs.assigned")
    assert event == {
        "type": "cs.assigned", "session_id": reply["session_id"], "user": user.hello["uid"],
    }
    return reply["session_id"], reply["agent"]


def close_session(user: WsClient, peer: WsClient, session_id: str) -> None:
    ok(user.request("cs.close", {"session_id": session_id}))
    for side in (user, peer):
        event = side.next("cs.closed")
        assert event == {
            "type": "cs.closed", "session_id": session_id, "by": user.hello["uid"],
            "reason": "closed",
        }


def test_sticky_assignment(make_node: Callable[..., Node]) -> None:
    node = chat_node(make_node)
    with agent(node, AGENT_A) as a, agent(node, AGENT_B) as b, contextlib.ExitStack() as stack:
        agents = {AGENT_A: a, AGENT_B: b}
        with connect_as(node, "1") as user:
            sid, first = open_and_assign(user, a, b)
            close_session(user, agents[first], sid)
            other = AGENT_B if first == AGENT_A else AGENT_A
            # Load the first agent above the other, so least-loaded would pick the other.
            for n in range(2, 60):
                helper = stack.enter_context(connect_as(node, str(n)))
                helper_sid, got = open_and_assign(helper, a, b)
                if got == first:
                    break
                close_session(helper, agents[other], helper_sid)
            else:
                pytest.fail("the first agent never got a session")
            again = ok(user.request("cs.open"))
            assert again["agent"] == first and again["session_id"] != sid
            assert agents[first].next("cs.assigned")["session_id"] == again["session_id"]
        with connect_as(node, "100") as newcomer:  # no history: the least loaded one
            assert open_and_assign(newcomer, a, b)[1] == other


def test_random_among_online_agents(make_node: Callable[..., Node]) -> None:
    node = chat_node(make_node)
    with (
        agent(node, AGENT_A) as a, agent(node, AGENT_B) as b, agent(node, AGENT_C) as c,
        contextlib.ExitStack() as stack,
    ):
        agents = {AGENT_A: a, AGENT_B: b, AGENT_C: c}
        # Ties (every agent idle) go to a random one.
        chosen = set()
        for n in range(1, 13):
            with connect_as(node, str(n)) as user:
                sid, got = open_and_assign(user, a, b, c)
                chosen.add(got)
                close_session(user, agents[got], sid)
        assert len(chosen) >= 2, chosen
        # Held sessions spread over every agent, least loaded first.
        load: dict[str, int] = {}
        for n in range(20, 26):
            user = stack.enter_context(connect_as(node, str(n)))
            got = open_and_assign(user, a, b, c)[1]
            load[got] = load.get(got, 0) + 1
        assert load == {AGENT_A: 2, AGENT_B: 2, AGENT_C: 2}


def worker_of(client: redis.Redis, keys: Keys, uid: str) -> str:
    workers = set(client.hgetall(keys.user_conns(uid)).values())
    assert len(workers) == 1, workers
    return str(workers.pop())


def test_cap_respected_under_concurrent_opens(
    make_node: Callable[..., Node], redis_prefix: str, redis_client: redis.Redis
) -> None:
    node = chat_node(make_node, max_sessions_per_agent=2)
    keys = Keys(redis_prefix)
    uids = [str(n) for n in range(1, 7)]
    with agent(node, AGENT_A) as a, contextlib.ExitStack() as stack:
        users = {uid: stack.enter_context(connect_as(node, uid)) for uid in uids}
        for _ in range(30):  # make sure both workers serve some of the users
            if len({worker_of(redis_client, keys, uid) for uid in uids}) == 2:
                break
            users[uids[-1]].ws.close()
            users[uids[-1]] = stack.enter_context(connect_as(node, uids[-1]))
        assert len({worker_of(redis_client, keys, uid) for uid in uids}) == 2

        barrier = threading.Barrier(len(uids))
        replies: dict[str, dict[str, Any]] = {}

        def open_session(uid: str) -> None:
            barrier.wait(5)
            replies[uid] = ok(users[uid].request("cs.open"))

        threads = [threading.Thread(target=open_session, args=(uid,)) for uid in uids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert len(replies) == len(uids)
        assigned = {uid: r for uid, r in replies.items() if r["agent"] is not None}
        queued = {uid: r for uid, r in replies.items() if r["agent"] is None}
        assert len(assigned) == 2 and all(r["agent"] == AGENT_A for r in assigned.values())
        assert sorted(r["position"] for r in queued.values()) == [1, 2, 3, 4]
        assert all(r["queued"] for r in queued.values())
        events = [a.next("cs.assigned") for _ in assigned]
        assert {e["user"] for e in events} == set(assigned)
        assert not [f for f in a.quiet(0.3) if f.get("type") == "cs.assigned"]
        assert redis_client.hget(keys.cs_load(), AGENT_A) == "2"
        assert redis_client.llen(keys.cs_queue()) == 4

        # Opening again returns the same session; closing one hands its place to the
        # first in the queue, and both sides hear of it.
        some_uid, some = next(iter(assigned.items()))
        assert ok(users[some_uid].request("cs.open")) == some
        first_uid = next(uid for uid, r in queued.items() if r["position"] == 1)
        again = ok(users[first_uid].request("cs.open"))
        assert again == queued[first_uid]
        close_session(users[some_uid], a, some["session_id"])
        to_user = users[first_uid].next("cs.assigned")
        assert to_user == {
            "type": "cs.assigned", "session_id": queued[first_uid]["session_id"],
            "user": first_uid, "agent": AGENT_A,
        }
        assert a.next("cs.assigned")["session_id"] == queued[first_uid]["session_id"]
        assert redis_client.hget(keys.cs_load(), AGENT_A) == "2"


def test_queued_session_assigned_when_agent_connects(make_node: Callable[..., Node]) -> None:
    node = chat_node(make_node)
    with connect_as(node, "1") as user:
        reply = ok(user.request("cs.open"))
        assert reply == {
            "session_id": reply["session_id"], "agent": None, "queued": True, "position": 1,
        }
        sent = user.request("cs.send", {"session_id": reply["session_id"], "text": "hi"})
        assert sent["code"] == 409, sent
        with agent(node, AGENT_A) as a:
            assert a.next("cs.assigned") == {
                "type": "cs.assigned", "session_id": reply["session_id"], "user": "1",
            }
            assert user.next("cs.assigned") == {
                "type": "cs.assigned", "session_id": reply["session_id"], "user": "1",
                "agent": AGENT_A,
            }
            ok(user.request("cs.send", {"session_id": reply["session_id"], "text": "hello"}))
            (msg,) = a.pushes(1)
            assert msg["kind"] == "cs" and msg["from"] == "1" and msg["to"] == AGENT_A
            assert msg["body"] == {"session_id": reply["session_id"], "text": "hello"}
            sessions = ok(a.request("cs.sessions"))
            assert sessions["queued"] == 0
            (listed,) = sessions["sessions"]
            assert listed["session_id"] == reply["session_id"] and listed["user"] == "1"
            assert listed["last"]["id"] == msg["id"]


def test_an_agent_is_online_when_its_hello_comes(
    make_node: Callable[..., Node], redis_client: redis.Redis, redis_prefix: str
) -> None:
    """A user who sees an agent's hello finds it online: the agent joins the online set
    before its hello, not after its replay (here a slow one: from storage)."""
    node = make_node(
        cs={"max_sessions_per_agent": 5}, inbox={"hot_seconds": 1, "sweep_seconds": 1}
    ).start()
    keys = Keys(redis_prefix)
    site = Ingest(node)
    try:
        assert site.publish({"to": AGENT_A, "kind": "notice", "body": {}})[0] == 202
    finally:
        site.close()
    wait_for(
        lambda: redis_client.zcard(keys.inbox(AGENT_A)) == 0
        and redis_client.exists(keys.cold(AGENT_A)),
        30,
        "the agent's message to move to storage",
    )
    token = mint_token(SECRET, AGENT_A, (), "agent", ttl=3600)
    with connect(f"{node.ws_url}?token={token}", open_timeout=5) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "hello"
        assert redis_client.sismember(keys.cs_online(), AGENT_A)
        assert json.loads(ws.recv(timeout=5))["type"] == "push"  # the replay follows


def test_message_to_offline_agent_arrives_on_reconnect(make_node: Callable[..., Node]) -> None:
    node = chat_node(make_node)
    with connect_as(node, "1") as user:
        with agent(node, AGENT_A) as a:
            sid, _ = open_and_assign(user, a)
        sent = ok(user.request("cs.send", {"session_id": sid, "text": "are you there?"}))
        with agent(node, AGENT_A) as a:
            replayed = [f["msg"] for f in a.kept if f.get("type") == "push"]
            assert [m["id"] for m in replayed] == [sent["id"]]
            assert replayed[0]["body"] == {"session_id": sid, "text": "are you there?"}
            assert ok(a.request("unread.get"))["cs"] == 1
            assert ok(a.request("msg.ack", {"ids": [sent["id"]]}))["acked"] == 1
            reply = ok(a.request("cs.send", {"session_id": sid, "text": "yes"}))
            assert user.pushes(1)[0]["id"] == reply["id"]
        with agent(node, AGENT_A) as a:  # acked: not replayed again
            assert not [f for f in a.kept if f.get("type") == "push"]


def test_third_party_is_refused(make_node: Callable[..., Node]) -> None:
    node = chat_node(make_node)
    with (
        agent(node, AGENT_A) as a, agent(node, AGENT_B) as b,
        connect_as(node, "1") as user, connect_as(node, "2") as stranger,
    ):
        sid, got = open_and_assign(user, a, b)
        other_agent = b if got == AGENT_A else a
        for outsider in (stranger, other_agent):
            for action, data in [
                ("cs.send", {"session_id": sid, "text": "let me in"}),
                ("cs.history", {"session_id": sid}),
                ("cs.close", {"session_id": sid}),
            ]:
                reply = outsider.request(action, data)
                assert reply["code"] == 403, (action, reply)
        assert stranger.request("cs.send", {"session_id": "12345", "text": "x"})["code"] == 404
        assert stranger.request("cs.history", {"session_id": "12345"})["code"] == 404
        assert a.request("cs.open")["code"] == 403
        assert user.request("cs.sessions")["code"] == 403
        assert ok(stranger.request("cs.history", {"peer": got}))["messages"] == []


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"image": {"url": "javascript:alert(1)"}}, "image.url"),
        ({"image": {"url": "ftp://example.com/a.png"}}, "image.url"),
        ({"image": {"url": "https://"}}, "image.url"),
        ({"image": {"url": "https://example.com/" + "a" * 2048}}, "image.url"),
        ({"image": {"url": "https://exa mple.com/a.png"}}, "image.url"),
        ({"image": "https://example.com/a.png"}, "image"),
        ({"image": {"url": "https://example.com/a.png", "width": 0}}, "image.width"),
        ({"image": {"url": "https://example.com/a.png", "height": "9"}}, "image.height"),
        ({"image": {"url": "https://example.com/a.png", "alt": "x"}}, "image.alt"),
        ({"text": ""}, "text"),
        ({"text": "x" * 4001}, "text"),
        ({"text": 5}, "text"),
        ({}, "text or image"),
        ({"text": "a", "image": {"url": "https://example.com/a.png"}}, "text or image"),
    ],
)
def test_bad_message_is_400(
    make_node: Callable[..., Node], data: dict[str, Any], field: str
) -> None:
    node = chat_node(make_node)
    with agent(node, AGENT_A) as a, connect_as(node, "1") as user:
        sid, _ = open_and_assign(user, a)
        reply = user.request("cs.send", {"session_id": sid, **data})
        assert reply["code"] == 400 and reply["msg"].startswith(field), reply
        bad_id = user.request("cs.send", {"session_id": "abc", "text": "x"})
        assert bad_id["code"] == 400 and "session_id" in bad_id["msg"]
        image = {"url": "https://example.com/a.png", "width": 640, "height": 480}
        ok(user.request("cs.send", {"session_id": sid, "image": image}))
        assert a.pushes(1)[0]["body"] == {"session_id": sid, "image": image}


def test_history_newest_first_with_paging(make_node: Callable[..., Node]) -> None:
    node = chat_node(make_node)
    with agent(node, AGENT_A) as a, connect_as(node, "1") as user:
        sid, _ = open_and_assign(user, a)
        sent = []
        for n in range(7):
            sender = user if n % 2 == 0 else a
            sent.append(ok(sender.request("cs.send", {"session_id": sid, "text": f"m{n}"}))["id"])
        # By id: the two parties' socket workers make ids apart, so send order is not id order.
        newest_first = sorted(sent, key=int, reverse=True)

        def page(client: WsClient, **data: Any) -> list[str]:
            reply = ok(client.request("cs.history", data))
            return [m["id"] for m in reply["messages"]]

        assert page(user, session_id=sid) == newest_first
        assert page(a, session_id=sid, limit=3) == newest_first[:3]
        assert page(a, session_id=sid, limit=3, before=newest_first[2]) == newest_first[3:6]
        assert page(user, session_id=sid, limit=3, before=newest_first[5]) == newest_first[6:]
        assert page(user, session_id=sid, before=newest_first[-1]) == []
        assert page(a, peer="1", limit=4) == newest_first[:4]
        assert page(user, peer=AGENT_A, before=newest_first[3]) == newest_first[4:]
        full = ok(user.request("cs.history", {"session_id": sid, "limit": 1}))
        newest_text = f"m{sent.index(newest_first[0])}"
        assert full["messages"][0]["body"] == {"session_id": sid, "text": newest_text}
        assert full["session"] == {
            "session_id": sid, "user": "1", "agent": AGENT_A, "status": "open",
        }
        assert user.request("cs.history", {"session_id": sid, "limit": 101})["code"] == 400
        assert user.request("cs.history", {})["code"] == 400


def test_close_notifies_both(make_node: Callable[..., Node]) -> None:
    node = chat_node(make_node)
    with agent(node, AGENT_A) as a, connect_as(node, "1") as user:
        sid, _ = open_and_assign(user, a)
        ok(user.request("cs.send", {"session_id": sid, "text": "thanks, bye"}))
        ok(a.request("cs.close", {"session_id": sid}))
        for side in (user, a):
            assert side.next("cs.closed") == {
                "type": "cs.closed", "session_id": sid, "by": AGENT_A, "reason": "closed",
            }
        assert user.request("cs.send", {"session_id": sid, "text": "wait"})["code"] == 409
        assert user.request("cs.close", {"session_id": sid})["code"] == 409
        assert ok(a.request("cs.sessions"))["sessions"] == []
        history = ok(user.request("cs.history", {"session_id": sid}))
        assert history["session"]["status"] == "closed"
        assert [m["body"]["text"] for m in history["messages"]] == ["thanks, bye"]


def test_idle_sessions_close_by_themselves(make_node: Callable[..., Node]) -> None:
    node = chat_node(make_node, idle_seconds=2)
    with agent(node, AGENT_A) as a, connect_as(node, "1") as user:
        sid, _ = open_and_assign(user, a)
        a.quiet(1.0)
        ok(user.request("cs.send", {"session_id": sid, "text": "still here"}))
        last_activity = time.monotonic()
        for side in (user, a):
            event = side.next("cs.closed", timeout=15)
            assert event == {"type": "cs.closed", "session_id": sid, "by": None, "reason": "idle"}
        assert time.monotonic() - last_activity >= 1.9  # not before idle_seconds of silence
        assert ok(a.request("cs.sessions"))["sessions"] == []
        assert user.request("cs.send", {"session_id": sid, "text": "hello?"})["code"] == 409


def test_messages_and_sessions_reach_storage(
    make_node: Callable[..., Node], redis_prefix: str, redis_client: redis.Redis
) -> None:
    node = chat_node(make_node)
    with agent(node, AGENT_A) as a, connect_as(node, "1") as user:
        sid, _ = open_and_assign(user, a)
        ids = [
            ok(user.request("cs.send", {"session_id": sid, "text": "stored?"}))["id"],
            ok(a.request("cs.send", {"session_id": sid, "image": {"url": "http://x.test/a.png"}}))[
                "id"
            ],
        ]
        close_session(user, a, sid)
    database = node.tmp / "pmq.db"

    def rows(sql: str) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(database)) as conn:
            try:
                return list(conn.execute(sql))
            except sqlite3.OperationalError:  # tables not created yet
                return []

    stored = wait_for(
        lambda: (r := rows("SELECT id, session_id, from_uid, to_uid, body FROM pmq_cs_message"))
        and len(r) == 2 and r,
        15, "cs messages in storage",
    )
    assert sorted((str(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in stored) == sorted(
        [(ids[0], sid, "1", AGENT_A), (ids[1], sid, AGENT_A, "1")]
    )
    assert json.loads(next(r[4] for r in stored if str(r[0]) == ids[0])) == {
        "session_id": sid, "text": "stored?",
    }
    session = wait_for(
        lambda: rows("SELECT id, uid, agent, status, last_msg_id FROM pmq_cs_session"),
        15, "the closed session in storage",
    )
    assert [tuple(map(str, r)) for r in session] == [(sid, "1", AGENT_A, "closed", ids[1])]

    # Once Redis has forgotten the session, its history comes from storage.
    keys = Keys(redis_prefix)
    redis_client.delete(keys.cs_session(sid), keys.cs_history(sid), keys.cs_bodies(sid))
    with connect_as(node, "1") as user, connect_as(node, "2") as stranger:
        history = ok(user.request("cs.history", {"session_id": sid}))
        assert [m["id"] for m in history["messages"]] == ids[::-1]
        assert history["messages"][1]["body"] == {"session_id": sid, "text": "stored?"}
        assert history["session"]["status"] == "closed"
        older = ok(user.request("cs.history", {"session_id": sid, "before": ids[1]}))
        assert [m["id"] for m in older["messages"]] == ids[:1]
        assert stranger.request("cs.history", {"session_id": sid})["code"] == 403


def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_pages_are_served_on_the_client_port(make_node: Callable[..., Node]) -> None:
    node = chat_node(make_node)
    base = f"http://127.0.0.1:{node.port}"
    for path, kind in [
        ("/cs/agent.html", "text/html"), ("/cs/chat.html", "text/html"),
        ("/cs/cs.js", "text/javascript"), ("/cs/cs.css", "text/css"),
    ]:
        status, headers, body = fetch(base + path + "?token=abc")
        assert status == 200 and headers["Content-Type"].startswith(kind), (path, headers)
        assert headers["Referrer-Policy"] == "no-referrer" and body
    status, headers, body = fetch(base + "/cs/agent.html")
    assert b"agent.js" in body and "script-src 'self'" in headers["Content-Security-Policy"]
    for missing in ("/cs/", "/cs/nope.html", "/cs/../setup.cfg", "/static/cs/agent.html", "/"):
        assert fetch(base + missing)[0] == 404, missing


@contextlib.contextmanager
def engine(name: str, tmp_path: Path) -> Iterator[Store]:
    """An initialised store: SQLite in tmp_path, or a throw-away MariaDB database."""
    database = MysqlDatabase() if name == "mysql" else None
    url = database.url() if database else f"sqlite:///{tmp_path}/pmq.db"
    store = open_store(StorageConfig(url=url, shards=2))
    try:
        store.init_schema()
        yield store
    finally:
        store.close()
        if database:
            database.drop()


@pytest.mark.parametrize("name", ["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def test_store_keeps_chat_rows(name: str, tmp_path: Path) -> None:
    messages = [
        StoredCsMessage(100 + n, 7, 1 if n % 2 else 2, 2 if n % 2 else 1, f'{{"n":{n}}}', n)
        for n in range(5)
    ]
    session = StoredCsSession(7, 1, 2, "closed", 10, 20, 104)
    queued = StoredCsSession(8, 1, None, "closed", 30, 40, None)
    with engine(name, tmp_path) as store:
        assert store.write_cs(messages, [session, queued]) == 7
        assert store.write_cs(messages[:2], [session]) == 0  # a retried batch: no duplicates
        assert store.cs_session(7) == session
        assert store.cs_session(8) == queued
        assert store.cs_session(9) is None
        assert [m.id for m in store.cs_messages(7)] == [104, 103, 102, 101, 100]
        assert store.cs_messages(7, before_id=103, limit=2) == [messages[2], messages[1]]
        assert store.cs_messages(8) == []
        # By the pair, over their closed sessions: user 1 with agent 2 (session 7) only.
        assert [m.id for m in store.cs_messages_between(1, 2)] == [104, 103, 102, 101, 100]
        assert store.cs_messages_between(1, 2, before_id=102, limit=1) == [messages[1]]
        assert store.cs_messages_between(1, 3) == []


def test_an_agent_still_connected_when_redis_lost_its_data_takes_sessions_again(
    make_node: Callable[..., Node], own_redis: RedisServer, redis_prefix: str
) -> None:
    """SPEC 9: a node recovers from a Redis restarted empty without a restart. The set of
    online agents went with the rest; an agent connected across the loss is online again
    once its worker writes its route entries back (cs.open used to queue every session
    for as long as the agent stayed connected)."""
    node = make_node(redis={"url": own_redis.url}, cs={"max_sessions_per_agent": 5}).start()
    keys = Keys(redis_prefix)
    with agent(node, AGENT_A) as a:
        client = redis.Redis.from_url(own_redis.url)
        try:
            client.flushall()
            wait_for(lambda: client.hlen(keys.user_conns(AGENT_A)), 15, "the agent's route back")
            wait_for(lambda: client.sismember(keys.cs_online(), AGENT_A), 15, "the agent online")
        finally:
            client.close()
        with connect_as(node, "7101") as user:
            assert open_and_assign(user, a)[1] == AGENT_A


def test_history_with_a_peer_reads_storage_after_redis_lost_its_data(
    make_node: Callable[..., Node], own_redis: RedisServer
) -> None:
    """SPEC 9 and 6: after Redis was emptied, cs.history {"peer"} still returns the messages
    of the closed sessions storage holds, newest first, with paging (it read Redis alone
    and returned [])."""
    node = make_node(redis={"url": own_redis.url}, cs={"max_sessions_per_agent": 5}).start()
    store = open_store(StorageConfig(url=str(node.settings["storage"]["url"]), shards=4))
    try:
        with agent(node, AGENT_A) as a, connect_as(node, "7201") as user:
            sid, _ = open_and_assign(user, a)
            sent = [
                ok((user if n % 2 else a).request("cs.send", {"session_id": sid, "text": f"m{n}"}))[
                    "id"
                ]
                for n in range(6)
            ]
            close_session(user, a, sid)
        wait_for(
            lambda: store.cs_session(int(sid)) and len(store.cs_messages(int(sid))) == 6,
            30,
            "the session and its messages stored",
        )
    finally:
        store.close()
    client = redis.Redis.from_url(own_redis.url)
    try:
        client.flushall()
    finally:
        client.close()
    # By id: the two parties' socket workers make ids apart, so send order is not id order.
    newest_first = sorted(sent, key=int, reverse=True)
    with connect_as(node, "7201") as user, agent(node, AGENT_A) as a:

        def history(who: WsClient, **data: Any) -> list[str] | dict[str, Any]:
            reply = who.request("cs.history", data)  # a 503 while the node sees the loss
            return [m["id"] for m in reply["data"]["messages"]] if reply["code"] == 200 else reply

        def settles(who: WsClient, peer: str) -> None:
            seen: list[Any] = []
            found = wait_for(
                lambda: seen.append(history(who, peer=peer)) or seen[-1] == newest_first,
                15, "the history from storage",
            )
            assert found, seen[-1]

        settles(user, AGENT_A)
        settles(a, "7201")
        page = history(user, peer=AGENT_A, before=newest_first[2], limit=2)
        assert page == newest_first[3:5]

