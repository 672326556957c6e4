"""Events to the site (docs/webhooks.md), end to end: real nodes POSTing to a receiver the test
runs (bench.receiver), which checks every signature."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from bench.receiver import Receiver
from tests.helpers import REDIS_URL, Ingest, Node, wait_for, ws_client
from tests.test_chat import agent, connect_as, ok
from tests.test_metrics import scrape, value
from tests.test_redis_cluster import (  # noqa: F401 - redis_cluster: a fixture
    RedisClusterServers,
    cluster_node,
    redis_cluster,
)

pytestmark = pytest.mark.e2e

HOOK_SECRET = "webhook-secret-" + "w" * 32


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    site = Receiver(HOOK_SECRET)
    yield site
    site.close()


def hooked(make_node: Callable[..., Node], site: Receiver, **hooks: Any) -> Node:
    """A node sending its events to ``site``: short grace and timers, quick retries."""
    settings = {
        "url": site.url, "secret": HOOK_SECRET, "offline_grace": 1, "undelivered_after": 2,
        "timeout": 2, "max_backoff": 1, **hooks,
    }
    return make_node(webhooks=settings)


def publish(site: Ingest, to: str, kind: str = "notice") -> str:
    status, reply = site.publish({"to": to, "kind": kind, "body": {"text": "hi"}})
    assert status == 202, reply
    return str(reply["data"]["ids"][0])


def test_each_event_type_arrives_signed_with_its_data(
    make_node: Callable[..., Node], receiver: Receiver
) -> None:
    node = hooked(make_node, receiver).start()
    ingest = Ingest(node)
    try:
        with ws_client(node, 21) as user:
            receiver.wait(lambda: receiver.of("user.online", uid="21"), "user.online")
            acked = publish(ingest, "21")
            assert user.next("push")["msg"]["id"] == acked
            assert ok(user.request("msg.ack", {"ids": [acked]})) == {"acked": 1}
            receiver.wait(lambda: receiver.of("message.acked", uid="21"), "message.acked")
            assert receiver.of("message.acked")[0]["data"] == {"uid": "21", "ids": [acked]}
            assert ok(user.request("msg.read", {"ids": [acked]})) == {"read": 1}
            receiver.wait(lambda: receiver.of("message.read"), "message.read")
            assert receiver.of("message.read")[0]["data"] == {"uid": "21", "ids": [acked]}
            unread = publish(ingest, "21")
            assert user.next("push")["msg"]["id"] == unread
            assert ok(user.request("msg.ack", {"ids": [unread]})) == {"acked": 1}
            # Only the ids that turned read, as the reply counts them.
            assert ok(user.request("msg.read", {"ids": [acked, unread]})) == {"read": 1}
            receiver.wait(lambda: len(receiver.of("message.read")) == 2, "message.read")
            assert receiver.of("message.read")[1]["data"] == {"uid": "21", "ids": [unread]}
            unacked = publish(ingest, "22", "comment")  # 22 never connects
            receiver.wait(lambda: receiver.of("message.undelivered"), "message.undelivered")
            assert receiver.of("message.undelivered") == [
                {**receiver.of("message.undelivered")[0],
                 "data": {"uid": "22", "id": unacked, "kind": "comment"}}
            ]  # none for the acked message, whose timer fell due first
        receiver.wait(lambda: receiver.of("user.offline", uid="21"), "user.offline")
        with agent(node, "9101") as helper, connect_as(node, "23") as customer:
            session = ok(customer.request("cs.open"))
            helper.next("cs.assigned")
            ok(customer.request("cs.close", {"session_id": session["session_id"]}))
            expected = {"session_id": session["session_id"], "user": "23", "agent": "9101"}
            receiver.wait(lambda: receiver.of("cs.closed"), "cs.closed")
            assert [e["data"] for e in receiver.of("cs.assigned")] == [expected]
            assert [e["data"] for e in receiver.of("cs.closed")] == [expected]
    finally:
        ingest.close()
    assert receiver.bad_signatures == 0
    for event in receiver.events:
        assert set(event) == {"id", "type", "ts", "data"} and isinstance(event["ts"], int)
    assert len({e["id"] for e in receiver.events}) == len(receiver.events)


def test_online_and_offline_across_two_nodes_and_a_node_killed(
    make_node: Callable[..., Node], receiver: Receiver
) -> None:
    first, second = hooked(make_node, receiver).start(), hooked(make_node, receiver).start()
    with ws_client(first, 31), ws_client(second, 32):
        with ws_client(first, 33), ws_client(second, 33):
            receiver.wait(
                lambda: all(receiver.of("user.online", uid=u) for u in ("31", "32", "33")),
                "three users online",
            )
        receiver.wait(lambda: receiver.of("user.offline", uid="33"), "33 offline")
        # One user.online for 33, though two nodes held a connection of theirs at once.
        assert len(receiver.of("user.online", uid="33")) == 1
        second.kill_all()  # kill -9 of every process of the node: no departure is seen
        receiver.wait(lambda: receiver.of("user.offline", uid="32"), "32 offline", timeout=60)
        assert not receiver.of("user.offline", uid="31")
    receiver.wait(lambda: receiver.of("user.offline", uid="31"), "31 offline")
    assert receiver.bad_signatures == 0


def test_a_killed_node_that_held_the_webhook_leases_delays_user_offline_only_seconds(
    make_node: Callable[..., Node], receiver: Receiver
) -> None:
    """SPEC 12: a node's death counts for user.offline. Here the dead node's task worker
    held every bucket's lease; leases are short and renewed during a POST, so the survivor
    serves the buckets within seconds. A lease made to outlive the longest POST (25 s at the
    default webhooks.timeout of 10 s) held every event of the cluster back that long. What
    the wait below allows: the route entries' expiry (3 heartbeats of 2 s), one look an
    interval, the grace (1 s) and a lease (3 s), with room; not the old 25 s."""
    first = hooked(make_node, receiver, timeout=10).start()
    with ws_client(first, 61):
        receiver.wait(lambda: receiver.of("user.online", uid="61"), "61 online")
        second = hooked(make_node, receiver, timeout=10).start()
        killed_at = time.monotonic()
        first.kill_all()
        receiver.wait(lambda: receiver.of("user.offline", uid="61"), "61 offline", timeout=60)
        waited = time.monotonic() - killed_at
    assert waited < 20, waited
    assert second.status() is not None


def test_a_quick_reconnect_sends_no_offline(
    make_node: Callable[..., Node], receiver: Receiver
) -> None:
    node = hooked(make_node, receiver, offline_grace=5).start()
    with ws_client(node, 41):
        receiver.wait(lambda: receiver.of("user.online", uid="41"), "user.online")
    with ws_client(node, 41), ws_client(node, 42):
        receiver.wait(lambda: receiver.of("user.online", uid="42"), "42 online")
    receiver.wait(lambda: receiver.of("user.offline", uid="41"), "41 offline")
    assert len(receiver.of("user.online", uid="41")) == 1
    assert len(receiver.of("user.offline", uid="41")) == 1


def test_a_failing_site_gets_every_event_once_it_answers_in_order_per_user(
    make_node: Callable[..., Node], receiver: Receiver
) -> None:
    node = hooked(make_node, receiver, events=["message.acked"], batch=3).start()
    receiver.status = 500
    ingest = Ingest(node)
    expected: dict[str, list[str]] = {"51": [], "52": []}
    try:
        with ws_client(node, 51) as one, ws_client(node, 52) as two:
            for _ in range(6):
                for uid, client in (("51", one), ("52", two)):
                    message = publish(ingest, uid)
                    client.next("push")
                    ok(client.request("msg.ack", {"ids": [message]}))
                    expected[uid].append(message)
            wait_for(lambda: receiver.posts >= 3, 30, "a few failed POSTs")
            assert receiver.events == []
            wait_for(
                lambda: re.search(r"webhooks 12\b", status := node.ctl("status").stdout)
                and re.search(r"webhooks: 0 events delivered, [1-9]\d* POSTs failed", status),
                15, "the waiting events and the failures in pmqctl status",
            )
            receiver.status = 200
            receiver.wait(
                lambda: all(acked_ids(receiver, u) == ids for u, ids in expected.items()),
                "every event, in order per user",
            )
            wait_for(
                lambda: re.search(r"webhooks 0\b", node.ctl("status").stdout), 15,
                "an empty outbox in pmqctl status",
            )
            wait_for(
                lambda: value(samples := scrape(node), "pmq_webhook_events_total",
                              result="delivered") == 12
                and value(samples, "pmq_webhook_failures_total") >= 3
                and value(samples, "pmq_webhook_delivery_seconds_count") == 12,
                15, "the deliveries and failures in /metrics",
            )
    finally:
        ingest.close()
    assert receiver.bad_signatures == 0


def acked_ids(site: Receiver, uid: str) -> list[str]:
    """The message ids of the user's message.acked events in the order they came, an
    event sent again (at least once) counted once."""
    events = {e["id"]: e for e in site.of("message.acked", uid=uid)}  # first arrival's place
    return [i for e in events.values() for i in e["data"]["ids"]]


def test_a_site_that_hangs_never_holds_publishing_or_delivery_back(
    make_node: Callable[..., Node], receiver: Receiver
) -> None:
    node = hooked(make_node, receiver, timeout=30).start()
    receiver.gate.clear()  # every POST hangs until the gate opens
    ingest = Ingest(node)
    try:
        with ws_client(node, 61) as user:
            wait_for(lambda: receiver.arrived, 10, "a POST held by the site")
            for _ in range(20):
                message = publish(ingest, "61")  # 202, while the site holds the POST
                assert user.next("push")["msg"]["id"] == message
                assert ok(user.request("msg.ack", {"ids": [message]})) == {"acked": 1}
            with ws_client(node, 62):
                pass
            assert receiver.events == []
            receiver.gate.set()
            receiver.wait(lambda: len(receiver.of("message.acked", uid="61")) == 20, "the acks")
    finally:
        ingest.close()


def test_without_a_url_nothing_is_kept_for_the_site(make_node: Callable[..., Node]) -> None:
    node = make_node().start()
    ingest = Ingest(node)
    try:
        with ws_client(node, 71) as user:
            message = publish(ingest, "71")
            user.next("push")
            ok(user.request("msg.ack", {"ids": [message]}))
        publish(ingest, "72")
    finally:
        ingest.close()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert list(client.scan_iter(f"{node.prefix}*hooks*")) == []
    finally:
        client.close()


def test_a_task_worker_killed_during_its_post_leaves_the_events_to_the_next(
    make_node: Callable[..., Node], receiver: Receiver
) -> None:
    node = hooked(make_node, receiver).start()
    receiver.gate.clear()
    with ws_client(node, 81):
        wait_for(lambda: receiver.arrived, 10, "the user.online POST, held by the site")
        [killed] = [w["pid"] for w in node.workers("task")]
        os.kill(killed, signal.SIGKILL)
        wait_for(
            lambda: [w["pid"] for w in node.workers("task") if w["ready"]] not in ([], [killed]),
            30, "a new task worker",
        )
        receiver.status = 500  # the dead worker's POST is answered, and not taken
        receiver.gate.set()
        wait_for(lambda: receiver.posts, 10, "the dead worker's POST answered")
        receiver.status = 200
        receiver.wait(lambda: receiver.of("user.online", uid="81"), "user.online, sent again")
    assert len(receiver.of("user.online", uid="81")) == 1


def test_users_still_connected_when_redis_lost_everything_go_offline_when_they_leave(
    make_node: Callable[..., Node], receiver: Receiver
) -> None:
    node = hooked(make_node, receiver).start()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        with ws_client(node, 91):
            receiver.wait(lambda: receiver.of("user.online", uid="91"), "user.online")
            client.delete(*client.scan_iter(f"{node.prefix}*"))  # Redis emptied
            receiver.wait(lambda: len(receiver.of("user.online", uid="91")) == 2, "online again")
        receiver.wait(lambda: receiver.of("user.offline", uid="91"), "user.offline")
    finally:
        client.close()


def test_undelivered_timers_and_waiting_events_survive_a_restart_of_the_node(
    make_node: Callable[..., Node], receiver: Receiver
) -> None:
    node = hooked(make_node, receiver, undelivered_after=3).start()
    receiver.status = 500  # the user.online waits in the outbox
    ingest = Ingest(node)
    try:
        with ws_client(node, 95):
            wait_for(lambda: receiver.posts, 10, "a refused POST")
        message = publish(ingest, "96")
    finally:
        ingest.close()
    node.signal(signal.SIGTERM)
    assert node.wait_exit() == 0
    receiver.status = 200
    node.start()
    receiver.wait(lambda: receiver.of("message.undelivered", id=message), "the undelivered")
    assert receiver.of("user.online", uid="95") and receiver.of("user.offline", uid="95")


def test_events_on_a_redis_cluster(
    tmp_path: Path, redis_cluster: RedisClusterServers, receiver: Receiver  # noqa: F811
) -> None:
    """Users of many buckets (32, over three masters): every script names keys of its slot,
    each bucket's outbox is sent."""
    hooks = {"url": receiver.url, "secret": HOOK_SECRET, "offline_grace": 1}
    node = cluster_node(
        tmp_path, redis_cluster, "pmqh:", 0, webhooks={**hooks, "undelivered_after": 2}
    ).start()
    ingest = Ingest(node)
    users = [str(uid) for uid in range(200, 240)]
    try:
        with contextlib.ExitStack() as stack:
            clients = [stack.enter_context(ws_client(node, uid)) for uid in users]
            receiver.wait(lambda: all(receiver.of("user.online", uid=u) for u in users), "online")
            for uid, client in zip(users, clients, strict=True):
                message = publish(ingest, uid)
                client.next("push")
                ok(client.request("msg.ack", {"ids": [message]}))
            unacked = publish(ingest, "300")
        receiver.wait(lambda: all(receiver.of("user.offline", uid=u) for u in users), "offline")
        receiver.wait(lambda: receiver.of("message.undelivered", id=unacked), "undelivered")
        assert {e["data"]["uid"] for e in receiver.of("message.acked")} == set(users)
        assert len(receiver.of("message.undelivered")) == 1
    finally:
        ingest.close()
        node.kill_all()
    assert receiver.bad_signatures == 0
