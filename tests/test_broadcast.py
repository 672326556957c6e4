"""End-to-end: broadcasts to everyone and to groups (docs/protocol.md, "Broadcasts")."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Sequence
from typing import Any

import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect

from pmq.domain.auth import Identity
from pmq.reactor import fanout
from pmq.reactor.connections import Client, ConnectionTable
from pmq.redis.keys import Keys
from pmq.wire.client import ID_PREFIX
from tests.helpers import REDIS_URL, Ingest, Node, wait_for, ws_client
from tests.test_relay_gap import Socket

pytestmark = pytest.mark.e2e


def broadcast(
    node: Node, body: dict[str, Any], group: str = "all", **extra: Any
) -> tuple[int, Any]:
    ingest = Ingest(node)
    try:
        return ingest.call("POST", "/api/v1/broadcast", {"group": group, "body": body, **extra})
    finally:
        ingest.close()


async def open_clients(
    node: Node, uids: Sequence[int], groups: tuple[str, ...] = ()
) -> list[ClientConnection]:
    async def one(uid: int) -> ClientConnection:
        ws = await connect(f"{node.ws_url}?token={node.token(uid, groups)}", open_timeout=10)
        hello = json.loads(await ws.recv())
        assert hello["type"] == "hello"
        # The reply comes after the replay: a broadcast sent later cannot also be replayed
        # (delivery is at-least-once, so one sent during a replay may come twice).
        await ws.send('{"id": "sync", "action": "ping"}')
        while json.loads(await ws.recv()).get("id") != "sync":
            pass
        return ws

    return list(await asyncio.gather(*(one(uid) for uid in uids)))


async def next_push(ws: ClientConnection, timeout: float = 10) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "push":
                return frame["msg"]  # type: ignore[no-any-return]


async def quiet(ws: ClientConnection, seconds: float) -> list[dict[str, Any]]:
    """The push frames that arrive within ``seconds``."""
    pushes = []
    try:
        async with asyncio.timeout(seconds):
            while True:
                frame = json.loads(await ws.recv())
                if frame["type"] == "push":
                    pushes.append(frame["msg"])
    except TimeoutError:
        pass
    return pushes


def held_by_both_workers(node: Node, total: int) -> bool:
    counts = [w.get("connections", 0) for w in node.workers("socket")]
    return len(counts) == 2 and min(counts) > 0 and sum(counts) == total


def test_broadcast_reaches_every_connection_on_both_workers(make_node):
    node = make_node().start()

    async def scenario() -> None:
        clients = await open_clients(node, range(1000, 1200))
        wait_for(lambda: held_by_both_workers(node, 200), 10, "200 clients over both workers")
        status, reply = await asyncio.to_thread(broadcast, node, {"text": "maintenance at 2"})
        assert status == 202
        pushes = await asyncio.gather(*(next_push(ws) for ws in clients))
        assert {p["id"] for p in pushes} == {reply["data"]["id"]}
        assert all(
            p["kind"] == "system" and p["body"] == {"text": "maintenance at 2"} for p in pushes
        )
        await asyncio.gather(*(ws.close() for ws in clients))

    asyncio.run(scenario())


# What anything publishing on the broadcast channel might send that is not a broadcast.
GARBAGE = [
    b"all\n" + ID_PREFIX + b'not-a-number"}}',  # a push frame whose id is no number
    b"all\n" + ID_PREFIX + b"12345",  # cut off inside its id
    b"all\n" + ID_PREFIX + b"9" * 5000 + b'"}}',  # more digits than int() reads
    b"\xff\xfe\n{}",  # a group that is not UTF-8
    b"no newline at all",
    b"",
]


def test_garbage_on_the_broadcast_channel_is_dropped_and_fan_out_goes_on(make_node):
    node = make_node().start()
    pids = sorted(w["pid"] for w in node.workers("socket"))
    channel = Keys(node.prefix).broadcast_channel()

    async def scenario() -> None:
        clients = await open_clients(node, range(4000, 4020))
        wait_for(lambda: held_by_both_workers(node, 20), 10, "20 clients over both workers")
        with redis.Redis.from_url(REDIS_URL) as client:
            for garbage in GARBAGE:
                assert client.spublish(channel, garbage) == 2  # heard by both socket workers
        status, reply = await asyncio.to_thread(broadcast, node, {"text": "after the garbage"})
        assert status == 202
        pushes = await asyncio.gather(*(next_push(ws) for ws in clients))
        assert {p["id"] for p in pushes} == {reply["data"]["id"]}
        await asyncio.gather(*(ws.close() for ws in clients))

    asyncio.run(scenario())
    assert sorted(w["pid"] for w in node.workers("socket")) == pids
    assert node.log().count("dropped a malformed broadcast message") == 2 * len(GARBAGE)


def test_group_broadcast_reaches_members_only(make_node):
    node = make_node().start()

    async def scenario() -> None:
        authors = await open_clients(node, range(2000, 2010), ("author",))
        others = await open_clients(node, range(3000, 3010), ("reader",))
        status, reply = await asyncio.to_thread(broadcast, node, {"text": "authors only"}, "author")
        assert status == 202
        pushes = await asyncio.gather(*(next_push(ws) for ws in authors))
        assert {p["id"] for p in pushes} == {reply["data"]["id"]}
        assert pushes[0]["group"] == "author"
        leaked = await asyncio.gather(*(quiet(ws, 0.5) for ws in others))
        assert not any(leaked)
        await asyncio.gather(*(ws.close() for ws in authors + others))

    asyncio.run(scenario())


def test_same_id_is_a_duplicate_and_a_different_id_is_sent(make_node):
    node = make_node().start()

    async def scenario() -> None:
        [ws] = await open_clients(node, [4000])
        first = await asyncio.to_thread(broadcast, node, {"text": "a"}, id="release-1")
        again = await asyncio.to_thread(broadcast, node, {"text": "a"}, id="release-1")
        other = await asyncio.to_thread(broadcast, node, {"text": "a"}, id="release-2")
        assert first[0] == 202 and other[0] == 202
        assert again[0] == 200 and again[1]["data"]["duplicate"] is True
        assert again[1]["data"]["id"] == first[1]["data"]["id"]
        pushes = await quiet(ws, 1.5)
        assert sorted(p["id"] for p in pushes) == sorted(
            [first[1]["data"]["id"], other[1]["data"]["id"]]
        )
        await ws.close()

    asyncio.run(scenario())


def test_without_an_id_the_same_body_is_sent_again(make_node):
    """SPEC 5: only a repeat of the same key (the request's ``id``) is a duplicate; a site
    that announces the same thing twice without one gets two broadcasts. The old site's
    system-message form, which carries no id, is still deduplicated by its body."""
    node = make_node().start()
    first, again = broadcast(node, {"text": "same"}), broadcast(node, {"text": "same"})
    assert first[0] == again[0] == 202
    assert first[1]["data"]["id"] != again[1]["data"]["id"]
    ingest = Ingest(node)
    try:
        form = {"msg": json.dumps({"title": "seed twice"})}
        sent = ingest.call("POST", "/api/system/message", form=form)
        repeated = ingest.call("POST", "/api/system/message", form=form)
    finally:
        ingest.close()
    assert sent[0] == 202
    assert repeated[0] == 200 and repeated[1]["data"] == {"id": sent[1]["data"]["id"],
                                                          "duplicate": True}


def test_acking_another_groups_broadcast_leaves_the_users_own_to_replay(make_node):
    """SPEC 4: acks of broadcasts move the user's watermark over the broadcasts to the
    user's groups. An id of a broadcast to another group is no such ack: it used to move the
    watermark past the user's own unacked broadcast, which no connect replayed after."""
    node = make_node().start()
    own = broadcast(node, {"text": "for g"}, "g")[1]["data"]["id"]
    other = broadcast(node, {"text": "for h"}, "h")[1]["data"]["id"]
    with ws_client(node, 5200, groups=("g",)) as client:
        assert {f["msg"]["id"] for f in client.kept if f.get("type") == "push"} == {own}
        assert client.request("msg.ack", {"ids": [other]})["data"]["acked"] == 0
    with ws_client(node, 5200, groups=("g",)) as client:
        assert {f["msg"]["id"] for f in client.kept if f.get("type") == "push"} == {own}


def test_offline_user_gets_it_later_with_system_unread(make_node):
    node = make_node().start()
    status, reply = broadcast(node, {"text": "while you were away"})
    assert status == 202
    with ws_client(node, 5000) as client:
        # Replayed; and when the task worker fans it out only after this connect, also
        # pushed live: clients drop the duplicate by id, as docs/protocol.md says.
        [push] = {f["msg"]["id"]: f["msg"] for f in client.kept if f.get("type") == "push"}.values()
        assert push["id"] == reply["data"]["id"]
        assert client.request("unread.get")["data"]["system"] == 1
        cleared = client.request("unread.clear", {"kinds": ["system"]})
        assert cleared["data"]["cleared"] == ["system"]
        assert client.request("unread.get")["data"]["system"] == 0
        assert client.request("msg.ack", {"ids": [push["id"]]})["data"]["acked"] == 1
    with ws_client(node, 5000) as client:  # acked: no replay; still pullable on demand
        assert not [f for f in client.kept if f.get("type") == "push"]
        pulled = client.request("msg.pull", {"kind": "system"})["data"]["messages"]
        assert [m["id"] for m in pulled] == [reply["data"]["id"]]


def test_seed_system_message_alias(make_node):
    node = make_node().start()
    with ws_client(node, 5100) as client:
        ingest = Ingest(node)
        status, reply = ingest.call(
            "POST", "/api/system/message", form={"msg": json.dumps({"title": "seed"})}
        )
        ingest.close()
        assert status == 202
        push = client.next("push")["msg"]
        assert push["id"] == reply["data"]["id"] and push["body"] == {"title": "seed"}


def test_bad_broadcasts_name_the_field(make_node):
    node = make_node().start()
    ingest = Ingest(node)
    for body, field in (
        ({"body": {}}, "group"),
        ({"group": "a b", "body": {}}, "group"),
        ({"group": "all", "kind": "Sys", "body": {}}, "kind"),
        ({"group": "all", "body": "text"}, "body"),
        ({"group": "all", "body": {}, "id": ""}, "id"),
    ):
        status, reply = ingest.call("POST", "/api/v1/broadcast", body)
        assert status == 400 and reply["msg"].startswith(field), (body, reply)
    ingest.close()


CLIENTS = 2000


def raw_client(node: Node, uid: int) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads: it costs the
    test process nothing while the node writes to it."""
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    sock.sendall(
        f"GET /ws?token={node.token(uid)} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    received = b""
    while b'"hello"' not in received:  # hello comes after the registry entry is written
        chunk = sock.recv(4096)
        assert chunk, "connection closed during the handshake"
        received += chunk
    return sock


def test_worker_busy_fanning_out_still_answers_ping(make_node):
    """Pings sent while broadcasts are written to 2,000 clients that never read are each
    answered, and every broadcast reaches every connection. How long the pings wait and how
    long a worker's loop stalls meanwhile is measured by bench.fanout_ping."""
    # The idle clients never answer pings: keep the heartbeat from closing them meanwhile.
    node = make_node(
        server={"max_pending": 4 * 1024 * 1024}, heartbeat={"interval": 60, "timeout": 120}
    ).start()
    idle = [raw_client(node, 10000 + i) for i in range(CLIENTS)]
    wait_for(lambda: held_by_both_workers(node, CLIENTS), 20, "the clients over both workers")
    with ws_client(node, 9999) as pinger:
        body = {"text": "x" * 2000}
        for n in range(5):
            assert broadcast(node, body, id=f"load-{n}")[0] == 202
            for _ in range(20):  # half a second at 40 pings/s: under server.rate (50)
                assert pinger.request("ping", timeout=5)["code"] == 200
                time.sleep(0.025)
    wait_for(
        lambda: sum(w.get("broadcast_deliveries", 0) for w in node.workers()) >= 5 * (CLIENTS + 1),
        20,
        "every broadcast to reach every connection",
    )
    for sock in idle:
        sock.close()


class NoBadges:
    """The unread pusher of a fan-out that counts no badges."""

    def changed(self, uid: str) -> None:
        pass


def test_a_fan_out_lets_other_tasks_run_between_its_slices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What keeps a busy worker answering pings: the fan-out writes its connections in
    slices and yields to the loop between them, so a task ready when it begins runs before
    its last write (a slice is CHECK_EVERY writes here, whatever the clock says)."""
    monkeypatch.setattr(fanout, "SLICE_SECONDS", 0.0)
    sockets = [Socket() for _ in range(4 * fanout.CHECK_EVERY)]

    async def scenario() -> tuple[int, int]:
        table = ConnectionTable()
        for n, sock in enumerate(sockets):
            table.add(Client(sock, f"c{n}", Identity(str(n)), 1 << 20, 50))  # type: ignore[arg-type]
        written: list[int] = []

        async def ping() -> None:
            written.append(sum(1 for sock in sockets if sock.written))

        task = asyncio.create_task(ping())
        frame = ID_PREFIX + b'42","kind":"system","body":{}}}'
        delivered = await fanout.Fanout(table, NoBadges()).deliver("all", frame)  # type: ignore[arg-type]
        await task
        return written[0], delivered

    written_before_ping, delivered = asyncio.run(scenario())
    assert delivered == len(sockets)
    assert 0 < written_before_ping < len(sockets)
