"""Slowloris on the ingest port: does a publisher still get its answers in time?

    python -m bench.slowloris [--connections 1000] [--phase 30] [--rate 100] [--rounds 1]

Starts its own redis-server and node (bench.soak's: AOF Redis on a free port, 2 socket
workers, 1 task worker, SQLite, in a temporary directory), then runs ``--rounds`` pairs of
phases of ``--phase`` seconds each, and one unloaded phase more at the end, with the same
publisher:

- ``unloaded``: the publisher alone: ``--publisher-connections`` keep-alive connections
  sending POST /api/v1/messages (offline uids) at ``--rate`` requests per second in all,
  each on a fixed schedule; latency is send to answer.
- ``slowloris``: ``--connections`` slow connections (over ``--processes`` processes, at
  most 15,000 each) first, each sending a request a byte a second (half dribble their head,
  half send a whole head with Content-Length and dribble the body); when the server answers
  or closes one, it is counted and opened again at once, so the pressure stays on for the
  whole phase. Once all are open, the publisher runs as when unloaded.

Reports each phase's latency percentiles side by side, the ratio of the loaded p99 to the
unloaded one per round and over all phases of each kind pooled (the goal: at most 2), how
every slow connection ended (408 from ingest.request_timeout, another status, closed
without a reply, reset) and how long it was held, the 408s the node itself counted, and
the CPU the node and Redis used per phase. Writes the JSON to ``--out`` (default
bench/figures/<today>/slowloris-<HHMM>.json). Stops by itself (every wait has a limit of
``--time-limit`` seconds); every socket is to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any, cast

import orjson
import psutil

from bench.common import (
    MAX_SOCKETS_PER_PROCESS,
    HttpClient,
    Target,
    collect,
    connected_socket,
    connection_over,
    emit,
    load_average,
    log,
    node_cpu,
    node_status,
    percentiles,
    post_head,
    run,
    source_addresses,
)
from bench.run_node import free_port
from bench.soak import start_node, start_redis, stop_process

PATH = "/api/v1/messages"
GOAL_RATIO = 2.0  # the loaded p99 may be at most this many times the unloaded one
TICKS_PER_SECOND = 10  # slow connections write on a tenth of the ticks each: spread out


# The publisher --------------------------------------------------------------------------
def publisher(target: Target, args: argparse.Namespace, seconds: float, out: mp.Queue) -> None:
    out.put(("published", 0, run(publish(target, args, seconds))))


async def publish(target: Target, args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    """``args.rate`` requests per second over ``args.publisher_connections`` connections, each
    on its own fixed schedule (a late answer delays that connection's next send, never
    bunches them up) for ``seconds``."""
    clients = [await HttpClient.open(target.ingest_port) for _ in range(args.publisher_connections)]
    head = post_head(PATH, target.ingest_port, target.api_key)
    interval = len(clients) / args.rate
    latency = array("d")
    statuses: collections.Counter[int] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    rng = random.Random(os.getpid())
    cpu0 = time.process_time()
    start = time.monotonic() + 0.1

    async def one(index: int, client: HttpClient) -> None:
        due = start + index * interval / len(clients)
        while due < start + seconds:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            body = orjson.dumps(
                {"to": rng.randrange(10**8, 2 * 10**8), "kind": "notice", "body": {"b": 1}}
            )
            sent = time.perf_counter()
            try:
                status, _ = await client.request(head, body)
            except (ConnectionError, OSError) as exc:
                errors[type(exc).__name__] += 1
                return
            latency.append((time.perf_counter() - sent) * 1000)
            statuses[status] += 1
            due = max(due + interval, time.monotonic())

    await asyncio.gather(*(one(i, c) for i, c in enumerate(clients)))
    for client in clients:
        client.close()
    return {
        "latency": latency.tobytes(),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": dict(errors),
        "cpu_s": round(time.process_time() - cpu0, 2),
    }


def run_publisher(
    ctx: Any, target: Target, args: argparse.Namespace
) -> tuple[dict[str, Any], array[float]]:
    """One publisher phase in a process of its own (its latency is not timed on the same
    event loop as the slow connections): its report and every request's latency (ms)."""
    out: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=publisher, args=(target, args, args.phase, out), daemon=True)
    proc.start()
    try:
        report = collect(out, "published", 1, args.phase + 60)[0]
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
    latency = array("d")
    latency.frombytes(report.pop("latency"))
    return {"requests": len(latency), "latency_ms": percentiles(latency), **report}, latency


