"""End-to-end: the notification centre (docs/notification-centre.md): the feed (msg.list and
GET /api/v1/users/{uid}/messages), read state (msg.read and POST /api/v1/users/{uid}/read),
retraction and editing of messages and broadcasts, with real nodes, Redis and SQLite.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from pmq.redis.keys import Keys
from tests.helpers import REDIS_URL, Ingest, Node, WsClient, user_state, wait_for, ws_client
from tests.test_redis_loss import storage_locked

pytestmark = pytest.mark.e2e


@pytest.fixture
def node(make_node: Any) -> Node:
    started: Node = make_node().start()
    return started


@pytest.fixture
def site(node: Node) -> Iterator[Ingest]:
    ingest = Ingest(node)
    yield ingest
    ingest.close()


def send(site: Ingest, to: int, kind: str = "comment", sender: int = 5, **body: Any) -> str:
    status, reply = site.publish({"to": to, "kind": kind, "from": sender, "body": body or {"n": 1}})
    assert status == 202, reply
    return str(reply["data"]["ids"][0])


def announce(site: Ingest, group: str = "all", **body: Any) -> str:
    status, reply = site.call("POST", "/api/v1/broadcast", {"group": group, "body": body or {}})
    assert status == 202, reply
    return str(reply["data"]["id"])


def stored_ids(node: Node, uid: int) -> set[str]:
    """Ids of ``uid``'s messages in the node's SQLite store (acked or not)."""
    with sqlite3.connect(node.tmp / "pmq.db") as db:
        rows = db.execute(f"SELECT id FROM pmq_msg_{uid % 4} WHERE uid = ?", (uid,)).fetchall()
    return {str(r[0]) for r in rows}


def feed(client: WsClient, **data: Any) -> dict[str, Any]:
    reply = client.request("msg.list", data)
    assert reply["code"] == 200, reply
    return reply["data"]


def site_feed(site: Ingest, uid: int, query: str = "") -> tuple[int, Any]:
    return site.call("GET", f"/api/v1/users/{uid}/messages{query}")


def all_pages(client: WsClient, **data: Any) -> list[dict[str, Any]]:
    """Every item of the feed, page by page."""
    found: list[dict[str, Any]] = []
    before = None
    while True:
        page = feed(client, **data, **({"before": before} if before else {}))
        found += page["messages"]
        if page["next"] is None:
            return found
        assert page["next"] == page["messages"][-1]["id"]
        before = page["next"]


def read(client: WsClient, **data: Any) -> int:
    reply = client.request("msg.read", data)
    assert reply["code"] == 200, reply
    return int(reply["data"]["read"])


def test_the_feed_pages_newest_first_acked_or_not_with_the_broadcasts(
    node: Node, site: Ingest
) -> None:
    ids = [send(site, 7, kind) for kind in ("comment", "notice", "comment", "letter", "notice")]
    everyone = announce(site, text="to all")
    announce(site, "vip")  # a group user 7 is not in
    other = send(site, 8)
    with ws_client(node, 7) as client:
        client.pushes(6)
        assert client.request("msg.ack", {"ids": ids[:2]})["code"] == 200
        wait_for(lambda: set(ids) <= stored_ids(node, 7), what="the messages stored")
        newest_first = [everyone, *reversed(ids)]
        assert sorted(newest_first, key=int, reverse=True) == newest_first
        for limit in (1, 2, 3, 6, 100):
            assert [m["id"] for m in all_pages(client, limit=limit)] == newest_first
        page = feed(client, limit=2)
        assert len(page["messages"]) == 2 and page["next"] == page["messages"][1]["id"]
        assert all(m["read"] is False for m in page["messages"])
        assert page["messages"][0] == {
            **page["messages"][0], "id": everyone, "group": "all", "body": {"text": "to all"}
        }
        assert [m["id"] for m in all_pages(client, kind="notice")] == [ids[4], ids[1]]
        assert [m["id"] for m in all_pages(client, kind="system")] == [everyone]
        assert feed(client, kind="cs") == {"messages": [], "next": None}
        assert other not in [m["id"] for m in all_pages(client)]
        status, reply = site_feed(site, 7, f"?limit=3&before={ids[4]}")
        assert status == 200, reply
        assert [m["id"] for m in reply["data"]["messages"]] == [ids[3], ids[2], ids[1]]
        assert reply["data"]["next"] == ids[1]


def test_read_by_ids_kinds_and_everything_counts_exactly(node: Node, site: Ingest) -> None:
    comments = [send(site, 7, "comment") for _ in range(3)]
    notices = [send(site, 7, "notice") for _ in range(2)]
    everyone = announce(site)
    mine_not = send(site, 8)
    with ws_client(node, 7) as client:
        client.pushes(6)
        before = client.request("unread.get")["data"]
        assert read(client, ids=[comments[0], notices[0], mine_not, "123456789"]) == 2
        assert read(client, ids=[comments[0], notices[0]]) == 0
        unread = [m["id"] for m in all_pages(client, unread_only=True)]
        assert unread == [everyone, notices[1], comments[2], comments[1]]
        marks = {m["id"]: m["read"] for m in all_pages(client)}
        assert marks == {i: i in (comments[0], notices[0]) for i in [*comments, *notices, everyone]}
        assert read(client, kinds=["notice", "system"]) == 2
        assert [m["id"] for m in all_pages(client, unread_only=True)] == comments[:0:-1]
        assert feed(client, kind="notice", unread_only=True)["messages"] == []
        later = send(site, 7, "notice")
        assert [m["id"] for m in all_pages(client, kind="notice", unread_only=True)] == [later]
        status, reply = site.call("POST", "/api/v1/users/7/read", {})
        assert (status, reply["data"]) == (200, {"read": 3})
        assert read(client) == 0
        assert all_pages(client, unread_only=True) == []
        after = client.request("unread.get")["data"]
        assert after["comment"] == before["comment"] == 3 and after["system"] == 1


def test_read_state_survives_redis_losing_it(node: Node, site: Ingest) -> None:
    ids = [send(site, 7) for _ in range(3)]
    with ws_client(node, 7) as client:
        assert read(client, ids=[ids[0]]) == 1
        assert read(client, kinds=["notice"]) == 0
        assert read(client, ids=[ids[1]]) == 1
    with sqlite3.connect(node.tmp / "pmq.db") as db:
        wait_for(
            lambda: db.execute("SELECT COUNT(*) FROM pmq_read WHERE uid = 7").fetchone()[0] == 2,
            what="the read state stored",
        )
    keys = Keys(node.prefix)
    client_redis = redis.Redis.from_url(REDIS_URL)
    assert client_redis.delete(keys.reads("7"), keys.read_ids("7")) == 2
    with ws_client(node, 7) as client:
        unread = [m["id"] for m in all_pages(client, unread_only=True)]
        assert unread == [ids[2]]
        assert read(client, ids=ids) == 1


def test_a_retracted_message_leaves_everything_online_and_offline(
    node: Node, site: Ingest
) -> None:
    with ws_client(node, 7) as one, ws_client(node, 7) as two:
        kept, gone = send(site, 7), send(site, 7)
        for client in (one, two):
            assert [m["id"] for m in client.pushes(2)] == [kept, gone]
        assert user_state(node, 7)["unread"]["comment"] == 2
        assert site.call("DELETE", f"/api/v1/messages/{gone}") == (
            200, {"code": 200, "msg": "OK", "data": {"revoked": True}}
        )
        for client in (one, two):
            assert client.next("revoke") == {"type": "revoke", "id": gone}
            wait_for(lambda c=client: c.next("unread")["data"]["comment"] == 1, what="a badge")
        assert user_state(node, 7)["unread"]["comment"] == 1
        assert site.call("DELETE", f"/api/v1/messages/{gone}")[0] == 404
        assert [m["id"] for m in all_pages(one)] == [kept]
        pulled = one.request("msg.pull")["data"]["messages"]
        assert [m["id"] for m in pulled] == [kept]
    offline = send(site, 7)
    stored = send(site, 7)
    wait_for(lambda: stored in stored_ids(node, 7), what="the message stored")
    with ws_client(node, 7) as client:
        assert [m["id"] for m in client.pushes(3)] == [kept, offline, stored]
        assert client.request("msg.ack", {"ids": [stored]})["code"] == 200
    for message in (offline, stored):
        assert site.call("DELETE", f"/api/v1/messages/{message}")[0] == 200
    with ws_client(node, 7) as client:
        assert [m["id"] for m in client.pushes(1)] == [kept]
        assert [m["id"] for m in all_pages(client)] == [kept]
        assert client.quiet(0.3) == []
    assert site.call("DELETE", "/api/v1/messages/123456789")[0] == 404


def test_a_retracted_broadcast_leaves_everyone(node: Node, site: Ingest) -> None:
    kept = announce(site, n=1)
    gone = announce(site, n=2)
    with ws_client(node, 7) as seven, ws_client(node, 8) as eight:
        for client in (seven, eight):
            assert [m["id"] for m in client.pushes(2)] == [kept, gone]
        assert user_state(node, 7)["unread"]["system"] == 2
        status, reply = site.call("DELETE", f"/api/v1/broadcast/{gone}")
        assert (status, reply["data"]) == (200, {"revoked": True})
        for client in (seven, eight):
            assert client.next("revoke") == {"type": "revoke", "id": gone}
            wait_for(lambda c=client: c.next("unread")["data"]["system"] == 1, what="a badge")
        assert user_state(node, 8)["unread"]["system"] == 1
        assert [m["id"] for m in all_pages(seven)] == [kept]
        assert site.call("DELETE", f"/api/v1/broadcast/{gone}")[0] == 404
        assert site.call("DELETE", f"/api/v1/messages/{kept}")[0] == 404  # not a message
    with ws_client(node, 9) as client:
        assert [m["id"] for m in client.pushes(1)] == [kept]
        assert client.quiet(0.3) == []


def test_an_edit_reaches_connections_lists_and_replays(node: Node, site: Ingest) -> None:
    offline = send(site, 7, text="old")
    with ws_client(node, 8) as client:
        online = send(site, 8, text="old")
        assert client.pushes(1)[0]["body"] == {"text": "old"}
        status, reply = site.call("PATCH", f"/api/v1/messages/{online}", {"body": {"text": "new"}})
        assert status == 200, reply
        update = client.next("update")
        assert update["msg"] == {**reply["data"]["msg"], "id": online, "body": {"text": "new"}}
        assert all_pages(client)[0]["body"] == {"text": "new"}
    assert site.call("PATCH", f"/api/v1/messages/{offline}", {"body": {"v": 2}})[0] == 200
    with ws_client(node, 7) as client:
        assert client.pushes(1)[0]["body"] == {"v": 2}
        assert all_pages(client)[0]["body"] == {"v": 2}
    assert site.call("PATCH", "/api/v1/messages/123456789", {"body": {}})[0] == 404
    status, reply = site.call("PATCH", f"/api/v1/messages/{offline}", {"body": [1]})
    assert (status, reply["msg"]) == (400, "body: must be a JSON object")


def test_retractions_and_edits_reach_replays_from_storage(make_node: Any) -> None:
    """Messages the sweep moved to storage: the connect's replay reads them there."""
    node = make_node(inbox={"hot_seconds": 1, "sweep_seconds": 1}).start()
    site = Ingest(node)
    kept, edited, gone = send(site, 7), send(site, 7, v=1), send(site, 7)
    keys = Keys(node.prefix)
    hot = redis.Redis.from_url(REDIS_URL)
    wait_for(lambda: hot.zcard(keys.inbox("7")) == 0, timeout=30, what="the sweep")
    assert site.call("PATCH", f"/api/v1/messages/{edited}", {"body": {"v": 2}})[0] == 200
    assert site.call("DELETE", f"/api/v1/messages/{gone}")[0] == 200
    with ws_client(node, 7) as client:
        replayed = client.pushes(2)
        assert [(m["id"], m["body"]) for m in replayed] == [(kept, {"n": 1}), (edited, {"v": 2})]
        assert client.quiet(0.3) == []
        assert [m["id"] for m in all_pages(client)] == [edited, kept]
    site.close()


