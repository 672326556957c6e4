"""Per-user bounds (issue 15): connections per user across nodes, cs.open per hour, kinds per
unread.clear, and a connect's replay and every inbox read paged. Real nodes and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosed

from pmq.domain.ids import IdGenerator
from pmq.domain.inbox import Inbox
from pmq.domain.unread import Unread
from pmq.redis.keys import Keys
from tests.helpers import REDIS_URL, Ingest, Node, WsClient, connections_of, wait_for, ws_client

pytestmark = pytest.mark.e2e

MAX_CONNECTIONS = 32  # server.max_connections_per_user's default
MAX_OPENS = 30  # cs.max_opens_per_hour's default
REPLAY_MAX = 1000  # inbox.replay_max's default


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply["code"] == 200, reply
    return reply["data"]  # type: ignore[no-any-return]


def next_millisecond() -> None:
    """Wait for the clock to pass a millisecond: connection ids made before and after it
    sort by time (they carry the millisecond they were made in)."""
    start = int(time.time() * 1000)
    wait_for(lambda: int(time.time() * 1000) > start, 1, "the next millisecond")


def test_a_connection_over_the_bound_closes_the_oldest_one_on_another_node(
    make_node: Callable[..., Node],
) -> None:
    """The bound is the user's, cluster-wide: the 33rd connection, on node B, closes the
    user's oldest one, held on node A, with 4008; the other 32 stay open."""
    node_a, node_b = make_node().start(), make_node().start()
    with contextlib.ExitStack() as stack:
        oldest = stack.enter_context(ws_client(node_a, 7))
        next_millisecond()
        others = [
            stack.enter_context(ws_client(node_a if n % 2 else node_b, 7))
            for n in range(MAX_CONNECTIONS - 1)
        ]
        assert connections_of(node_a, 7) == MAX_CONNECTIONS
        assert oldest.request("ping")["code"] == 200  # at the bound: nobody closed yet

        newest = stack.enter_context(ws_client(node_b, 7))
        with pytest.raises(ConnectionClosed) as closed:
            while True:  # frames before the close (none expected) are skipped
                oldest.ws.recv(timeout=5)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4008, "too many connections")
        for client in [*others, newest]:
            assert client.request("ping")["code"] == 200
        wait_for(lambda: connections_of(node_b, 7) == MAX_CONNECTIONS, 5, "32 connections")


def open_session(user: WsClient) -> dict[str, Any]:
    return user.request("cs.open")


def test_cs_open_beyond_the_hourly_bound_is_429(make_node: Callable[..., Node]) -> None:
    """30 open/close pairs, then the 31st new session is refused; asking again for the
    session that is still open never counts."""
    node = make_node(server={"rate": 1000}).start()  # 61 requests at once: no 429 for those
    with ws_client(node, 7) as user:
        for n in range(MAX_OPENS):
            session = ok(open_session(user))
            if n == MAX_OPENS - 1:  # the user's open session again: the same, not counted
                assert ok(open_session(user))["session_id"] == session["session_id"]
            ok(user.request("cs.close", {"session_id": session["session_id"]}))
        refused = open_session(user)
        assert refused["code"] == 429, refused
        assert "cs.open" in refused["msg"] and str(MAX_OPENS) in refused["msg"]
    with ws_client(node, 8) as other:  # the bound is per user
        ok(open_session(other))