# The slow connections ---------------------------------------------------------------------
class Slow(asyncio.Protocol):
    """One slow request: ``data`` goes out a byte per second (after ``burst`` at once);
    whatever the server answers or does ends it."""

    def __init__(self, slot: int, data: bytes, burst: int, ended: Any) -> None:
        self.slot = slot
        self.data, self.sent = data, burst
        self.ended = ended
        self.transport: asyncio.Transport | None = None
        self.opened = time.monotonic()
        self.status = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.data[: self.sent])

    def tick(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing() and self.sent < len(self.data):
            transport.write(self.data[self.sent : self.sent + 1])
            self.sent += 1

    def data_received(self, data: bytes) -> None:
        if not self.status:
            first = data.split(b"\r\n", 1)[0].split()
            self.status = first[1].decode() if len(first) > 1 else "garbled"

    def connection_lost(self, exc: Exception | None) -> None:
        if self.status:
            how = self.status
        elif isinstance(exc, ConnectionResetError):
            how = "reset"
        else:
            how = "closed without a reply"
        self.ended(self, how)


def slow_request(index: int, port: int) -> tuple[bytes, int]:
    """The request and how many of its bytes go at once: even connections dribble a head
    that never ends in time, odd ones send a whole head and dribble its body."""
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    )
    if index % 2 == 0:
        return (head + "X-Slow: " + "a" * 400 + "\r\n\r\n").encode(), 1
    body = b'{"to": 1, "kind": "notice", "body": {"pad": "' + b"a" * 400 + b'"}}'
    whole = (head + f"Content-Length: {len(body)}\r\n\r\n").encode()
    return whole + body, len(whole)


async def slowloris(
    index: int, count: int, port: int, source: str, stop: Any, out: mp.Queue
) -> dict[str, Any]:
    open_now: set[Slow] = set()
    outcomes: collections.Counter[str] = collections.Counter()
    held = array("d")  # seconds from connect to the end, per ended connection
    opened = failed = 0
    reopen: asyncio.Queue[int] = asyncio.Queue()

    def ended(conn: Slow, how: str) -> None:
        open_now.discard(conn)
        if stop.is_set() and not conn.status:  # ours, at the end: the server did not end it
            outcomes["open at the end (closed by the bench)"] += 1
            return
        outcomes[how] += 1
        held.append(time.monotonic() - conn.opened)
        reopen.put_nowait(conn.slot)

    async def connect(slot: int) -> None:
        nonlocal opened, failed
        data, burst = slow_request(slot, port)
        try:
            sock = await connected_socket(port, source)
            conn = await connection_over(sock, lambda: Slow(slot, data, burst, ended))
        except OSError:
            failed += 1
            await asyncio.sleep(0.1)
            reopen.put_nowait(slot)
            return
        opened += 1
        if not conn.status and not conn.transport.is_closing():  # type: ignore[union-attr]
            open_now.add(conn)

    async def keep_open() -> None:
        while True:
            await connect(await reopen.get())

    async def ticker() -> None:
        n = 0
        while True:
            await asyncio.sleep(1 / TICKS_PER_SECOND)
            n += 1
            for conn in list(open_now):
                if conn.slot % TICKS_PER_SECOND == n % TICKS_PER_SECOND:
                    conn.tick()

    for start in range(0, count, 100):  # open them 100 at a time
        await asyncio.gather(*(connect(slot) for slot in range(start, min(count, start + 100))))
    out.put(("open", index, len(open_now)))
    tasks = [asyncio.create_task(keep_open()), asyncio.create_task(ticker())]
    samples = []
    cpu0 = time.process_time()
    while not stop.is_set():
        await asyncio.sleep(1)
        samples.append(len(open_now))
    for task in tasks:
        task.cancel()
    for conn in list(open_now):
        if conn.transport is not None:
            conn.transport.abort()
    await asyncio.sleep(0.1)
    return {
        "opened": opened,
        "connect_failures": failed,
        "outcomes": dict(outcomes),
        "held": held.tobytes(),
        "open_samples": samples,
        "cpu_s": time.process_time() - cpu0,
    }