def test_bad_input_is_a_clear_400_never_a_500(node: Node, site: Ingest) -> None:
    with ws_client(node, 7) as client:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"limit": 0}, "limit: must be an integer from 1 to 100"),
            ({"limit": 101}, "limit: must be an integer from 1 to 100"),
            ({"before": "abc"}, "before: must be the id of a message of this user's feed"),
            ({"before": "123456789"}, "before: must be the id of a message of this user's feed"),
            ({"unread_only": "yes"}, "unread_only: must be true or false"),
            ({"kind": "Bad Kind"}, 'kind: must match [a-z_]{1,32}, e.g. "comment"'),
        ]
        for data, msg in cases:
            reply = client.request("msg.list", data)
            assert (reply["code"], reply["msg"].split(" (")[0]) == (400, msg), data
        fields: list[tuple[dict[str, Any], str]] = [
            ({"ids": "1"}, "ids"),
            ({"ids": []}, "ids"),
            ({"ids": [1.5]}, "ids"),
            ({"ids": ["x"]}, "ids"),
            ({"kinds": "comment"}, "kinds"),
            ({"kinds": ["Comment"]}, "kinds"),
            ({"kinds": []}, "kinds"),
            ({"ids": [], "kinds": ["comment"]}, "ids, kinds"),
            ({"id": ["1"]}, "id"),  # misspelt: not "everything"
        ]
        for data, field in fields:
            reply = client.request("msg.read", data)
            assert reply["code"] == 400 and reply["msg"].startswith(f"{field}: "), (data, reply)
    for query, field in [
        ("?limit=500", "limit"),
        ("?before=-1", "before"),
        ("?unread_only=maybe", "unread_only"),
        ("?kind=%20", "kind"),
    ]:
        status, reply = site_feed(site, 7, query)
        assert status == 400 and reply["msg"].startswith(f"{field}: "), (query, reply)
    assert site_feed(site, 0)[0] == 400
    for ids in ({"a": 1}, []):
        status, reply = site.call("POST", "/api/v1/users/7/read", {"ids": ids})
        assert status == 400 and reply["msg"].startswith("ids: "), (ids, reply)
    assert site.call("POST", "/api/v1/users/7/read", [1])[0] == 400
    status, reply = site.call("POST", "/api/v1/users/7/read", {"uids": [5]})
    assert status == 400 and reply["msg"].startswith("uids: unknown field"), reply
    for path in ("/api/v1/messages/abc", "/api/v1/broadcast/0", "/api/v1/messages/99999999999"):
        assert site.call("DELETE", path)[0] == 404, path


