"""The chaos suite's steady load: users who stay connected, and the site publishing.

Users behave as a real client would: connect, take the hello and the replay, ack what they
receive in batches, drop duplicates by id, and after losing the connection reconnect with
capped exponential back-off and full jitter. Each remembers what every connection of its
life received, so a message id seen twice on one connection (never allowed) is told apart
from one seen again after a reconnect (at-least-once), and when each ack of theirs was
answered 200 (the site must be told of it: bench.chaos_hooks).

The publisher sends unicast messages at a fixed rate, a multicast and a broadcast every few
seconds, each request with a deadline: an answer past it is a hang. It records every
outcome with its time. Message bodies carry the phase and a request number ``n`` (``b``
for broadcasts), so deliveries and stored rows are matched to requests whatever their ids.
Traffic goes only to 127.0.0.1, is bounded in count and time, and stops by itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import multiprocessing as mp
import random
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import websockets
from websockets.asyncio.client import connect

from bench.common import HttpClient, post_head, run, settle_heap
from pmq.client import Backoff

HANGS_AFTER = 5.0  # seconds the site waits for an ingest answer
REFUSED = -2  # outcome: connection refused or dropped before an answer
HUNG = -1  # outcome: no answer within HANGS_AFTER
SHED = -3  # outcome: not sent, every connection of the site's pool was busy
MULTICAST_BASE = 1_000_000_000  # multicast requests are numbered from here


@dataclass(frozen=True)
class Plan:
    """One phase's load: who is online, who is not, how much to send and for how long."""

    phase: int
    run_id: str
    ws_port: int
    ingest_port: int
    secret: str
    online: tuple[int, ...]
    offline: tuple[int, int]  # uid range
    rate: float  # unicast requests per second
    offline_share: float
    seconds: float
    multicast_every: float
    multicast_size: int
    broadcast_every: float
    connections: int  # the site's pool: at most this many requests in flight
    backoff: Backoff = field(default_factory=Backoff)


# Users ------------------------------------------------------------------------------
def add(counter: Any, n: int) -> None:
    """Add to a counter shared between processes (``+=`` alone is not atomic)."""
    with counter.get_lock():
        counter.value += n


class User:
    """One user's client: its connections over time and everything they received."""

    def __init__(self, uid: int, plan: Plan, shared: Any) -> None:
        self.uid = uid
        self.plan = plan
        self.shared = shared  # (connected, delivered) counters of the whole load
        self.keys: set[tuple[str, int]] = set()  # ("n"|"b", number) of this phase seen
        self.ids: dict[int, tuple[str, int]] = {}  # every id seen, with its key
        self.same_conn_dups = 0
        self.dup_sample: list[tuple[str, int]] = []  # keys of ids seen twice on one connection
        self.again_dups = 0  # an id seen again on a later connection
        self.double_applied: set[tuple[str, int]] = set()  # one key under two ids
        self.outages: list[tuple[float, float]] = []  # (down, up) times
        self.connected = False
        self.errors: collections.Counter[str] = collections.Counter()
        self.acked: dict[str, float] = {}  # message id -> when its ack was first answered 200

    async def live(self, stopping: asyncio.Event) -> None:
        rng = random.Random(self.uid)
        attempt = 0
        down = 0.0
        from pmq.domain.jwtauth import mint_token

        url = f"ws://127.0.0.1:{self.plan.ws_port}/ws?token="
        while not stopping.is_set():
            try:
                async with connect(
                    url + mint_token(self.plan.secret, self.uid, ttl=7200),
                    open_timeout=10, ping_interval=5, ping_timeout=10, close_timeout=2,
                    max_queue=None, proxy=None, compression=None,
                ) as ws:
                    hello = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
                    if hello.get("type") != "hello":
                        raise ConnectionError(f"first frame {hello.get('type')}")
                    attempt = 0
                    self._up(down)
                    await self._session(ws, stopping)
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                self.errors[f"{type(exc).__name__}: {exc}"[:80]] += 1
            if self.connected:
                self.connected = False
                add(self.shared[0], -1)
                down = time.time()
            elif not down:
                down = time.time()
            if stopping.is_set():
                return
            with contextlib.suppress(asyncio.TimeoutError):
                delay = self.plan.backoff.delay(attempt, rng)
                await asyncio.wait_for(stopping.wait(), delay)
            attempt += 1

    def _up(self, down: float) -> None:
        self.connected = True
        add(self.shared[0], 1)
        if down:
            self.outages.append((down, time.time()))

    async def _session(self, ws: Any, stopping: asyncio.Event) -> None:
        """Read pushes until the connection ends or the load stops; ack every 250 ms."""
        seen_here: set[int] = set()
        unacked: list[str] = []
        asked: dict[str, list[str]] = {}  # ack request id -> the ids it acks

        async def ack_every(seconds: float) -> None:
            for sequence in range(1_000_000_000):
                await asyncio.sleep(seconds)
                if unacked:
                    asked[f"a{sequence}"] = unacked[:]
                    request = {"id": f"a{sequence}", "action": "msg.ack",
                               "data": {"ids": unacked[:]}}
                    unacked.clear()
                    with contextlib.suppress(websockets.ConnectionClosed):
                        await ws.send(orjson.dumps(request).decode())

        async def close_on_stop() -> None:
            await stopping.wait()
            await ws.close()

        helpers = [asyncio.create_task(ack_every(0.25)), asyncio.create_task(close_on_stop())]
        try:
            async for raw in ws:
                frame = orjson.loads(raw)
                if frame.get("type") == "push":
                    self._push(frame["msg"], seen_here, unacked)
                elif frame.get("type") == "reply" and frame.get("id") in asked:
                    done = asked.pop(frame["id"])
                    if frame.get("code") == 200:
                        now = time.time()
                        # this phase's unicast only: message.acked lists no broadcast
                        for mid in done:
                            if self.ids.get(int(mid), ("", 0))[0] == "n":
                                self.acked.setdefault(mid, now)
        finally:
            for task in helpers:
                task.cancel()

    def _push(self, msg: dict[str, Any], seen_here: set[int], unacked: list[str]) -> None:
        mid = int(msg["id"])
        unacked.append(msg["id"])
        if mid in seen_here:
            self.same_conn_dups += 1
            if len(self.dup_sample) < 5:
                self.dup_sample.append(self.ids.get(mid, ("?", mid)))
            return
        seen_here.add(mid)
        if mid in self.ids:
            self.again_dups += 1
            return
        body = msg.get("body") or {}
        if not isinstance(body, dict) or body.get("ph") != self.plan.phase:
            self.ids[mid] = ("", 0)
            return
        key = ("b", body["b"]) if "b" in body else ("n", body["n"])
        self.ids[mid] = key
        if key in self.keys:
            self.double_applied.add(key)
            return
        self.keys.add(key)
        add(self.shared[1], 1)

    def report(self) -> dict[str, Any]:
        return {
            "keys": sorted(self.keys),
            "same_conn_dups": self.same_conn_dups,
            "dup_sample": self.dup_sample,
            "again_dups": self.again_dups,
            "double_applied": sorted(self.double_applied),
            "outages": self.outages,
            "errors": dict(self.errors),
            "acked": list(self.acked.items()),
        }