def slowloris_process(
    index: int, count: int, port: int, source: str, stop: Any, out: mp.Queue
) -> None:
    out.put(("slow-done", index, run(slowloris(index, count, port, source, stop, out))))


# The run ------------------------------------------------------------------------------------
def phase_cpu(target: Target, redis_pid: int) -> dict[str, float]:
    node = node_cpu(target.node)
    times = psutil.Process(redis_pid).cpu_times()
    return {"node": sum(node.values()), "redis": times.user + times.system}


def node_counter(target: Target, name: str) -> int:
    status = node_status(target) or {"workers": []}
    return sum(int(w.get(name, 0) or 0) for w in status["workers"] if w.get("kind") == "socket")


def measure(
    ctx: Any, target: Target, args: argparse.Namespace, redis_pid: int, pooled: array[float]
) -> dict[str, Any]:
    """A publisher phase with the CPU the node and Redis used meanwhile; its latencies are
    added to ``pooled``."""
    cpu0, load0 = phase_cpu(target, redis_pid), load_average()
    start = time.strftime("%H:%M:%S")
    result, latency = run_publisher(ctx, target, args)
    pooled.extend(latency)
    cpu1 = phase_cpu(target, redis_pid)
    result["started"] = start
    result["server_cpu_s"] = {k: round(cpu1[k] - cpu0[k], 2) for k in cpu0}
    result["load_average"] = {"before": load0, "end": load_average()}
    return result


