"""Events to the site: their throughput, and what webhooks cost a unicast, on and off.

    python -m bench.webhooks -u 200 -m 20000 -C 32 [--rounds 3] [--events TYPES]

For each of "off" (no ``webhooks.url``) and "on" (every event type, to a receiver in a
process of its own: an asyncio HTTP/1.1 server that checks each signature and answers 204), a
fresh node (bench.run_node's config, heartbeat 25 s) is started, U users connect (one
WebSocket each) and ack every push at once, and C keep-alive publishers send M messages in
all to random users (POST /api/v1/messages). Every message is acked within the default
``undelivered_after`` (60 s): its timer is set (the run ends before timers fall due).

Reported (JSON on stdout), per run of each mode (--rounds pairs, alternated; and the
medians of each mode's publish rate and CPU): publish throughput and HTTP latency
percentiles (ms), pushes received, the node's CPU per message (µs: socket workers, task
workers, all; from the first publish to a second after the last push or event, acks
included), and with webhooks on: the events received (U user.online and M message.acked
expected, each once), duplicates, bad signatures, event throughput (events received / from
the first publish to the last event) and how long the outbox took to drain after the last
publish. With --backlog the site refuses every POST (503) until all messages are published
and acked, then takes them: events/s is then the rate at which a backlog drains. Bounded:
each phase has a deadline (--deadline seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import multiprocessing as mp
import os
import random
import secrets
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from websockets.asyncio.client import connect

from bench.common import (
    HttpClient,
    RequestReader,
    cpu_used,
    emit,
    log,
    node_cpu,
    percentiles,
    post_head,
    run,
)
from bench.run_node import delete_prefix, start_master, toml_value, wait_ready, write_config
from pmq.domain.jwtauth import mint_token


class Receiver(RequestReader):
    """One keep-alive connection of the site's endpoint: each POST's signature checked, its
    events' ids and arrival noted in ``site``, 204 answered."""

    def __init__(self, site: Site) -> None:
        super().__init__()
        self.site = site
        self.signature = b""

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.signature = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-pmq-signature":
            self.signature = value

    def request(self, url: bytes, body: bytes) -> None:
        assert self.transport is not None
        if not self.site.open.is_set():  # holding a backlog: refused, sent again later
            self.transport.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")
            return
        self.site.take(body, self.signature.decode())
        self.transport.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")


class Site:
    """The endpoint's tally; ``received`` (a shared counter) is read by the bench."""

    def __init__(self, secret: str, received: Any, open: Any) -> None:
        self.secret = secret.encode()
        self.received = received
        self.open = open  # cleared: every POST is answered 503
        self.ids: set[str] = set()
        self.events = self.duplicates = self.bad = self.posts = 0
        self.last = 0.0
        self.latency: list[float] = []

    def take(self, body: bytes, signature: str) -> None:
        self.posts += 1
        expected = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(signature, expected):
            self.bad += 1
            return
        now = time.time()
        for event in orjson.loads(body)["events"]:
            if event["id"] in self.ids:
                self.duplicates += 1
                continue
            self.ids.add(event["id"])
            self.events += 1
            self.latency.append(now * 1000 - event["ts"])
        self.received.value = self.events
        self.last = now

    def report(self) -> dict[str, Any]:
        return {
            "received": self.events, "duplicates": self.duplicates, "bad_signatures": self.bad,
            "posts": self.posts, "last": self.last, "latency_ms": percentiles(self.latency),
        }


def site_process(
    secret: str, ports: Any, received: Any, open: Any, stop: Any, reports: Any
) -> None:
    """The site's endpoint in a process of its own (its CPU is not the publishers'): its
    port on ``ports``, its report on ``reports`` once ``stop`` is set."""

    async def serve() -> None:
        site = Site(secret, received, open)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Receiver(site), "127.0.0.1", 0)
        ports.put(server.sockets[0].getsockname()[1])
        await loop.run_in_executor(None, stop.wait)
        server.close()
        reports.put(site.report())

    run(serve())


async def users(
    port: int, secret: str, uids: list[int], ready: asyncio.Event
) -> tuple[list[asyncio.Task[None]], list[int]]:
    """Connect every uid (``ready`` set once all are); each acks every push at once.
    Returns the users' tasks and a one-item list counting the pushes received."""
    got = [0]

    async def one(uid: int) -> None:
        token = mint_token(secret, uid, ttl=7200)
        async with connect(f"ws://127.0.0.1:{port}/ws?token={token}", max_queue=None) as ws:
            await ws.recv()  # hello
            connected.append(uid)
            if len(connected) == len(uids):
                ready.set()
            async for frame in ws:
                if isinstance(frame, str) and frame.startswith('{"type":"push"'):
                    got[0] += 1
                    message_id = orjson.loads(frame)["msg"]["id"]
                    ack = {"action": "msg.ack", "data": {"ids": [message_id]}}
                    await ws.send(orjson.dumps(ack).decode())

    connected: list[int] = []
    tasks = [asyncio.create_task(one(uid)) for uid in uids]
    return tasks, got


async def publish(port: int, uids: list[int], count: int, conns: int) -> dict[str, Any]:
    clients = [await HttpClient.open(port) for _ in range(conns)]
    head = post_head("/api/v1/messages", port)
    latency: list[float] = []
    statuses: dict[int, int] = {}
    left = [count]
    rng = random.Random(7)

    async def pump(client: HttpClient) -> None:
        while left[0] > 0:
            left[0] -= 1
            message = {"to": rng.choice(uids), "kind": "notice", "body": {"t": time.time()}}
            body = orjson.dumps(message)
            start = time.perf_counter()
            status, _ = await client.request(head, body)
            latency.append((time.perf_counter() - start) * 1000)
            statuses[status] = statuses.get(status, 0) + 1

    start = time.time()
    await asyncio.gather(*(pump(c) for c in clients))
    elapsed = time.time() - start
    for c in clients:
        c.close()
    return {
        "start": start, "seconds": round(elapsed, 2), "per_second": round(count / elapsed),
        "statuses": statuses, "latency_ms": percentiles(latency),
    }


