"""What an open connection keeps in a socket worker, and the heap freezer (pmq.workers.heap)
that relies on connections dying by reference count."""

from __future__ import annotations

import asyncio
import gc
import socket
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop
from redis.exceptions import ConnectionError as RedisConnectionError
from websockets.asyncio.client import connect

from pmq.config import Config
from pmq.domain.auth import Identity
from pmq.handlers.base import App as HandlerApp
from pmq.handlers.base import Caller, Handler
from pmq.handlers.system import ACTIONS
from pmq.reactor.connections import Client, ConnectionTable
from pmq.reactor.gateway import Gateway
from pmq.reactor.websocket import Connection
from pmq.workers.heap import freeze_survivors, reclaim
from tests.helpers import wait_for_async


class Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def collector() -> Iterator[None]:
    """Leave the test process's collector as it was found."""
    yield
    gc.set_debug(0)
    gc.garbage.clear()
    gc.unfreeze()
    gc.enable()


def test_frozen_objects_are_skipped_until_reclaimed(collector: None) -> None:
    cycle = Cycle()
    alive = weakref.ref(cycle)
    freeze_survivors()
    assert gc.get_freeze_count() > 0
    del cycle
    gc.collect()
    assert alive() is not None  # frozen: even a full collection leaves it
    assert reclaim() >= 1
    assert alive() is None
    assert gc.get_freeze_count() > 0  # and what lives is frozen again


def test_freezing_first_collects_young_garbage(collector: None) -> None:
    cycle = Cycle()
    alive = weakref.ref(cycle)
    del cycle
    freeze_survivors()
    assert alive() is None


class Authenticator:
    async def authenticate(self, token: str) -> Identity:
        return Identity(token, ("author",))

    async def close(self) -> None:
        pass


class App:
    config = Config()


async def redis_gone(app: HandlerApp, caller: Caller, data: dict[str, Any]) -> dict[str, Any]:
    """An action whose Redis reads fail under asyncio.gather, as unread.get's do
    (pmq.domain.unread.Unread.counts_many) while Redis is away or its pool has no free
    connection."""

    async def read() -> None:  # redis-py's BlockingConnectionPool.get_connection, in short
        try:
            async with asyncio.timeout(0):
                await asyncio.sleep(1)
        except TimeoutError as err:
            raise RedisConnectionError("No connection available.") from err

    await asyncio.gather(read(), read())
    return {}


HANDLERS: dict[str, Handler] = {**ACTIONS, "redis_gone": redis_gone}


async def start_gateway() -> tuple[Gateway, ConnectionTable, int, list[Client]]:
    """A real gateway on a free port: (it, its table, the port, the clients it opened)."""
    table = ConnectionTable()
    opened: list[Client] = []

    async def on_open(client: Client) -> None:
        opened.append(client)

    async def on_close(client: Client) -> None:
        pass

    def handlers() -> dict[str, Handler]:
        return HANDLERS

    gateway = Gateway(
        App(),
        table,
        Authenticator(),
        handlers,
        on_open,
        on_close,  # type: ignore[arg-type]
        on_close,  # on_leaving: nothing to do before a close completes
    )
    await gateway.start("127.0.0.1", 0)
    assert gateway.server is not None
    return gateway, table, gateway.server.sockets[0].getsockname()[1], opened


async def raw_upgrade(port: int, uid: int, key: bool = True) -> bytes:
    """Upgrade over a bare socket (no client library: its own objects would count) and
    return the reply's head; the socket is then closed without a close frame. ``key=False``
    leaves out Sec-WebSocket-Key, which picows refuses (400) after the gateway took the
    token."""
    loop = asyncio.get_running_loop()
    key_header = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" if key else ""
    with socket.socket() as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(
            sock,
            f"GET /ws?token={uid} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\n{key_header}Sec-WebSocket-Version: 13\r\n\r\n".encode(),
        )
        reply = b""
        while b"\r\n\r\n" not in reply and (chunk := await loop.sock_recv(sock, 4096)):
            reply += chunk
    return reply


async def drop_one(port: int, uid: int) -> None:
    """An upgrade whose peer then vanishes without a close frame, as a phone losing its
    network does."""
    assert (await raw_upgrade(port, uid)).startswith(b"HTTP/1.1 101")


async def refused_upgrade(port: int, uid: int) -> None:
    """A good token with upgrade headers picows refuses: a 400 after the token check."""
    reply = await raw_upgrade(port, uid, key=False)
    assert reply.startswith(b"HTTP/1.1 400"), reply


async def objects_after_refused_upgrades(count: int) -> int:
    """Connections and clients left (with the collector off) by ``count`` upgrades refused
    after the token check."""
    gateway, _, port, opened = await start_gateway()
    await refused_upgrade(port, 1)
    gc.collect()
    gc.disable()
    for uid in range(2, count + 2):
        await refused_upgrade(port, uid)
    left = sum(1 for o in gc.get_objects() if type(o) in (Client, Connection))
    assert not opened
    await stop(gateway)
    return left


