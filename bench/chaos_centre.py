"""The chaos suite's notification-centre part (docs/notification-centre.md): while a fault
is injected, the site reads and retracts messages; afterwards nothing read comes back
unread and nothing retracted comes back.

During the phase a process of its own sends CENTRE_RATE messages a second, round robin, to
CENTRE_USERS users of their own (uids from the phase's CENTRE_AT, never connected during
the load). Of the messages accepted, every fourth is retracted (``DELETE
/api/v1/messages/{id}``) and every fourth other one marked read (``POST
/api/v1/users/{uid}/read {"ids"}``) at once; each answer is recorded with its time. Only a
200 counts as done: a 503, a refusal or a hang promised nothing.

After the phase every such user's whole feed is read through the site's ``GET
/api/v1/users/{uid}/messages`` (and its ``unread_only`` form), and a fresh connection's
replay is taken. The books: a retraction done that the feed or the replay still shows
(``centre_retracted_back``), a read done that the feed shows unread or the unread-only feed
lists (``centre_read_unread``); each with the times the site was answered, so a Redis crash
with durability "none" may be forgiven its last second, as for messages (bench.chaos_report).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from typing import Any

import orjson
from websockets.asyncio.client import connect

from bench.chaos_load import Plan, Site
from bench.common import HttpClient, post_head, run

CENTRE_AT = 90_000  # the centre's users in the phase's uid range
CENTRE_USERS = 20
CENTRE_RATE = 20.0  # messages a second


def head(method: str, path: str, port: int) -> bytes:
    return post_head(path, port).replace(b"POST ", method.encode() + b" ", 1)


def centre_users(plan: Plan) -> list[int]:
    base = plan.online[0] if plan.online else plan.offline[0]
    return list(range(base + CENTRE_AT, base + CENTRE_AT + CENTRE_USERS))


class CentreSite(Site):
    """Publishes to the centre's users, then retracts or reads what was accepted."""

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        self.done: list[tuple[str, int, str, float]] = []  # (action, uid, id, answered)

    async def one(self, uid: int, n: int) -> None:
        p = self.plan
        body = {"to": uid, "kind": "notice", "body": {"ph": p.phase, "c": n},
                "id": f"{p.run_id}-{p.phase}-c{n}"}
        status, data = await self._post(head("POST", "/api/v1/messages", p.ingest_port),
                                        orjson.dumps(body))
        if not 200 <= status < 300 or not data or n % 4 not in (1, 2):
            return
        message_id = data["ids"][0]
        if n % 4 == 1:
            action = "retracted"
            request = head("DELETE", f"/api/v1/messages/{message_id}", p.ingest_port), b""
        else:
            action = "read"
            request = (head("POST", f"/api/v1/users/{uid}/read", p.ingest_port),
                       orjson.dumps({"ids": [message_id]}))
        status, _ = await self._post(*request)
        if status == 200:
            self.done.append((action, uid, message_id, time.time()))

    async def send_all(self) -> None:
        users = centre_users(self.plan)
        start = time.monotonic()
        sent = 0
        while (elapsed := time.monotonic() - start) < self.plan.seconds:
            while sent < elapsed * CENTRE_RATE:
                self._spawn(self.one(users[sent % len(users)], sent))
                sent += 1
            await asyncio.sleep(0.01)
        while self.tasks:
            await asyncio.gather(*list(self.tasks))
        for client in self.pool:
            client.close()


def centre_process(plan: Plan, results: mp.Queue) -> None:
    """Run the centre's load for ``plan.seconds``; report what was done."""

    async def main() -> None:
        site = CentreSite(plan)
        await site.send_all()
        results.put(("centre", site.done))

    run(main())


async def feed(port: int, uid: int, unread_only: bool) -> dict[str, bool]:
    """id -> read of every item of the user's feed, through the site's route."""
    client = await HttpClient.open(port)
    found: dict[str, bool] = {}
    before = ""
    try:
        while True:
            query = f"?limit=100&unread_only={str(unread_only).lower()}{before}"
            status, raw = await client.request(
                head("GET", f"/api/v1/users/{uid}/messages{query}", port), b""
            )
            if status != 200:
                raise RuntimeError(f"the feed of {uid} answered {status}: {raw[:200]!r}")
            page = orjson.loads(raw)["data"]
            found.update({m["id"]: m["read"] for m in page["messages"]})
            if page["next"] is None:
                return found
            before = f"&before={page['next']}"
    finally:
        client.close()


async def replayed_ids(ws_port: int, secret: str, uid: int) -> set[str]:
    """The message ids a fresh connection of ``uid`` is replayed."""
    from pmq.domain.jwtauth import mint_token

    url = f"ws://127.0.0.1:{ws_port}/ws?token={mint_token(secret, uid, ttl=600)}"
    ids: set[str] = set()
    async with connect(url, open_timeout=10, proxy=None, compression=None, max_size=None) as ws:
        await asyncio.wait_for(ws.recv(), 10)  # the hello
        await ws.send('{"id":"sync","action":"ping","data":{}}')
        async with asyncio.timeout(30):
            while True:
                frame = orjson.loads(await ws.recv())
                if frame.get("type") == "reply" and frame.get("id") == "sync":
                    return ids
                if frame.get("type") == "push":
                    ids.add(frame["msg"]["id"])


async def centre_check(plan: Plan, done: list[tuple[str, int, str, float]]) -> dict[str, Any]:
    """The books of what the centre's load did (module docstring)."""
    back: list[float] = []
    unread: list[float] = []
    for uid in centre_users(plan):
        listed = await feed(plan.ingest_port, uid, False)
        unread_listed = await feed(plan.ingest_port, uid, True)
        replay = await replayed_ids(plan.ws_port, plan.secret, uid)
        for action, who, message_id, answered in done:
            if who != uid:
                continue
            if action == "retracted" and (message_id in listed or message_id in replay):
                back.append(answered)
            if action == "read" and (listed.get(message_id) is False
                                     or message_id in unread_listed):
                unread.append(answered)
    return {
        "retracted": sum(1 for d in done if d[0] == "retracted"),
        "read": sum(1 for d in done if d[0] == "read"),
        "retracted_back": back,
        "read_unread": unread,
    }