def users_process(
    uids: list[int], plan: Plan, shared: Any, results: mp.Queue, stop: Any
) -> None:
    """Keep ``uids`` connected until ``stop`` is set; report each user's record."""
    run(users_main(uids, plan, shared, results, stop))


async def users_main(
    uids: list[int], plan: Plan, shared: Any, results: mp.Queue, stop: Any
) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    users = [User(uid, plan, shared) for uid in uids]
    tasks = [asyncio.create_task(u.live(stopping)) for u in users]
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(60):
            while not all(u.connected for u in users):
                await asyncio.sleep(0.1)
    settle_heap()
    await loop.run_in_executor(None, stop.wait)
    connected = {u.uid: u.connected for u in users}
    stopping.set()
    await asyncio.wait(tasks, timeout=15)
    results.put(("users", {u.uid: {**u.report(), "connected": connected[u.uid]}
                           for u in users}))


# Offline users' check -----------------------------------------------------------------
async def replayed(ws_port: int, secret: str, uid: int, phase: int) -> set[tuple[str, int]]:
    """The keys of this phase a fresh connection of ``uid`` is replayed (up to the reply
    to a ping sent after the hello, which the server answers after the replay)."""
    from pmq.domain.jwtauth import mint_token

    url = f"ws://127.0.0.1:{ws_port}/ws?token={mint_token(secret, uid, ttl=600)}"
    keys: set[tuple[str, int]] = set()
    async with connect(url, open_timeout=10, proxy=None, compression=None) as ws:
        await asyncio.wait_for(ws.recv(), 10)  # the hello
        await ws.send('{"id":"sync","action":"ping","data":{}}')
        async with asyncio.timeout(30):
            while True:
                frame = orjson.loads(await ws.recv())
                if frame.get("type") == "reply" and frame.get("id") == "sync":
                    return keys
                if frame.get("type") == "push":
                    body = frame["msg"].get("body") or {}
                    if isinstance(body, dict) and body.get("ph") == phase and "n" in body:
                        keys.add(("n", body["n"]))


async def replay_check(
    ws_port: int, secret: str, uids: list[int], phase: int
) -> tuple[dict[int, set[tuple[str, int]]], int]:
    """Each uid's replayed keys, 32 users at a time; and how many connects failed."""
    gate = asyncio.Semaphore(32)
    failed = 0
    out: dict[int, set[tuple[str, int]]] = {}

    async def one(uid: int) -> None:
        nonlocal failed
        async with gate:
            for _ in range(3):
                try:
                    out[uid] = await replayed(ws_port, secret, uid, phase)
                    return
                except (OSError, TimeoutError, websockets.WebSocketException):
                    await asyncio.sleep(1)
            failed += 1

    await asyncio.gather(*(one(uid) for uid in uids))
    return out, failed