def cpu_per_message(used: dict[str, float], messages: int) -> dict[str, float]:
    """The node's CPU per message (µs), socket workers and task workers apart."""
    socket = sum(v for k, v in used.items() if "socket worker" in k)
    task = sum(v for k, v in used.items() if "task worker" in k)
    return {
        "socket_workers": round(socket * 1e6 / messages, 1),
        "task_workers": round(task * 1e6 / messages, 1),
        "total": round(used["total"] * 1e6 / messages, 1),
    }


async def until(condition: Any, deadline: float) -> bool:
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.05)
    return True


async def measure(args: argparse.Namespace, hooks: bool) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="pmq-bench-hooks-"))
    node_args = argparse.Namespace(
        storage=None, port=0, ingest_port=0, workers=args.workers, task_workers=args.task_workers,
        redis=args.redis, durability="none", heartbeat=25.0, heartbeat_timeout=60.0,
        log_level="warning",
    )
    info = write_config(node_args, directory)
    hook_secret = secrets.token_urlsafe(32)
    ports: mp.Queue[int] = mp.Queue()
    reports: mp.Queue[dict[str, Any]] = mp.Queue()
    stop, received, open_ = mp.Event(), mp.Value("q", 0), mp.Event()
    if not args.backlog:
        open_.set()
    site = mp.Process(
        target=site_process, args=(hook_secret, ports, received, open_, stop, reports)
    )
    if hooks:
        site.start()
        port = ports.get(timeout=30)
        settings: dict[str, Any] = {
            "url": f"http://127.0.0.1:{port}/events", "secret": hook_secret,
        }
        if args.events:
            settings["events"] = args.events.split(",")
        with open(info["config"], "a") as config:
            lines = "".join(f"{k} = {toml_value(v)}\n" for k, v in settings.items())
            config.write("\n[webhooks]\n" + lines)
    master = start_master(
        info, directory, {k: v for k, v in os.environ.items() if not k.startswith("PMQ_")}
    )
    try:
        if not wait_ready(master, info["control"], 60):
            raise SystemExit(f"node did not start: see {info['log']}")
        uids = list(range(1, args.users + 1))
        ready = asyncio.Event()
        tasks, got = await users(info["ws_port"], info["secret"], uids, ready)
        await asyncio.wait_for(ready.wait(), args.deadline)
        log("mode", "on" if hooks else "off", ": users connected, publishing")
        cpu_before = node_cpu(info["node"])
        published = await publish(info["ingest_port"], uids, args.messages, args.connections)
        await until(lambda: got[0] >= args.messages, args.deadline)
        result: dict[str, Any] = {"publish": published, "pushes": got[0]}
        if hooks:
            wanted = args.events.split(",") if args.events else ["user.online", "message.acked"]
            expected = args.users * ("user.online" in wanted)
            expected += args.messages * ("message.acked" in wanted)
            done = published["start"] + published["seconds"]
            if args.backlog:  # every event waits in the outbox; then the site takes them
                await asyncio.sleep(2)  # the last acks' events queued
                done = time.time()
                open_.set()
            await until(lambda: received.value >= expected, args.deadline)
            stop.set()
            report = reports.get(timeout=30)
            last = report.pop("last")
            span = max(last - (done if args.backlog else published["start"]), 1e-9)
            result["events"] = {
                "expected": expected, **report, "per_second": round(report["received"] / span),
                "drained_after_last_publish_s": round(max(0.0, last - done), 2),
            }
        await asyncio.sleep(1)  # the last acks (and their events) handled
        result["cpu_us_per_message"] = cpu_per_message(
            cpu_used(cpu_before, node_cpu(info["node"])), args.messages
        )
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return result
    finally:
        master.terminate()
        try:
            master.wait(30)
        except subprocess.TimeoutExpired:
            master.kill()
        if hooks:
            stop.set()
            site.join(10)
        delete_prefix(info["redis"], info["prefix"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-u", "--users", type=int, default=200)
    parser.add_argument("-m", "--messages", type=int, default=20000)
    parser.add_argument("-C", "--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--task-workers", type=int, default=1)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=1, help="off/on pairs, alternated")
    parser.add_argument(
        "--backlog", action="store_true",
        help="the site refuses (503) until every message is published and acked, then takes "
        "the backlog: events/s is the outbox's drain rate",
    )
    parser.add_argument(
        "--events", default="", help="webhooks.events of the 'on' run, comma-separated (all)"
    )
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for _ in range(args.rounds):  # alternated, so a load that comes and goes hits both
        for mode in runs:
            runs[mode].append(run(measure(args, mode == "on")))
    medians = {
        mode: {
            "publish_per_second": statistics.median(r["publish"]["per_second"] for r in results),
            "cpu_us_per_message": statistics.median(
                r["cpu_us_per_message"]["total"] for r in results
            ),
        }
        for mode, results in runs.items()
    }
    emit({
        "users": args.users, "messages": args.messages, "connections": args.connections,
        "events": args.events or "all", "medians": medians, **runs,
    })


if __name__ == "__main__":
    main()
