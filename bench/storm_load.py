"""The reconnect storm's load: clients that reconnect and ack as a real client would, and
the site publishing at a fixed rate with retries. Run by bench.storm, one process each.

A client process holds its share of the users, each on a :class:`AckingWebSocket` from the
process's own loopback source address. A user whose connection closes (or whose connect
fails) waits the delay of the storm's reconnect policy (:class:`Reconnect`: pmq.client's
back-off) and tries again. Every push is
recorded by id, acked in batches (``msg.ack``, every 0.25 s per process) and told apart:
first seen (handed to the application), seen again after a reconnect while its ack was
unconfirmed (a redelivery the client drops by id, as it must), or a duplicate that reaches
the application: again on the same connection, or again after the node confirmed its ack
(a client that forgets an id once its ack is confirmed would hand it on twice).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import itertools
import multiprocessing as mp
import random
import time
from array import array
from dataclasses import dataclass
from typing import Any

import orjson

from bench.common import HttpClient, RawWebSocket, Target, let_go, post_head, run, settle_heap
from pmq.client import Backoff
from pmq.wire.client import message_id_of

ACK_EVERY = 0.25  # seconds between a process's ack rounds
REPLY = b'{"type":"reply"'


@dataclass(frozen=True)
class Reconnect(Backoff):
    """The reconnect policy (bench.storm's docstring): the client library's full-jitter
    delay, and when the attempt count starts again."""

    stable: float = 5.0  # seconds a connection must have held its hello to reset attempt
    timeout: float = 30.0  # seconds for one connect: TCP, upgrade and hello

    def next_attempt(self, attempt: int, held: float) -> int:
        """The attempt to wait for after a connection that held its hello ``held`` s."""
        return 0 if held >= self.stable else attempt


class AckingWebSocket(RawWebSocket):
    """RawWebSocket that can also send text frames of up to 64 KiB (an ack of many ids), and
    that a connect which failed can always abort (:class:`Handler`)."""

    def __init__(self, request: bytes, on_text: Any = None) -> None:
        super().__init__(request, on_text)
        if isinstance(on_text, Handler):
            on_text.ws = self

    def data_received(self, data: bytes) -> None:
        if self.opened.cancelled():  # the connect timed out; it aborts this socket
            return
        super().data_received(data)

    def send_text(self, payload: bytes) -> None:
        assert self.transport is not None and len(payload) < 65536
        n = len(payload)
        head = bytes((0x81, 0x80 | n)) if n < 126 else b"\x81\xfe" + n.to_bytes(2, "big")
        if not self.transport.is_closing():
            self.transport.write(head + b"\0\0\0\0" + payload)


class Handler:
    """One connection's text frames, handed to its process's :meth:`Clients.on_text`. It
    learns its socket when the socket is made, so a connect that times out waiting for the
    upgrade or the hello aborts it rather than leaving it open at the node."""

    __slots__ = ("clients", "serial", "user", "ws")

    def __init__(self, clients: Clients, user: User, serial: int) -> None:
        self.clients, self.user, self.serial = clients, user, serial
        self.ws: AckingWebSocket | None = None

    def __call__(self, payload: bytes) -> None:
        self.clients.on_text(self.user, self.serial, payload)


def failure_kind(exc: BaseException) -> str:
    """What a failed connect ran into, in the words of the report."""
    text = str(exc)
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if text.startswith("HTTP/1.1 5"):
        return "5xx"
    if text.startswith("HTTP/1.1 4"):
        return "4xx"
    if text.endswith("before the hello"):
        return "closed before hello"
    if isinstance(exc, ConnectionResetError) or text.startswith(
        ("closed before the upgrade", "connection lost")
    ):
        return "reset"
    return type(exc).__name__


class User:
    """One user's client: its path, live connection and ids waiting to be acked."""

    __slots__ = ("path", "serial", "uid", "unacked", "ws")

    def __init__(self, uid: int, path: str) -> None:
        self.uid = uid
        self.path = path
        self.ws: AckingWebSocket | None = None
        self.serial = 0  # this process's number of the user's current connection
        self.unacked: list[bytes] = []


class Clients:
    """A process's users and what they saw. ``shared`` holds, at this process's ``index``,
    (connected now, distinct ids received), read by the orchestrator while it runs."""

    def __init__(
        self,
        index: int,
        users: list[User],
        target: Target,
        source: str,
        policy: Reconnect,
        shared: tuple[Any, Any],
    ) -> None:
        self.index, self.users, self.target, self.source = index, users, target, source
        self.policy = policy
        self.shared = shared
        self.connected = 0
        self.serials = itertools.count(1)
        self.last_conn: dict[int, int] = {}  # id -> serial of the connection last carrying it
        self.got_ids, self.got_uids = array("q"), array("q")  # first sightings
        self.confirmed: set[int] = set()  # ids whose ack the node answered 200
        self.acks_in_flight: dict[str, list[bytes]] = {}
        self.ack_seq = itertools.count()
        self.dirty: set[User] = set()
        self.counts: collections.Counter[str] = collections.Counter()
        self.failures: collections.Counter[str] = collections.Counter()
        self.failure_text: collections.Counter[str] = collections.Counter()
        self.closes: collections.Counter[str] = collections.Counter()
        self.outage_s = array("d")  # per reconnect: from the drop to the hello
        self.tries = array("q")  # per reconnect: attempts it took
        self.last_hello = 0.0
        self.stopping = False
        self.dup_sample: list[tuple[int, int, float]] = []
        self.hello_at: dict[User, float] = {}
        self.lag_ms: list[float] = []  # how late a 0.1 s sleep woke, from the first connect

    async def watch_lag(self) -> None:
        """How late the process's loop runs: a load generator too busy to read its sockets
        in time makes connects time out that the node answered."""
        while True:
            start = time.monotonic()
            await asyncio.sleep(0.1)
            self.lag_ms.append((time.monotonic() - start - 0.1) * 1000)

    # Frames ---------------------------------------------------------------------------
    def on_text(self, user: User, serial: int, payload: bytes) -> None:
        mid = message_id_of(payload)
        if mid:
            self.on_push(user, serial, mid)
        elif payload.startswith(REPLY):
            self.on_reply(orjson.loads(payload))

    def on_push(self, user: User, serial: int, mid: int) -> None:
        last = self.last_conn.get(mid)
        self.last_conn[mid] = serial
        if last is None:
            self.got_ids.append(mid)
            self.got_uids.append(user.uid)
            self.shared[1][self.index] = len(self.got_ids)
        elif last == serial:
            self.counts["dup_same_connection"] += 1
            if len(self.dup_sample) < 20:  # (id, uid, s since the connection's hello)
                self.dup_sample.append((mid, user.uid, round(time.time() - self.hello_at[user], 3)))
            return  # never acked twice on one connection
        elif mid in self.confirmed:
            self.counts["dup_after_confirmed_ack"] += 1
        else:
            self.counts["redelivered"] += 1
        user.unacked.append(str(mid).encode())
        self.dirty.add(user)

    def on_reply(self, reply: dict[str, Any]) -> None:
        ids = self.acks_in_flight.pop(str(reply.get("id")), None)
        if ids is None:
            return
        if reply.get("code") == 200:
            self.confirmed.update(int(i) for i in ids)
        else:
            self.counts[f"ack answered {reply.get('code')}"] += 1

    async def ack_rounds(self) -> None:
        """Every ACK_EVERY s, one msg.ack per user with ids waiting (up to 1,000 each)."""
        while True:
            await asyncio.sleep(ACK_EVERY)
            dirty, self.dirty = self.dirty, set()
            for user in dirty:
                if not user.unacked:
                    continue
                if user.ws is None:  # still connecting: its hello's replay came first
                    self.dirty.add(user)
                    continue
                ids, user.unacked = user.unacked[:1000], user.unacked[1000:]
                if user.unacked:
                    self.dirty.add(user)
                request_id = f"a{next(self.ack_seq)}"
                self.acks_in_flight[request_id] = ids
                user.ws.send_text(
                    b'{"id":"%s","action":"msg.ack","data":{"ids":["%s"]}}'
                    % (request_id.encode(), b'","'.join(ids))
                )
                self.counts["ack_frames"] += 1

    # Connections ----------------------------------------------------------------------
    async def connect(self, user: User, handler: Handler) -> AckingWebSocket:
        try:
            ws = await AckingWebSocket.connect(
                self.target.ws_port, user.path, self.source, handler, self.policy.timeout
            )
        except BaseException:
            if handler.ws is not None:
                handler.ws.abort()
            raise
        assert isinstance(ws, AckingWebSocket)  # connect() makes the class it is called on
        user.ws, user.serial = ws, handler.serial
        self.connected += 1
        self.shared[0][self.index] = self.connected
        self.last_hello = self.hello_at[user] = time.time()
        return ws

    async def live(self, user: User, gate: asyncio.Semaphore) -> None:
        """Keep ``user`` connected until stopping: the first connect through ``gate`` (the
        ramp-up, not the storm), every later one after the policy's delay."""
        rng = random.Random(user.uid)
        attempt = 0
        down = 0.0  # when the last connection closed (0: never connected yet)
        tries = 0
        async with gate:
            ws = await self.attempt(user)
        while not self.stopping:
            if ws is None:
                tries += 1
                await asyncio.sleep(self.policy.delay(attempt, rng))
                attempt += 1
                ws = await self.attempt(user)
                continue
            if down:
                self.outage_s.append(self.last_hello - down)
                self.tries.append(tries + 1)
            hello_at = time.time()
            reason = await ws.closed
            user.ws, down, tries = None, time.time(), 0
            self.connected -= 1
            self.shared[0][self.index] = self.connected
            user.unacked.clear()  # the node replays what was not acked
            if self.stopping:
                return
            self.closes[reason] += 1
            attempt = self.policy.next_attempt(attempt, down - hello_at)
            await asyncio.sleep(self.policy.delay(attempt, rng))
            attempt += 1
            ws = await self.attempt(user)

    async def attempt(self, user: User) -> AckingWebSocket | None:
        self.counts["connects"] += 1
        handler = Handler(self, user, next(self.serials))
        try:
            return await self.connect(user, handler)
        except Exception as exc:  # counted by kind; the user tries again whatever it was
            kind = failure_kind(exc)
            if kind == "timeout":  # where it waited: SYN, 101 or hello
                ws = handler.ws
                kind += " (tcp)" if ws is None else " (upgrade)" if not ws.upgraded else " (hello)"
            self.failures[kind] += 1
            if kind != "refused" and not kind.startswith("timeout"):
                self.failure_text[f"{type(exc).__name__}: {exc}"[:100]] += 1
            return None

    def report(self) -> dict[str, Any]:
        return {
            "got_ids": self.got_ids.tobytes(),
            "got_uids": self.got_uids.tobytes(),
            "counts": dict(self.counts),
            "failures": dict(self.failures),
            "failure_text": dict(self.failure_text.most_common(5)),
            "closes": dict(self.closes),
            "outage_s": self.outage_s.tobytes(),
            "tries": self.tries.tobytes(),
            "last_hello": self.last_hello,
            "connected": self.connected,
            "away": [u.uid for u in self.users if u.ws is None],
            "cpu_s": time.process_time(),
            "lag_ms": self.lag_ms,
            "dup_sample": self.dup_sample,
        }


def clients_process(
    index: int,
    uids: range,
    target: Target,
    source: str,
    policy: Reconnect,
    ramp: int,
    shared: tuple[Any, Any],
    results: mp.Queue,
    stop: Any,
) -> None:
    """Connect ``uids`` (at most ``ramp`` connects in flight), keep them connected until
    ``stop``, then report (``("clients", index, report)``) and let go."""
    run(clients_main(index, uids, target, source, policy, ramp, shared, results, stop))


async def clients_main(
    index: int,
    uids: range,
    target: Target,
    source: str,
    policy: Reconnect,
    ramp: int,
    shared: tuple[Any, Any],
    results: mp.Queue,
    stop: Any,
) -> None:
    from pmq.domain.jwtauth import mint_token

    users = [User(uid, f"/ws?token={mint_token(target.secret, uid, ttl=7200)}") for uid in uids]
    clients = Clients(index, users, target, source, policy, shared)
    gate = asyncio.Semaphore(ramp)
    tasks = [asyncio.create_task(clients.live(u, gate)) for u in users]
    helpers = [asyncio.create_task(clients.ack_rounds()), asyncio.create_task(clients.watch_lag())]
    while clients.connected < len(users) and not stop.is_set():
        await asyncio.sleep(0.2)
    settle_heap()
    # No cycle collection from here on: every connect leaves a few cycles (futures, the
    # transport and its protocol), and collecting them, over a heap that reconnects keep
    # growing, took a fifth of a client process's CPU in the storm, when its loop's lag is
    # what delays the hellos it counts. The garbage stays bounded: one run's connects.
    gc.disable()
    await asyncio.get_running_loop().run_in_executor(None, stop.wait)
    clients.stopping = True
    results.put(("clients", index, clients.report()))
    for task in helpers:
        task.cancel()
    await let_go([u.ws for u in users if u.ws is not None], tasks, raw=True)


# The site ------------------------------------------------------------------------------
class Site:
    """Unicast messages at ``rate`` per second to random uids, each retried (same
    idempotency key, every 0.1 s, each try bounded by 5 s) until answered 2xx or 4xx or
    ``give_up`` s pass, as a site would; at most ``in_flight`` tries at once. A request's
    latency runs from when it was due to its final answer, so waiting for a free slot or for
    the node to come back counts."""

    def __init__(
        self, target: Target, uids: range, rate: float, in_flight: int, give_up: float, run_id: str
    ) -> None:
        self.target, self.uids, self.rate, self.give_up = target, uids, rate, give_up
        self.run_id = run_id
        self.head = post_head("/api/v1/messages", target.ingest_port, target.api_key)
        self.gate = asyncio.Semaphore(in_flight)
        self.idle: list[HttpClient] = []
        self.due, self.latency_ms = array("d"), array("d")
        self.answer_ms = array("d")  # the final try alone: the node's own ingest latency
        self.status, self.tries = array("q"), array("q")
        self.to, self.ids = array("q"), array("q")  # per accepted message
        self.failures: collections.Counter[str] = collections.Counter()

    async def send(self, n: int, uid: int, due: float) -> None:
        body = orjson.dumps(
            {"to": uid, "kind": "notice", "id": f"{self.run_id}-{n}", "body": {"n": n, "t": due}}
        )
        tries = 0
        while True:
            tries += 1
            status, data, answer_ms = await self.try_once(body)
            if (status and status < 500) or time.time() - due > self.give_up:
                break
            await asyncio.sleep(0.1)
        self.due.append(due)
        self.latency_ms.append((time.time() - due) * 1000)
        self.answer_ms.append(answer_ms)
        self.status.append(status)
        self.tries.append(tries)
        if status in (200, 202):
            for mid in data["ids"]:
                self.to.append(uid)
                self.ids.append(int(mid))

    async def try_once(self, body: bytes) -> tuple[int, Any, float]:
        """(status, the reply's data, ms from sending to the answer), or (0, None, ms) when
        no answer came."""
        async with self.gate:
            client = self.idle.pop() if self.idle else None
            sent = time.time()
            try:
                async with asyncio.timeout(5):
                    if client is None or not client.transport or client.transport.is_closing():
                        client = await HttpClient.open(self.target.ingest_port)
                    status, raw = await client.request(self.head, body)
            except (OSError, TimeoutError) as exc:
                if client is not None:
                    client.close()
                self.failures[failure_kind(exc)] += 1
                return 0, None, (time.time() - sent) * 1000
            self.idle.append(client)
            if status >= 500:
                self.failures["5xx"] += 1
            data = orjson.loads(raw).get("data") if status < 300 else None
            return status, data, (time.time() - sent) * 1000

    async def publish(self, stop: Any) -> None:
        rng = random.Random(self.run_id)
        tasks: set[asyncio.Task[None]] = set()
        start = time.time()
        sent = 0
        while not stop.is_set():
            now = time.time()
            while sent < (now - start) * self.rate:
                task = asyncio.create_task(
                    self.send(sent, rng.choice(self.uids), start + sent / self.rate)
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            await asyncio.sleep(0.005)
        if tasks:
            await asyncio.wait(tasks)
        for client in self.idle:
            client.close()

    def report(self) -> dict[str, Any]:
        return {
            "due": self.due.tobytes(),
            "latency_ms": self.latency_ms.tobytes(),
            "answer_ms": self.answer_ms.tobytes(),
            "status": self.status.tobytes(),
            "tries": self.tries.tobytes(),
            "to": self.to.tobytes(),
            "ids": self.ids.tobytes(),
            "failures": dict(self.failures),
            "cpu_s": time.process_time(),
        }


def site_process(
    target: Target, uids: range, rate: float, run_id: str, results: mp.Queue, go: Any, stop: Any
) -> None:
    """From ``go`` until ``stop``, publish; then report ``("site", 0, report)``."""

    async def main() -> None:
        site = Site(target, uids, rate, in_flight=128, give_up=30.0, run_id=run_id)
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        with contextlib.suppress(Exception):
            site.idle.append(await HttpClient.open(target.ingest_port))
        await site.publish(stop)
        results.put(("site", 0, site.report()))

    run(main())
