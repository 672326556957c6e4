"""pmq.client, PMQ's Python asyncio client, against a real node (docs/client-python.md).

Each scenario runs on its own event loop; the site publishes from a thread
(:func:`publish`), so the client keeps reading meanwhile. A client reads its messages into
a list (:class:`Reader`); a test that must show nothing more came publishes a marker last
and waits for it: whatever came before it was read first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import psutil
import pytest
from websockets.asyncio.server import ServerConnection, serve

from pmq.client import Backoff, Client, ConnectionLost, RequestError, RequestTimeout, Stopped
from pmq.client.seen import Seen
from tests.helpers import Ingest, Node, TcpProxy, connections_of, wait_for_async

pytestmark = pytest.mark.e2e

QUICK = Backoff(base=0.05, cap=0.2)  # reconnects within a test's patience
NEVER = 3600.0  # an ack_delay that never passes within a test


def publish(node: Node, uid: int, n: int = 0, key: str | None = None) -> str:
    """One notice to ``uid`` from the site, retried (same key) until the node takes it;
    the message's id."""
    body: dict[str, Any] = {"to": uid, "kind": "notice", "body": {"n": n}}
    if key is not None:
        body["id"] = key
    site = Ingest(node)
    try:
        for _ in range(100):
            try:
                status, reply = site.publish(body)
            except OSError:  # the worker holding the site's connection was killed
                continue
            if status < 500:
                assert status in (200, 202), reply
                return str(reply["data"]["ids"][0])
        pytest.fail(f"the node never took message {n}")
    finally:
        site.close()


async def publish_async(node: Node, uid: int, n: int = 0, key: str | None = None) -> str:
    return await asyncio.to_thread(publish, node, uid, n, key)