def test_a_message_retracted_during_a_replay_never_comes_after_its_revoke(
    node: Node, site: Ingest
) -> None:
    ids = [send(site, 7, n=n) for n in range(300)]
    with ws_client(node, 7, sync=False) as client:
        for gone in (ids[-1], ids[150], ids[0]):
            assert site.call("DELETE", f"/api/v1/messages/{gone}")[0] == 200
        frames: list[dict[str, Any]] = []

        def revoked() -> bool:
            frames.extend(client.quiet(0.2))
            return sum(f["type"] == "revoke" for f in frames) == 3

        wait_for(revoked, what="the three revoke frames")
        frames += client.quiet(1.0)  # anything that would still come after them
    for gone in (ids[-1], ids[150], ids[0]):
        order = [f["type"] for f in frames if gone in (f.get("id"), f.get("msg", {}).get("id"))]
        assert order in (["revoke"], ["push", "revoke"]), (gone, order)
    pushed = [f["msg"]["id"] for f in frames if f["type"] == "push"]
    assert len(pushed) == len(set(pushed)) and set(ids) - {ids[-1], ids[150], ids[0]} <= set(pushed)


def test_a_retraction_racing_an_ack_leaves_no_trace(node: Node, site: Ingest) -> None:
    with ws_client(node, 7) as client, ThreadPoolExecutor(2) as pool:
        ids = [send(site, 7) for _ in range(20)]
        client.pushes(20)
        for message in ids:
            ack = {"id": message, "action": "msg.ack", "data": {"ids": [message]}}
            client.ws.send(json.dumps(ack))
            deleted = pool.submit(site.call, "DELETE", f"/api/v1/messages/{message}")
            assert deleted.result()[0] == 200
        assert all_pages(client) == []
    with ws_client(node, 7) as client:
        assert client.quiet(0.3) == []
        assert all_pages(client) == []
    with sqlite3.connect(node.tmp / "pmq.db") as db:
        wait_for(
            lambda: db.execute(
                "SELECT COUNT(*) FROM pmq_msg_3 WHERE uid = 7 AND revoked = 1"
            ).fetchone()[0] == 20,
            what="the tombstones stored",
        )
        assert db.execute("SELECT COUNT(*) FROM pmq_msg_3 WHERE revoked = 0").fetchone()[0] == 0