def loaded_phase(
    ctx: Any, target: Target, args: argparse.Namespace, redis_pid: int, pooled: array[float]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The publisher's phase with the slow connections on; (its result, theirs)."""
    procs_n = max(args.processes, -(-args.connections // MAX_SOCKETS_PER_PROCESS))
    out: mp.Queue = ctx.Queue()
    stop = ctx.Event()
    sources = source_addresses(procs_n)
    procs = []
    for i in range(procs_n):
        share = args.connections // procs_n + (1 if i < args.connections % procs_n else 0)
        proc = ctx.Process(
            target=slowloris_process,
            args=(i, share, target.ingest_port, sources[i], stop, out),
            daemon=True,
        )
        proc.start()
        procs.append(proc)
    try:
        opened = collect(out, "open", procs_n, args.time_limit)
        log(f"{sum(opened.values())} slow connections open; publishing")
        timed0 = node_counter(target, "ingest_timed_out")
        result = measure(ctx, target, args, redis_pid, pooled)
        stop.set()
        reports = collect(out, "slow-done", procs_n, args.time_limit)
        time.sleep(args.beat)  # the workers' next heartbeat carries their counters
        timed_out = node_counter(target, "ingest_timed_out") - timed0
    finally:
        stop.set()
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
    outcomes: collections.Counter[str] = collections.Counter()
    held = array("d")
    for report in reports.values():
        outcomes.update(report["outcomes"])
        held.frombytes(report["held"])
    per_process = [r["open_samples"] for r in reports.values()]
    samples = [sum(s) for s in zip(*per_process, strict=False)]  # a second each
    slow = {
        "connections": args.connections,
        "processes": procs_n,
        "opened": sum(r["opened"] for r in reports.values()),
        "connect_failures": sum(r["connect_failures"] for r in reports.values()),
        "ended": dict(outcomes.most_common()),
        "ended_by_408": outcomes.get("408", 0),
        "held_s": percentiles(held, 1),
        "open_during_phase": {
            "min": min(samples) if samples else None,
            "mean": round(sum(samples) / len(samples)) if samples else None,
        },
        "node_counted_408": timed_out,
        "cpu_s": round(sum(r["cpu_s"] for r in reports.values()), 2),
    }
    return result, slow


def ratio(loaded: dict[str, Any], unloaded: dict[str, Any]) -> float | None:
    """The loaded phase's p99 latency over the unloaded one's."""
    base, under = unloaded["latency_ms"]["p99"], loaded["latency_ms"]["p99"]
    return round(under / base, 2) if base and under else None


def commit_of() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or "unknown"


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--connections", type=int, default=1000, help="slow connections")
    parser.add_argument("--processes", type=int, default=1, help="slow-connection processes")
    parser.add_argument("--phase", type=float, default=30, help="seconds per phase")
    parser.add_argument("--rate", type=float, default=100, help="publisher requests/s")
    parser.add_argument("--publisher-connections", type=int, default=4)
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="unloaded/loaded pairs, alternating (then one unloaded phase more)",
    )
    parser.add_argument(
        "--request-timeout", type=float, default=0, help="ingest.request_timeout (0: default)"
    )
    parser.add_argument("--time-limit", type=float, default=120, help="limit of every wait")
    parser.add_argument("--out", help="JSON file (default bench/figures/<today>/...)")
    args = parser.parse_args()
    if not 1 <= args.connections <= 20000:
        parser.error("--connections: 1 to 20,000")
    if not 1 <= args.phase <= 300:
        parser.error("--phase: 1 to 300 seconds")
    if not 1 <= args.rounds <= 10:
        parser.error("--rounds: 1 to 10")
    # bench.soak.start_node's config (bench.run_node.write_config) reads these
    args.port = args.ingest_port = 0
    args.workers, args.task_workers, args.storage = 2, 1, None
    args.durability, args.log_level = "none", "warning"
    args.heartbeat, args.heartbeat_timeout = 25.0, 60.0
    args.beat = 2.0  # seconds between worker heartbeats to the master (at most)
    return args


def main() -> None:
    args = parse()
    day, stamp = time.strftime("%Y-%m-%d"), time.strftime("%H%M")
    out_path = Path(args.out or f"bench/figures/{day}/slowloris-{stamp}.json")
    directory = Path(tempfile.mkdtemp(prefix="pmq-slowloris-"))
    args.redis = f"redis://127.0.0.1:{free_port()}/0"
    redis_proc = start_redis(int(args.redis.rsplit(":", 1)[1].split("/")[0]), directory)
    settings = {}
    if args.request_timeout:
        settings["ingest.request_timeout"] = str(args.request_timeout)
    node = None
    alone, attacked = array("d"), array("d")  # every latency of the phases of each kind
    try:
        node, info = start_node(args, directory, settings)
        target = Target(
            node=info["node"], ws_port=info["ws_port"], ingest_port=info["ingest_port"],
            secret=info["secret"], api_key="", control=info["control"], redis_url=args.redis,
        )
        ctx = mp.get_context("fork")
        rounds = []
        for n in range(1, args.rounds + 1):
            log(f"round {n}: the publisher alone for {args.phase:g} s")
            unloaded = measure(ctx, target, args, redis_proc.pid, alone)
            log(f"round {n}: {args.connections} slow connections, then the publisher")
            loaded, slow = loaded_phase(ctx, target, args, redis_proc.pid, attacked)
            rounds.append(
                {
                    "unloaded": unloaded,
                    "slowloris": loaded,
                    "p99_ratio": ratio(loaded, unloaded),
                    "slow_connections": slow,
                }
            )
        log("last: the publisher alone again")
        after = measure(ctx, target, args, redis_proc.pid, alone)
    finally:
        if node is not None:
            stop_process(node, 40)
        stop_process(redis_proc, 10)
        shutil.rmtree(directory, ignore_errors=True)
    pooled = {"unloaded": percentiles(alone), "slowloris": percentiles(attacked)}
    pooled_ratio = ratio({"latency_ms": pooled["slowloris"]}, {"latency_ms": pooled["unloaded"]})
    result = {
        "bench": "slowloris",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "commit": commit_of(),
        "settings": {
            "slow_connections": args.connections,
            "phase_s": args.phase,
            "publisher_rate_per_s": args.rate,
            "publisher_connections": args.publisher_connections,
            "ingest_request_timeout_s": args.request_timeout or 10.0,
            "socket_workers": args.workers,
        },
        "goal": f"loaded p99 <= {GOAL_RATIO:g} x unloaded p99",
        "pooled_latency_ms": pooled,  # every unloaded phase (with the last) / every loaded one
        "pooled_p99_ratio": pooled_ratio,
        "goal_met": pooled_ratio is not None and pooled_ratio <= GOAL_RATIO,
        "rounds": rounds,
        "unloaded_after": after,
        "machine_cpus": os.cpu_count(),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    emit(result)
    log(f"written to {out_path}")


if __name__ == "__main__":
    main()