class Reader:
    """A task reading ``client.messages()`` into ``got`` (ids, in order)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.got: list[str] = []
        self.task = asyncio.create_task(self.read())

    async def read(self) -> None:
        async for message in self.client.messages():
            self.got.append(message["id"])

    async def until(self, count: int, what: str = "messages") -> list[str]:
        await wait_for_async(lambda: len(self.got) >= count, 20, f"{count} {what}")
        return self.got


@contextlib.asynccontextmanager
async def started(client: Client) -> AsyncIterator[Client]:
    async with asyncio.timeout(20):
        await client.start()
    try:
        yield client
    finally:
        await client.close()


def token_source(node: Node, uid: int) -> tuple[Callable[[], Any], list[str]]:
    """A token callback minting a fresh token per call, and the list of what it gave."""
    given: list[str] = []

    async def token() -> str:
        given.append(node.token(uid))
        return given[-1]

    return token, given


def holder_of(node: Node) -> int:
    """The pid of the socket worker holding the one client connection of the test."""
    for worker in node.workers():
        for conn in psutil.Process(worker["pid"]).net_connections("tcp"):
            if conn.laddr.port == node.port and conn.status == psutil.CONN_ESTABLISHED:
                return int(worker["pid"])
    pytest.fail("no socket worker holds the client's connection")


# The back-off policy and the bounded memory of ids --------------------------------------


class Bounds(random.Random):
    """An rng whose uniform(a, b) answers ``b`` (``top``) or ``a``, recording its calls."""

    def __init__(self, top: bool) -> None:
        super().__init__(0)
        self.top = top
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return b if self.top else a


def test_backoff_windows_double_to_the_cap_with_full_jitter():
    policy = Backoff(base=0.5, cap=10.0)
    assert [policy.window(n) for n in range(7)] == [0.5, 1, 2, 4, 8, 10, 10]
    assert policy.window(100_000) == 10  # no overflow however long a node stays away
    top, bottom = Bounds(top=True), Bounds(top=False)
    assert [policy.delay(n, top) for n in range(7)] == [0.5, 1, 2, 4, 8, 10, 10]
    assert [policy.delay(n, bottom) for n in range(7)] == [0] * 7  # full jitter: from 0
    assert top.calls == [(0, w) for w in [0.5, 1, 2, 4, 8, 10, 10]]
    rng = random.Random(7)
    delays = [policy.delay(n % 8, rng) for n in range(2000)]
    assert all(0 <= d <= policy.window(n % 8) for n, d in enumerate(delays))
    assert min(delays) < 0.1 and max(delays) > 9  # spread over the whole window
    assert Backoff() == Backoff(base=0.5, cap=10.0)  # the policy bench.storm measured


def test_seen_drops_repeats_and_forgets_the_oldest_beyond_its_size():
    seen = Seen(3)
    assert [seen.add(i) for i in "abca"] == [True, True, True, False]
    assert seen.add("d") and len(seen) == 3  # "b", the least recently seen, is forgotten
    assert seen.add("b") and not seen.add("a") and not seen.add("d")


# Delivery across reconnects ------------------------------------------------------------


def test_a_message_published_while_disconnected_arrives_once_after_the_reconnect(make_node):
    node = make_node().start()
    proxy = TcpProxy("127.0.0.1", node.port)

    async def scenario() -> None:
        client = Client(f"ws://127.0.0.1:{proxy.port}/ws", node.token(7), backoff=QUICK,
                        ack_delay=NEVER)  # nothing acked: the reconnect replays everything
        async with started(client):
            reader = Reader(client)
            first = await publish_async(node, 7, 1)
            await reader.until(1)
            proxy.cut()
            await wait_for_async(lambda: not client.connected, 10, "the client to see the cut")
            second = await publish_async(node, 7, 2)  # while nobody can connect
            proxy.restore()
            await reader.until(2)
            await client.ping()  # on the new connection: its replay has come before
            marker = await publish_async(node, 7, 3)
            await reader.until(3)
            assert reader.got == [first, second, marker]

    try:
        asyncio.run(scenario())
    finally:
        proxy.close()


@pytest.mark.timeout(120)
def test_kill9_of_the_socket_worker_loses_nothing_and_delivers_nothing_twice(make_node):
    node = make_node().start()
    half = 100

    async def scenario() -> None:
        token, given = token_source(node, 7)
        # No ack leaves before the end: everything delivered before the kill is replayed.
        client = Client(node.ws_url, token, backoff=QUICK, ack_delay=NEVER, ack_batch=1000)
        hellos: list[dict[str, Any]] = []
        client.on("connected", hellos.append)
        async with started(client):
            reader = Reader(client)
            accepted = [await publish_async(node, 7, n, f"k{n}") for n in range(half)]
            await reader.until(half)
            victim = holder_of(node)
            os.kill(victim, signal.SIGKILL)
            accepted += [await publish_async(node, 7, n, f"k{n}") for n in range(half, 2 * half)]
            await reader.until(2 * half)
            await wait_for_async(lambda: len(hellos) == 2, 30, "the client to reconnect")
            await client.ping()
            accepted.append(await publish_async(node, 7, 2 * half, "marker"))
            await reader.until(2 * half + 1)
            assert len(given) == 2 and hellos[0]["conn_id"] != hellos[1]["conn_id"]
            assert len(reader.got) == 2 * half + 1  # nothing twice
            assert set(reader.got) == set(accepted)  # nothing lost
            assert reader.got[-1] == accepted[-1]  # and nothing after the marker
        assert victim not in {w["pid"] for w in node.workers()}

    asyncio.run(scenario())


def test_the_rest_of_a_long_inbox_is_pulled_after_the_replay_says_more(make_node):
    node = make_node(inbox={"replay_max": 5}).start()
    waiting = [publish(node, 7, n) for n in range(12)]

    async def scenario() -> None:
        async with started(Client(node.ws_url, node.token(7), ack_delay=NEVER)) as client:
            reader = Reader(client)
            await reader.until(12)
            marker = await publish_async(node, 7, 12)
            await reader.until(13)
            assert sorted(reader.got[:-1]) == sorted(waiting) and reader.got[-1] == marker

    asyncio.run(scenario())


# Acks ----------------------------------------------------------------------------------


def counting_acks(client: Client) -> list[list[str]]:
    """The ids of every msg.ack the client sends from now on, one list per frame."""
    sent: list[list[str]] = []
    request = client.request

    async def counted(action: str, data: Any = None, timeout: float | None = None) -> Any:
        if action == "msg.ack":
            sent.append(list(data["ids"]))
        return await request(action, data, timeout)

    client.request = counted  # type: ignore[method-assign]
    return sent


def test_acks_reach_the_server_in_batches(make_node):
    node = make_node().start()

    async def scenario() -> None:
        client = Client(node.ws_url, node.token(7), ack_batch=10, ack_delay=NEVER)
        sent = counting_acks(client)
        async with started(client):
            reader = Reader(client)
            for n in range(50):
                await publish_async(node, 7, n)
            got = await reader.until(50)

            async def inbox_empty() -> bool:
                return not (await client.pull())["messages"]

            await wait_for_async(inbox_empty, 20, "the inbox to empty")
            assert len(sent) == 5 and all(len(ids) == 10 for ids in sent)
            assert sorted(i for ids in sent for i in ids) == sorted(got)

    asyncio.run(scenario())


def test_an_ack_leaves_after_ack_delay_without_a_full_batch(make_node):
    node = make_node().start()

    async def scenario() -> None:
        client = Client(node.ws_url, node.token(7), ack_batch=1000, ack_delay=0.05)
        sent = counting_acks(client)
        async with started(client):
            reader = Reader(client)
            await publish_async(node, 7)
            [got] = await reader.until(1)

            async def inbox_empty() -> bool:
                return not (await client.pull())["messages"]

            await wait_for_async(inbox_empty, 20, "the inbox to empty")
            assert sent == [[got]]

    asyncio.run(scenario())


def test_close_sends_the_acks_still_waiting(make_node):
    node = make_node().start()

    async def scenario() -> None:
        async with started(Client(node.ws_url, node.token(7), ack_delay=NEVER)) as client:
            reader = Reader(client)
            await publish_async(node, 7)
            await reader.until(1)
        async with started(Client(node.ws_url, node.token(7))) as again:
            assert (await again.pull())["messages"] == []  # acked, so not replayed either

    asyncio.run(scenario())


# Stops, tokens ---------------------------------------------------------------------------


def test_a_kick_stops_the_client_and_says_why(make_node):
    node = make_node().start()

    async def scenario() -> None:
        token, given = token_source(node, 7)
        client = Client(node.ws_url, token, backoff=QUICK)
        stops: list[Stopped] = []
        client.on("stopped", stops.append)
        async with started(client):
            site = Ingest(node)
            status, reply = await asyncio.to_thread(
                site.call, "POST", "/api/v1/users/7/kick", {"reason": "logged out"}
            )
            site.close()
            assert status == 200 and reply["data"]["closed"] == 1, reply
            with pytest.raises(Stopped) as stopped:
                async for _ in client.messages():
                    pass
            assert (stopped.value.code, stopped.value.reason) == (4001, "logged out")
            assert client.stopped is stopped.value and stops == [stopped.value]
            assert not client.connected and len(given) == 1  # no reconnect
            with pytest.raises(Stopped):
                await client.ping()
        assert await asyncio.to_thread(connections_of, node, 7) == 0

    asyncio.run(scenario())


def test_a_newer_connection_over_the_users_bound_stops_the_older_client(make_node):
    node = make_node(server={"max_connections_per_user": 1}).start()

    async def scenario() -> None:
        async with (
            started(Client(node.ws_url, node.token(7), backoff=QUICK)) as older,
            started(Client(node.ws_url, node.token(7), backoff=QUICK)) as newer,
        ):
            await wait_for_async(lambda: older.stopped, 10, "the older client to stop")
            assert older.stopped is not None and older.stopped.code == 4008
            await newer.ping()  # not closed by the older one coming back
            assert newer.connected and newer.stopped is None

    asyncio.run(scenario())


def test_a_refused_token_stops_the_client(make_node):
    node = make_node().start()

    async def scenario() -> None:
        calls: list[int] = []

        async def token() -> str:
            calls.append(1)
            return "not-a-token"

        client = Client(node.ws_url, token, backoff=QUICK)
        with pytest.raises(Stopped) as stopped:
            async with asyncio.timeout(20):
                await client.start()
        assert stopped.value.code == 401 and client.stopped is stopped.value
        assert "token" in stopped.value.reason  # the handshake's answer
        assert calls == [1]
        with pytest.raises(Stopped):
            await client.ping()
        await client.close()

    asyncio.run(scenario())


def test_the_token_callback_is_called_again_before_a_reconnect(make_node):
    node = make_node().start()
    proxy = TcpProxy("127.0.0.1", node.port)

    async def scenario() -> None:
        token, given = token_source(node, 7)
        client = Client(f"ws://127.0.0.1:{proxy.port}/ws", token, backoff=QUICK)
        hellos: list[dict[str, Any]] = []
        client.on("connected", hellos.append)
        async with started(client):
            assert len(given) == 1
            proxy.cut()
            await wait_for_async(lambda: not client.connected, 10, "the client to see the cut")
            proxy.restore()
            await wait_for_async(lambda: len(hellos) == 2, 20, "the reconnect")
            assert len(given) >= 2  # one call before each connect

    try:
        asyncio.run(scenario())
    finally:
        proxy.close()


def test_a_plain_function_may_give_the_token(make_node):
    node = make_node().start()
    calls: list[str] = []

    def token() -> str:
        calls.append(node.token(7))
        return calls[-1]

    async def scenario() -> None:
        async with started(Client(node.ws_url, token)) as client:
            assert isinstance((await client.ping())["ts"], int)
            assert len(calls) == 1

    asyncio.run(scenario())


# Requests --------------------------------------------------------------------------------


def test_requests_answer_their_data_or_raise_the_code(make_node):
    node = make_node().start()

    async def scenario() -> None:
        async with started(Client(node.ws_url, node.token(7))) as client:
            assert isinstance((await client.ping())["ts"], int)
            with pytest.raises(RequestError) as unknown:
                await client.request("no.such")
            assert unknown.value.code == 404
            with pytest.raises(RequestError) as forbidden:
                await client.cs_sessions()  # for agents only
            assert forbidden.value.code == 403 and "agents" in forbidden.value.msg
            with pytest.raises(RequestError) as bad:
                await client.pull(limit=1000)
            assert bad.value.code == 400 and "limit" in bad.value.msg

    asyncio.run(scenario())


def test_unread_counters_follow_the_server(make_node):
    node = make_node().start()

    async def scenario() -> None:
        async with started(Client(node.ws_url, node.token(7))) as client:
            seen: list[dict[str, int]] = []
            client.on("unread", seen.append)
            await publish_async(node, 7)
            await wait_for_async(lambda: client.unread.get("notice") == 1, 10, "the badge")
            assert seen[-1] == client.unread and client.unread["total"] == 1
            assert (await client.unread_clear(["notice"]))["cleared"] == ["notice"]
            await wait_for_async(lambda: client.unread.get("notice") == 0, 10, "the cleared badge")
            assert (await client.unread_get())["total"] == 0 == client.unread["total"]

    asyncio.run(scenario())


def test_the_counters_are_read_after_every_hello(make_node):
    """A connect brings no unread frame and a replay no badge: counters that moved while
    the client was away are read after each hello."""
    node = make_node().start()
    proxy = TcpProxy("127.0.0.1", node.port)

    async def scenario() -> None:
        await publish_async(node, 7, 1)
        await publish_async(node, 7, 2)
        client = Client(f"ws://127.0.0.1:{proxy.port}/ws", node.token(7), backoff=QUICK)
        async with started(client):
            reader = Reader(client)
            await reader.until(2)
            await wait_for_async(lambda: client.unread.get("notice") == 2, 10, "the counters")
            proxy.cut()
            await wait_for_async(lambda: not client.connected, 10, "the client to see the cut")
            await publish_async(node, 7, 3)  # while away: no badge reaches the client
            proxy.restore()
            await reader.until(3)
            await wait_for_async(lambda: client.unread.get("notice") == 3, 10, "the new counters")

    try:
        asyncio.run(scenario())
    finally:
        proxy.close()


def test_a_request_times_out_or_fails_when_the_connection_is_lost():
    """Against a server that says hello and answers nothing: "drop" closes with 1011."""

    async def handler(ws: ServerConnection) -> None:
        await ws.send('{"type":"hello","conn_id":"c","uid":"7","heartbeat":25}')
        async for frame in ws:
            if '"drop"' in str(frame):
                await ws.close(1011, "going down")

    async def scenario() -> None:
        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            client = Client(f"ws://127.0.0.1:{port}/ws", "t", backoff=QUICK)
            lost: list[ConnectionLost] = []
            client.on("disconnected", lost.append)
            async with started(client):
                with pytest.raises(RequestTimeout) as late:
                    await client.request("ping", timeout=0.2)
                assert isinstance(late.value, TimeoutError)
                with pytest.raises(ConnectionLost) as gone:
                    await client.request("drop")
                assert (gone.value.code, gone.value.reason) == (1011, "going down")
                await wait_for_async(lambda: lost, 10, "the disconnected event")
                assert lost[0].code == 1011

    asyncio.run(scenario())


def test_an_unread_frame_that_overtakes_the_hellos_read_is_kept():
    """The server can read the counters for unread.get's reply before a change it pushes
    first: the frame then arrives before the older reply, which must not undo it."""
    counts = {"notice": 0, "total": 0}
    newer = {"notice": 1, "total": 1}

    async def handler(ws: ServerConnection) -> None:
        await ws.send('{"type":"hello","conn_id":"c","uid":"7","heartbeat":25}')
        async for frame in ws:
            request = json.loads(frame)
            if request["action"] == "unread.get":
                reply = {"type": "reply", "id": request["id"], "code": 200, "data": counts}
                await ws.send(json.dumps({"type": "unread", "data": newer}))
                await ws.send(json.dumps({**reply, "msg": "OK"}))

    async def scenario() -> None:
        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            async with started(Client(f"ws://127.0.0.1:{port}/ws", "t")) as client:
                await wait_for_async(lambda: client.unread == newer, 10, "the newer counters")
                assert await client.unread_get() == counts  # the reply itself, as answered
                assert client.unread == newer

    asyncio.run(scenario())


def test_the_notification_centre_and_retractions_through_the_client(make_node):
    node = make_node().start()

    async def scenario() -> None:
        async with started(Client(node.ws_url, node.token(7))) as client:
            events: list[dict[str, Any]] = []
            client.on("revoke", events.append)
            client.on("update", events.append)
            reader = Reader(client)
            ids = [await publish_async(node, 7, n) for n in range(3)]
            await reader.until(3)
            page = await client.list(kind="notice")
            assert [m["id"] for m in page["messages"]] == sorted(ids, key=int, reverse=True)
            assert not any(m["read"] for m in page["messages"])
            assert (await client.read(ids=[ids[0]]))["read"] == 1
            unread = await client.list(unread_only=True)
            assert sorted(m["id"] for m in unread["messages"]) == sorted(ids[1:])
            site = Ingest(node)
            try:
                status, _ = await asyncio.to_thread(
                    site.call, "PATCH", f"/api/v1/messages/{ids[1]}", {"body": {"n": 9}}
                )
                assert status == 200
                status, _ = await asyncio.to_thread(
                    site.call, "DELETE", f"/api/v1/messages/{ids[2]}"
                )
                assert status == 200
            finally:
                site.close()
            await wait_for_async(lambda: len(events) == 2, 10, "the update and revoke events")
            assert events[0]["type"] == "update" and events[0]["msg"]["body"] == {"n": 9}
            assert events[1] == {"type": "revoke", "id": ids[2]}
            assert (await client.read())["read"] == 1  # the one left unread, not the revoked

    asyncio.run(scenario())
