"""One connection never receives the same message id twice: broadcasts and unicasts published
while users connect reach each connection by the inbox replay or live, never both; a
broadcast published twice on the channel is written once."""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Callable
from typing import Any

import httpx
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect

from pmq.redis.keys import Keys
from pmq.wire.client import push_of
from pmq.wire.relay import encode_broadcast
from tests.helpers import REDIS_URL, Node

STEPS = 80  # each: a broadcast, a multicast to every user and a new connection, at once
USERS = [str(uid) for uid in range(9100, 9110)]


class Receiver:
    """One connection's push ids, in the order they came, read until ``done`` says so."""

    def __init__(self, uid: str, ws: ClientConnection) -> None:
        self.uid = uid
        self.ws = ws
        self.ids: list[str] = []
        self.bodies: list[dict[str, Any]] = []

    async def read(self, done: Callable[[Receiver], bool]) -> None:
        while not done(self):
            frame = json.loads(await self.ws.recv())
            if frame["type"] == "push":
                self.ids.append(frame["msg"]["id"])
                self.bodies.append(frame["msg"]["body"])


async def post(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await http.post(path, json=body)
    assert response.status_code in (200, 202), response.text
    return response.json()


def test_no_connection_gets_an_id_twice_while_messages_race_its_connect(
    make_node: Callable[..., Node],
) -> None:
    node = make_node().start()

    async def scenario() -> list[Receiver]:
        receivers: list[Receiver] = []
        reading: list[asyncio.Task[None]] = []

        def done(receiver: Receiver) -> bool:  # both last messages came
            return sum(body.get("last", False) for body in receiver.bodies) == 2

        async def join(uid: str) -> None:
            ws = await connect(f"{node.ws_url}?token={node.token(uid)}", open_timeout=10)
            receiver = Receiver(uid, ws)
            receivers.append(receiver)
            reading.append(asyncio.create_task(receiver.read(done)))

        async with httpx.AsyncClient(base_url=node.ingest_url, timeout=10) as http:
            for step in range(STEPS):
                await asyncio.gather(
                    post(http, "/api/v1/broadcast", {"group": "all", "body": {"n": step}}),
                    post(http, "/api/v1/messages", {"to": USERS, "kind": "notice",
                                                    "body": {"n": step}}),
                    join(USERS[step % len(USERS)]),
                )
            last = {"last": True}
            await post(http, "/api/v1/broadcast", {"group": "all", "body": last})
            await post(http, "/api/v1/messages", {"to": USERS, "kind": "notice", "body": last})
            try:
                await asyncio.wait_for(asyncio.gather(*reading), 60)
            finally:
                for receiver in receivers:
                    await receiver.ws.close()
        return receivers

    receivers = asyncio.run(scenario())
    assert len(receivers) == STEPS
    twice = {
        f"{r.uid}#{n}": [i for i, count in collections.Counter(r.ids).items() if count > 1]
        for n, r in enumerate(receivers)
    }
    assert {k: v for k, v in twice.items() if v} == {}
    # Every connection got every broadcast it could: the replay's newest 20, then all live.
    assert all(len(set(r.ids)) >= 20 for r in receivers)


def test_a_broadcast_published_twice_on_the_channel_is_written_once(
    make_node: Callable[..., Node], redis_prefix: str
) -> None:
    # A task worker killed between publishing a broadcast and storing it leaves it to a
    # successor, which publishes it again.
    node = make_node().start()
    channel = Keys(redis_prefix).broadcast_channel()
    message: dict[str, Any] = {
        "id": "387000000000000001", "kind": "system", "from": None, "to": None,
        "group": "all", "body": {"again": True}, "ts": 1,
    }

    async def scenario() -> list[str]:
        async with connect(f"{node.ws_url}?token={node.token(9200)}", open_timeout=10) as ws:
            receiver = Receiver("9200", ws)
            assert json.loads(await ws.recv())["type"] == "hello"
            async with aioredis.Redis.from_url(REDIS_URL) as redis:
                for _ in range(2):
                    await redis.execute_command(
                        "SPUBLISH", channel, encode_broadcast("all", push_of(message)[0])
                    )
            async with httpx.AsyncClient(base_url=node.ingest_url, timeout=10) as http:
                await post(http, "/api/v1/broadcast", {"group": "all", "body": {"last": True}})
            await asyncio.wait_for(receiver.read(lambda r: {"last": True} in r.bodies), 30)
        return receiver.ids

    ids = asyncio.run(scenario())
    assert ids.count(message["id"]) == 1