def test_upgrades_refused_after_the_token_check_leave_nothing(collector: None) -> None:
    """picows checks the upgrade's headers only after the gateway took the token: nothing
    made for the connection may outlive a refusal (nor wait for the collector)."""
    assert uvloop.run(objects_after_refused_upgrades(50)) == 0


async def use(port: int, uid: int, drop: bool = False, action: str = "ping") -> None:
    """One connection of ``uid``: one ``action`` and a close, or (``drop``) abandoned."""
    if drop:
        await drop_one(port, uid)
        return
    async with connect(f"ws://127.0.0.1:{port}/ws?token={uid}") as ws:
        await ws.send(f'{{"id": "p", "action": "{action}", "data": {{}}}}')
        reply = str(await ws.recv())
        assert '"code":200' in reply if action == "ping" else '"code":503' in reply


async def churn(connections: int, drop: bool = False, action: str = "ping") -> int:
    """Open, use (one ``action``) and close (with ``drop``: abandon) ``connections`` clients
    through the real gateway with the collector off; returns how many objects a full
    collection then finds in cycles."""
    gateway, table, port, opened = await start_gateway()
    await use(port, 1, drop, action)  # one-time objects (caches, the server's) come first
    await wait_for_async(lambda: len(opened) == 1 and not len(table), 5, "the first to end")
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    opened.clear()
    for uid in range(2, connections + 2):
        await use(port, uid, drop, action)
    await wait_for_async(
        lambda: len(opened) == connections and not len(table), 5, "every connection to end"
    )
    assert len(opened) == connections
    opened.clear()
    found = gc.collect()
    await stop(gateway)
    return found


async def stop(gateway: Gateway) -> None:
    assert gateway.server is not None
    gateway.close()
    await gateway.server.wait_closed()


def test_closed_connections_leave_no_cycles(collector: None) -> None:
    """Frozen objects are only freed by refcount: a closed connection must need no more, or
    every connection would leak once frozen. 200 connections leave less than one object."""
    found = uvloop.run(churn(200))
    assert found < 200, [type(o).__name__ for o in gc.garbage][:50]


def test_dropped_connections_leave_no_cycles(collector: None) -> None:
    """A peer gone without a close frame: its connection must still die by refcount. 200
    of them leave less than one object."""
    found = uvloop.run(churn(200, drop=True))
    assert found < 200, [type(o).__name__ for o in gc.garbage][:50]


async def connections_left(connections: int, drop: bool = False) -> int:
    """How many connection objects outlive ``connections`` closed (with ``drop``:
    abandoned) connections while the collector is off: those only a collection would free."""
    gateway, table, port, opened = await start_gateway()
    await use(port, 1, drop)
    await wait_for_async(lambda: len(opened) == 1 and not len(table), 5, "the first to end")
    gc.collect()
    gc.disable()
    opened.clear()
    for uid in range(2, connections + 2):
        await use(port, uid, drop)
    await wait_for_async(
        lambda: len(opened) == connections and not len(table), 5, "every connection to end"
    )
    opened.clear()
    left = sum(1 for o in gc.get_objects() if type(o) in (Client, Connection))
    await stop(gateway)
    return left


@pytest.mark.parametrize("drop", [False, True], ids=["closed", "dropped"])
def test_ended_connections_leave_nothing_to_collect(collector: None, drop: bool) -> None:
    """An ended connection, closed or dropped, is freed by reference count: the heap freezer
    (pmq.workers.heap) would keep one held in a cycle until its hourly full collection."""
    assert uvloop.run(connections_left(100, drop)) == 0


def test_connections_whose_action_met_redis_gone_leave_no_cycles(collector: None) -> None:
    """An action answered 503 because Redis failed under asyncio.gather: the error, the
    gather and the frames that awaited it (which hold the connection) form a cycle unless
    the gateway drops the error's traceback. None of 200 such connections is left in one.
    (The other gathered call's error stays in a small cycle of its own: about 20 objects of
    asyncio and the pool, no connection.)"""
    uvloop.run(churn(200, action="redis_gone"))
    kept = [o for o in gc.garbage if type(o) in (Client, Connection)]
    assert not kept, len(kept)


async def handshake_kept() -> tuple[str, int, int]:
    """(path, request headers, response headers) an open connection still holds."""
    gateway, _, port, opened = await start_gateway()
    cookie = "session=" + "x" * 2000
    async with connect(
        f"ws://127.0.0.1:{port}/ws?token=42", additional_headers={"Cookie": cookie}
    ) as ws:
        await ws.send('{"id": "p", "action": "ping", "data": {}}')
        await ws.recv()
        [client] = opened
        transport = client.ws.transport
        kept = (
            transport.request.path,
            len(transport.request.headers),
            len(transport.response.headers),
        )
    await stop(gateway)
    return kept


def test_open_connections_drop_the_upgrade_headers_and_token() -> None:
    """A browser's cookies and the token in the URL are not kept for the connection's life."""
    path, request_headers, response_headers = uvloop.run(handshake_kept())
    assert path == b"/ws"
    assert (request_headers, response_headers) == (0, 0)
