"""The soak's load: a paced publisher and a pool of churning, acking clients, each a
process of its own, and the end-of-run check that every undelivered message is still
there to pull.

The publisher sends unicast messages at a fixed rate to random users of a range (online or
not) and a broadcast to ``all`` every few seconds, for a fixed time; it keeps the id of
every message answered 2xx with its user. The clients hold a fixed number of connections,
each for an exponentially distributed time (so a steady share leaves every minute), then
close it (a fifth of them drop the TCP connection instead) and connect as another user who
was offline. Every client acks what it receives once a second and now and then asks for
``msg.pull`` and ``unread.get``. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import multiprocessing as mp
import random
import time
from array import array
from typing import Any, cast

import orjson

from bench.common import HttpClient, RawWebSocket, Target, log, post_head, run, settle_heap

KINDS = ("comment", "notice", "letter")
PULL_LIMIT = 200  # the most msg.pull returns
ACK_CHUNK = 200  # ids per msg.ack frame
REQUEST_TIMEOUT = 10.0  # an ingest call slower than this counts as a timeout
ABORT_SHARE = 0.2  # leaving clients that drop the TCP connection instead of closing


class Socket(RawWebSocket):
    """RawWebSocket that can send frames of any length (acks of many ids)."""

    def send(self, opcode: int, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
        self.transport.write(head + b"\0\0\0\0" + payload)

    def call(self, rid: str, action: str, data: dict[str, Any]) -> None:
        """Send one request frame."""
        self.send(0x1, orjson.dumps({"id": rid, "action": action, "data": data}))

    @classmethod
    async def open(cls, port: int, path: str, source: str | None, on_text: Any) -> Socket:
        """Connect and wait for the hello."""
        return cast(Socket, await cls.connect(port, path, source, on_text))


# Publisher ---------------------------------------------------------------------------
def publisher(
    target: Target,
    rate: float,
    seconds: float,
    uids: tuple[int, int],
    broadcast_every: float,
    sent: Any,
    results: mp.Queue,
) -> None:
    """Publish for ``seconds``, then put ("published", 0, report) on ``results``."""
    run(publish(target, rate, seconds, uids, broadcast_every, sent, results))


async def publish(
    target: Target,
    rate: float,
    seconds: float,
    uids: tuple[int, int],
    broadcast_every: float,
    sent: Any,
    results: mp.Queue,
) -> None:
    rng = random.Random(1)
    accepted, accepted_to, latency = array("q"), array("q"), array("d")
    statuses: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    head = post_head("/api/v1/messages", target.ingest_port, target.api_key)
    total = int(rate * seconds)
    numbers = iter(range(total))
    start = time.monotonic()

    async def call(client: HttpClient, what: str, head: bytes, body: bytes) -> Any:
        began = time.monotonic()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                status, reply = await client.request(head, body)
        except (TimeoutError, ConnectionError, OSError) as exc:
            errors[f"{what}: {type(exc).__name__}"] += 1
            client.close()
            return None
        latency.append((time.monotonic() - began) * 1000)
        statuses[f"{what} {status}"] += 1
        return orjson.loads(reply)["data"] if 200 <= status < 300 else None

    async def unicast() -> None:
        client = await HttpClient.open(target.ingest_port)
        for n in numbers:
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if client.transport is None or client.transport.is_closing():
                client = await HttpClient.open(target.ingest_port)
            uid = rng.randrange(*uids)
            body = {"n": n, "t": time.time(), "text": "soak " * rng.randrange(4, 30)}
            message = {"to": uid, "kind": rng.choice(KINDS), "from": 1, "body": body}
            data = await call(client, "unicast", head, orjson.dumps(message))
            if data is not None:
                accepted.append(int(data["ids"][0]))
                accepted_to.append(uid)
                sent.value += 1
        client.close()

    async def broadcasts() -> None:
        client = await HttpClient.open(target.ingest_port)
        bhead = post_head("/api/v1/broadcast", target.ingest_port, target.api_key)
        for k in itertools.count():
            if time.monotonic() - start > seconds:
                break
            if client.transport is None or client.transport.is_closing():
                client = await HttpClient.open(target.ingest_port)
            body = {"group": "all", "kind": "system", "body": {"k": k, "text": "soak broadcast"}}
            await call(client, "broadcast", bhead, orjson.dumps(body))
            await asyncio.sleep(broadcast_every)
        client.close()

    # enough connections that one slow reply never holds the pace back
    workers = max(4, int(rate // 50))
    await asyncio.gather(broadcasts(), *(unicast() for _ in range(workers)))
    report = {
        "seconds": round(time.monotonic() - start, 1),
        "accepted": accepted.tobytes(),
        "accepted_to": accepted_to.tobytes(),
        "statuses": dict(statuses),
        "errors": dict(errors),
        "latency_ms": latency.tobytes(),
    }
    results.put(("published", 0, report))


# Churning clients ----------------------------------------------------------------------
class Tally:
    """What the clients saw, over every connection of the run."""

    def __init__(self) -> None:
        self.got = array("q")  # ids of unicast messages received (pushed or pulled)
        self.broadcast_pushes = 0
        self.duplicate_pushes = 0  # one connection pushed one id twice
        self.frames: collections.Counter[str] = collections.Counter()
        self.replies: collections.Counter[str] = collections.Counter()
        self.closes: collections.Counter[str] = collections.Counter()  # closed by the server
        self.connect_errors: collections.Counter[str] = collections.Counter()
        self.sessions = 0
        self.leaves = 0


class Session:
    """One connection of one user: records and queues for ack what arrives."""

    def __init__(self, uid: int, tally: Tally) -> None:
        self.uid = uid
        self.tally = tally
        self.pushed: set[int] = set()
        self.unacked: list[int] = []
        self.waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.ws: Socket | None = None
        self.requests = itertools.count()

    def on_text(self, frame: bytes) -> None:
        event = orjson.loads(frame)
        kind = event.get("type")
        self.tally.frames[str(kind)] += 1
        if kind == "push":
            msg = event["msg"]
            mid = int(msg["id"])
            if mid in self.pushed:
                self.tally.duplicate_pushes += 1
            self.pushed.add(mid)
            self.unacked.append(mid)
            if msg.get("to") is None:
                self.tally.broadcast_pushes += 1
            else:
                self.tally.got.append(mid)
        elif kind == "reply":
            rid = str(event.get("id"))
            self.tally.replies[f"{rid.rstrip('0123456789')} {event.get('code')}"] += 1
            for msg in (event.get("data") or {}).get("messages", ()):
                self.tally.got.append(int(msg["id"]))
                self.unacked.append(int(msg["id"]))
            waiter = self.waiting.pop(rid, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(event)

    def ask(self, prefix: str, action: str, data: dict[str, Any]) -> asyncio.Future[Any]:
        """Send a request; the future gets its reply frame."""
        rid = f"{prefix}{next(self.requests)}"
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting[rid] = waiter
        assert self.ws is not None
        self.ws.call(rid, action, data)
        return waiter

    def flush_acks(self) -> list[asyncio.Future[Any]]:
        ids, self.unacked = self.unacked, []
        return [
            self.ask("ack", "msg.ack", {"ids": [str(i) for i in ids[at : at + ACK_CHUNK]]})
            for at in range(0, len(ids), ACK_CHUNK)
        ]


def clients(
    target: Target,
    source: str,
    uids: tuple[int, int],
    online: int,
    churn_per_minute: float,
    request_every: float,
    stop: Any,
    live: Any,
    results: mp.Queue,
) -> None:
    """Hold ``online`` churning connections until ``stop``; put ("clients", 0, report)."""
    run(churn(target, source, uids, online, churn_per_minute, request_every, stop, live, results))


async def churn(
    target: Target,
    source: str,
    uids: tuple[int, int],
    online: int,
    churn_per_minute: float,
    request_every: float,
    stop: Any,
    live: Any,
    results: mp.Queue,
) -> None:
    from pmq.domain.jwtauth import mint_token

    rng = random.Random(2)
    tally = Tally()
    sessions: dict[int, Session] = {}
    offline = list(range(*uids))
    rng.shuffle(offline)
    mean_life = 60.0 / churn_per_minute
    gate = asyncio.Semaphore(32)
    stopping = asyncio.Event()

    async def hold(uid: int, life: float) -> None:
        session = Session(uid, tally)
        path = f"/ws?token={mint_token(target.secret, uid, ttl=86400)}"
        try:
            async with gate:
                ws = session.ws = await Socket.open(target.ws_port, path, source, session.on_text)
        except (OSError, ConnectionError, TimeoutError) as exc:
            tally.connect_errors[f"{type(exc).__name__}: {exc}"[:100]] += 1
            await asyncio.sleep(1 + rng.random())  # back off as a real client would
            return
        tally.sessions += 1
        sessions[uid] = session
        try:
            waits: list[Any] = [ws.closed, asyncio.ensure_future(stopping.wait())]
            await asyncio.wait(waits, timeout=life, return_when=asyncio.FIRST_COMPLETED)
            waits[1].cancel()
            if ws.closed.done():
                tally.closes[ws.closed.result()] += 1
                await asyncio.sleep(1 + rng.random())
                return
            await leave(session, abort=not stopping.is_set() and rng.random() < ABORT_SHARE)
        finally:
            del sessions[uid]

    async def leave(session: Session, abort: bool) -> None:
        """Ack what arrived (and wait for the answers), then close or drop the connection."""
        assert session.ws is not None
        tally.leaves += 1
        acks = session.flush_acks()
        if acks:
            await asyncio.wait(acks, timeout=5)
        if abort:
            session.ws.abort()
            return
        session.ws.close()
        await asyncio.wait([session.ws.closed], timeout=5)
        session.ws.abort()

    async def slot() -> None:
        first = True
        while not stopping.is_set():
            uid = offline.pop(rng.randrange(len(offline)))
            life = rng.expovariate(1 / mean_life)
            if first:  # the first users connect at once and leave as if they had come earlier
                life, first = rng.uniform(0, mean_life), False
            try:
                await hold(uid, life)
            finally:
                offline.append(uid)

    async def tick() -> None:
        """Once a second: every connection acks what arrived; some pull or read unread."""
        chance = 1.0 / request_every
        while not stopping.is_set():
            await asyncio.sleep(1)
            for session in list(sessions.values()):
                if session.ws is None or session.ws.transport is None:
                    continue
                if session.ws.transport.is_closing():
                    continue
                session.flush_acks()
                if rng.random() < chance:
                    session.ask("pull", "msg.pull", {"limit": 50})
                if rng.random() < chance:
                    session.ask("unread", "unread.get", {})
            live.value = len(sessions)

    slots = [asyncio.create_task(slot()) for _ in range(online)]
    ticker = asyncio.create_task(tick())
    loop = asyncio.get_running_loop()
    await asyncio.sleep(5)
    settle_heap()
    await loop.run_in_executor(None, stop.wait)
    log(f"clients: stopping {len(sessions)} connections")
    stopping.set()
    await asyncio.gather(*slots, return_exceptions=True)
    ticker.cancel()
    results.put(("clients", 0, report_of(tally)))


def report_of(tally: Tally) -> dict[str, Any]:
    return {
        "got": tally.got.tobytes(),
        "broadcast_pushes": tally.broadcast_pushes,
        "duplicate_pushes_on_one_connection": tally.duplicate_pushes,
        "frames": dict(tally.frames),
        "replies": dict(tally.replies),
        "closed_by_server": dict(tally.closes),
        "connect_errors": dict(tally.connect_errors),
        "sessions": tally.sessions,
        "leaves": tally.leaves,
    }


# Final check -----------------------------------------------------------------------------
async def still_pending(target: Target, uids: list[int]) -> dict[int, set[int]]:
    """For each user, the ids a new connection of theirs is given: its replay and every page
    of ``msg.pull``. Nothing is acked."""
    from pmq.domain.jwtauth import mint_token

    found: dict[int, set[int]] = {}
    gate = asyncio.Semaphore(16)
    tally = Tally()

    async def one(uid: int) -> None:
        session = Session(uid, tally)
        path = f"/ws?token={mint_token(target.secret, uid, ttl=3600)}"
        async with gate:
            ws = session.ws = await Socket.open(target.ws_port, path, None, session.on_text)
            try:
                after = 0
                while True:
                    reply = await asyncio.wait_for(
                        session.ask("pull", "msg.pull", {"after": after, "limit": PULL_LIMIT}), 30
                    )
                    page = reply["data"]["messages"]
                    if not page:
                        break
                    after = int(page[-1]["id"])
                found[uid] = set(session.pushed) | set(session.unacked)
            finally:
                ws.abort()

    await asyncio.gather(*(one(uid) for uid in uids))
    return found