def kind_names(count: int) -> list[str]:
    """``count`` distinct kind names of three letters."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    names = ("".join(t) for t in itertools.product(letters, repeat=3))
    return list(itertools.islice(names, count))


def test_unread_clear_takes_at_most_32_kinds(make_node: Callable[..., Node]) -> None:
    node = make_node().start()
    with ws_client(node, 7) as user:
        assert sorted(ok(user.request("unread.clear", {"kinds": kind_names(32)}))["cleared"]) == (
            kind_names(32)
        )
        for count in (33, 9000):
            reply = user.request("unread.clear", {"kinds": kind_names(count)})
            assert reply["code"] == 400, (count, reply)
            assert reply["msg"].startswith("kinds: at most 32"), reply
        assert ok(user.request("ping"))  # the connection stays


def test_msg_ack_takes_at_most_1000_ids(make_node: Callable[..., Node]) -> None:
    """The other list a client sends has its bound too (it had one before issue 15)."""
    node = make_node().start()
    with ws_client(node, 7) as user:
        assert ok(user.request("msg.ack", {"ids": [str(n) for n in range(1, 1001)]})) == {
            "acked": 0
        }
        reply = user.request("msg.ack", {"ids": [str(n) for n in range(1, 1002)]})
        assert reply["code"] == 400 and reply["msg"] == "ids: at most 1000 per request", reply


@pytest.fixture
def site(make_node: Callable[..., Node]) -> Iterator[tuple[Node, Callable[[], Ingest]]]:
    node = make_node().start()
    made: list[Ingest] = []

    def ingest() -> Ingest:
        made.append(Ingest(node))
        return made[-1]

    yield node, ingest
    for client in made:
        client.close()


def test_a_full_inbox_replays_its_oldest_1000_and_pages_the_rest(
    site: tuple[Node, Callable[[], Ingest]],
) -> None:
    """1,250 waiting messages: the connect replays the oldest 1,000 and says where the rest
    begin (``inbox.more``); msg.pull pages through the other 250, at most 200 a read."""
    node, ingest = site

    def publish_some(first: int) -> list[str]:
        client = ingest()
        ids = []
        for n in range(first, first + 250):
            status, reply = client.publish({"to": 7, "kind": "letter", "body": {"n": n}})
            assert status == 202, reply
            ids.append(reply["data"]["ids"][0])
        return ids

    with ThreadPoolExecutor(5) as pool:
        batches = pool.map(publish_some, range(0, 1250, 250))
    ids = sorted((i for some in batches for i in some), key=int)
    assert len(set(ids)) == 1250
    with ws_client(node, 7) as user:
        frames = list(user.kept)
        pushes = [f["msg"]["id"] for f in frames if f["type"] == "push"]
        assert pushes == ids[:REPLAY_MAX]
        assert frames[-1] == {"type": "inbox.more", "after": ids[REPLAY_MAX - 1]}
        pages = []
        after = frames[-1]["after"]
        while True:
            page = [m["id"] for m in ok(user.request("msg.pull", {"after": after}))["messages"]]
            if not page:
                break
            pages.append(page)
            after = page[-1]
        assert [len(page) for page in pages] == [200, 50]
        assert [i for page in pages for i in page] == ids[REPLAY_MAX:]
        # Acked down to a page: the next connect replays it all and says nothing more.
        for start in range(0, 1200, 600):
            ok(user.request("msg.ack", {"ids": ids[start : start + 600]}))
    with ws_client(node, 7) as user:
        assert [f["type"] for f in user.kept] == ["push"] * 50


def test_an_inbox_look_reads_one_page_from_redis(redis_prefix: str) -> None:
    """The ids a look takes from Redis are one page (LIMIT), not the whole hot inbox, also
    paging from an id whose millisecond holds several of the user's messages."""

    async def scenario() -> None:
        client = aioredis.Redis.from_url(REDIS_URL)
        keys = Keys(redis_prefix)
        inbox = Inbox(client, keys, IdGenerator(1), 86400, 3600)
        try:
            ids = [
                int((await inbox.publish(["7"], "notice", None, {"n": n})).ids[0])
                for n in range(300)
            ]
            for after, limit in ((0, 10), (ids[4], 10), (ids[150], 200)):
                pipe = client.pipeline(transaction=False)
                read = inbox.look_on(pipe, "7", after, limit)
                replies = await pipe.execute()
                read_ids = [i for reply in replies[:-2] for i in reply]
                same_ms = len(replies[0]) if after else 0  # after's millisecond, whole
                assert len(read_ids) <= limit + same_ms
                look = read(iter(replies))
                assert look.hot_ids == [i for i in ids if i > after][:limit]
            pulled = await inbox.pending("7", None, ids[-3], 200)
            assert [int(m["id"]) for m in pulled] == ids[-2:]
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_clearing_thousands_of_kinds_at_once_works_in_redis(redis_prefix: str) -> None:
    """The domain clears any number of kinds (the site may add many, and a clear of all
    names each one): one HDEL per thousand, not one unpack() of all."""

    async def scenario() -> None:
        client = aioredis.Redis.from_url(REDIS_URL)
        keys = Keys(redis_prefix)
        try:
            kinds = kind_names(9000)
            await client.hset(keys.unread("7"), mapping=dict.fromkeys(kinds, 1))
            assert await Unread(client, keys, 3600).clear("7", None)
            assert await client.hlen(keys.unread("7")) == 0
        finally:
            await client.aclose()

    asyncio.run(scenario())