def test_pages_go_on_past_rows_retracted_before_storage_has_it(node: Node, site: Ingest) -> None:
    ids = [send(site, 7, n=n) for n in range(12)]
    with ws_client(node, 7) as client:
        client.pushes(12)
        assert client.request("msg.ack", {"ids": ids})["data"] == {"acked": 12}
        wait_for(lambda: set(ids) <= stored_ids(node, 7), what="the messages stored")
        with storage_locked(node):  # the retractions wait on the queue: Redis amends them
            for gone in ids[2:]:
                assert site.call("DELETE", f"/api/v1/messages/{gone}")[0] == 200
            assert [m["id"] for m in all_pages(client, limit=2)] == [ids[1], ids[0]]


def test_revoke_and_update_reach_the_user_on_every_node(make_node: Any) -> None:
    a = make_node().start()
    b = make_node(storage={"url": a.settings["storage"]["url"]}).start()
    site_a, site_b = Ingest(a), Ingest(b)
    with ws_client(a, 7) as one, ws_client(b, 7) as two:
        message = send(site_a, 7, text="old")
        for client in (one, two):
            assert client.pushes(1)[0]["id"] == message
        status, reply = site_b.call("PATCH", f"/api/v1/messages/{message}", {"body": {"v": 2}})
        assert status == 200, reply
        for client in (one, two):
            assert client.next("update")["msg"]["body"] == {"v": 2}
        assert site_a.call("DELETE", f"/api/v1/messages/{message}")[0] == 200
        for client in (one, two):
            assert client.next("revoke")["id"] == message
        assert site_b.call("DELETE", f"/api/v1/messages/{message}")[0] == 404
    site_a.close()
    site_b.close()


def test_a_message_acked_before_storage_had_it_stays_in_the_feed(node: Node, site: Ingest) -> None:
    keys = Keys(node.prefix)
    hot = redis.Redis.from_url(REDIS_URL)
    with ws_client(node, 7) as client:
        with storage_locked(node):  # nothing reaches storage meanwhile
            ids = [send(site, 7, n=n) for n in range(3)]
            client.pushes(3)
            assert client.request("msg.ack", {"ids": ids})["data"] == {"acked": 3}
            assert [m["id"] for m in all_pages(client)] == ids[::-1]
            assert site.call("PATCH", f"/api/v1/messages/{ids[1]}", {"body": {"v": 2}})[0] == 200
            assert site.call("DELETE", f"/api/v1/messages/{ids[0]}")[0] == 200
            assert [(m["id"], m["body"]) for m in all_pages(client)] == [
                (ids[2], {"n": 2}), (ids[1], {"v": 2})
            ]
        wait_for(lambda: not hot.exists(keys.acked_unstored("7")), what="the writer to have them")
        assert [(m["id"], m["body"]) for m in all_pages(client)] == [
            (ids[2], {"n": 2}), (ids[1], {"v": 2})
        ]