# The site ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One ingest request: when it was sent and answered, what it carried (``what`` is "n"
    for messages, "b" for broadcasts, with the body's number and the recipients), and its
    outcome (the HTTP status, HUNG or REFUSED) with the reply's data."""

    sent: float
    answered: float
    what: str
    number: int
    uids: tuple[int, ...]
    outcome: int
    data: Any


class Site:
    """The main site's publisher: a pool of at most ``plan.connections`` keep-alive
    connections, each request bounded by HANGS_AFTER. A unicast request due while all are
    busy is shed (recorded, not sent), so a stalled node never piles up connections. A
    request that finds its pooled connection dead is sent once more on a fresh one (safe:
    every request carries an idempotency key)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.pool: list[HttpClient] = []
        self.records: list[Record] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.busy = 0

    async def post(self, path: str, payload: dict[str, Any], what: str,
                   uids: tuple[int, ...], sheddable: bool = False) -> None:
        head = post_head(path, self.plan.ingest_port)
        sent = time.time()
        number = payload["body"][what]
        if sheddable and self.busy >= self.plan.connections:
            self.records.append(Record(sent, sent, what, number, uids, SHED, None))
            return
        self.busy += 1
        try:
            outcome, data = await self._post(head, orjson.dumps(payload))
        finally:
            self.busy -= 1
        self.records.append(Record(sent, time.time(), what, number, uids, outcome, data))

    async def _post(self, head: bytes, body: bytes) -> tuple[int, Any]:
        for fresh in (False, True):
            client: HttpClient | None = None
            try:
                async with asyncio.timeout(HANGS_AFTER):
                    if not fresh and self.pool:
                        client = self.pool.pop()
                    else:
                        fresh = True
                        client = await HttpClient.open(self.plan.ingest_port)
                    status, raw = await client.request(head, body)
            except TimeoutError:
                if client is not None:
                    client.close()
                return HUNG, None
            except (ConnectionError, OSError):
                if client is not None:
                    client.close()
                if fresh:
                    return REFUSED, None
                continue
            self.pool.append(client)
            try:
                return status, orjson.loads(raw).get("data")
            except (orjson.JSONDecodeError, AttributeError):
                return status, None
        return REFUSED, None

    async def send_all(self) -> None:
        """Unicast at ``plan.rate``, a multicast and a broadcast on their periods, until
        ``plan.seconds`` have passed; then wait for every answer (each bounded)."""
        p = self.plan
        rng = random.Random(p.phase)
        start = time.monotonic()
        sent = multicasts = broadcasts = 0
        while (elapsed := time.monotonic() - start) < p.seconds:
            while sent < elapsed * p.rate:
                if rng.random() < p.offline_share or not p.online:
                    uid = rng.randrange(*p.offline)
                else:
                    uid = rng.choice(p.online)
                self._message((uid,), sent, sheddable=True)
                sent += 1
            if multicasts * p.multicast_every <= elapsed:
                half = p.multicast_size // 2
                uids = rng.sample(p.online, min(half, len(p.online))) + [
                    rng.randrange(*p.offline) for _ in range(p.multicast_size - half)
                ]
                self._message(tuple(sorted(set(uids))), MULTICAST_BASE + multicasts)
                multicasts += 1
            if broadcasts * p.broadcast_every <= elapsed:
                payload = {"group": "all", "kind": "system",
                           "body": {"ph": p.phase, "b": broadcasts, "t": time.time()},
                           "id": f"{p.run_id}-{p.phase}-b{broadcasts}"}
                self._spawn(self.post("/api/v1/broadcast", payload, "b", ()))
                broadcasts += 1
            await asyncio.sleep(0.005)
        while self.tasks:
            await asyncio.gather(*list(self.tasks))
        for client in self.pool:
            client.close()

    def _message(self, uids: tuple[int, ...], n: int, sheddable: bool = False) -> None:
        p = self.plan
        payload = {"to": list(uids) if len(uids) > 1 else uids[0], "kind": "notice",
                   "body": {"ph": p.phase, "n": n, "t": time.time()},
                   "id": f"{p.run_id}-{p.phase}-{n}"}
        self._spawn(self.post("/api/v1/messages", payload, "n", uids, sheddable))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def site_process(plan: Plan, results: mp.Queue) -> None:
    """Publish for ``plan.seconds`` and report every request's :class:`Record`."""

    async def main() -> None:
        site = Site(plan)
        await site.send_all()
        results.put(("site", site.records))

    run(main())
