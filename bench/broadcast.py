"""Broadcast fan-out: N connected clients, K broadcasts to "all", time to every delivery.

    python -m bench.broadcast --config /tmp/x.toml -n 50000 -p 4 -k 3 --spacing 5

N connections (uids --uid-base .. +N-1, raw RFC 6455 client from bench.common, one
loopback source address per process) are spread over P load-generator processes (at most
15,000 sockets each). Once all are connected (hello received), the bench publishes K
broadcasts, POST /api/v1/broadcast {"group": G, "body": {"t": T, ...}, "id": KEY}, S seconds
apart, where T is the wall-clock time taken just before the request is written. Every
client notes the arrival time of each push frame and matches it to the broadcast by the id
the 202 answered (and the body's run tag); all processes share the machine's clock.

Meanwhile --probes extra connections send the `ping` action every --probe-interval
seconds and note the round trip: a client-side view of how long a socket worker's event
loop goes without serving other clients while it fans out. Each probe and each counted
connection is mapped to its socket worker through the registry in Redis (conn id from the
hello -> worker id), so deliveries are also reported per worker.

Reported, as JSON on stdout, per broadcast and over all of them:

- delivered (connections that got it) vs connected, lost (connected but not received by
  the end, --deadline seconds after the last publish), late (received more than --deadline
  seconds after its own publish), duplicates; pushes of other runs' broadcasts (replayed
  on connect by a node that already sent some) are counted apart;
- publish -> receive latency over connections, ms: p0 (first delivery), p50, p90, p99,
  p100 (last delivery); the same per socket worker; the HTTP publish round trip;
- the node's own figures from ``pmqctl status`` (the master's status, fed by every
  worker's heartbeat each second): ``broadcast_deliveries`` (delta) and
  ``fanout_max_stall_ms`` (the longest chunk of writes between two yields, a maximum since
  the worker started) per socket worker, read before the first publish, --settle seconds
  after each, and at the end;
- probe ping round trips (max per socket worker, during each broadcast and when idle);
- `unread` frames received after each broadcast (the live badge update it triggers);
- CPU seconds of the node's processes, Redis, the load generator and the whole machine
  over the publish phase; load average.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import multiprocessing as mp
import secrets
import subprocess
import time
from array import array
from pathlib import Path
from typing import Any

import orjson
import psutil

from bench.common import (
    MAX_SOCKETS_PER_PROCESS,
    HttpClient,
    RawWebSocket,
    Target,
    add_target_args,
    calls_per,
    collect,
    cpu_used,
    emit,
    let_go,
    load_average,
    log,
    machine_cpu,
    node_cpu,
    node_status,
    post_head,
    redis_calls,
    redis_cpu,
    run,
    settle_heap,
    source_addresses,
    target_from,
)

PUSH = b'{"type":"push"'
UNREAD = b'{"type":"unread"'
NAN = float("nan")


# Load-generator processes ------------------------------------------------------------
def child(
    index: int,
    count: int,
    uid_start: int,
    target: Target,
    source: str,
    concurrency: int,
    tag: str,
    received: Any,
    results: mp.Queue,
    go: Any,
    stop: Any,
) -> None:
    run(
        child_main(
            index, count, uid_start, target, source, concurrency, tag, received, results, go, stop
        )
    )


async def child_main(
    index: int,
    count: int,
    uid_start: int,
    target: Target,
    source: str,
    concurrency: int,
    tag: str,
    received: Any,
    results: mp.Queue,
    go: Any,
    stop: Any,
) -> None:
    from pmq.domain.jwtauth import mint_token

    loop = asyncio.get_running_loop()
    paths = [
        f"/ws?token={mint_token(target.secret, uid_start + i, ttl=7200)}" for i in range(count)
    ]
    results.put(("ready", index, None))
    await loop.run_in_executor(None, go.wait)

    tag_bytes = tag.encode()
    # Per broadcast id: arrival time per connection slot (NaN = not yet), duplicates.
    arrivals: dict[str, array[float]] = {}
    dups: collections.Counter[str] = collections.Counter()
    unread_times = array("d")
    other = collections.Counter[str]()
    conn_ids = [""] * count
    ok = array("b", bytes(count))
    errors: collections.Counter[str] = collections.Counter()
    drops: collections.Counter[str] = collections.Counter()
    state = {"done": 0, "letting_go": False}
    all_tried = loop.create_future()

    def on_text(slot: int, data: bytes) -> None:
        now = time.time()
        if data.startswith(PUSH):
            if tag_bytes not in data:
                other["push of another run"] += 1
                return
            msg = orjson.loads(data)["msg"]
            times = arrivals.get(msg["id"])
            if times is None:
                times = arrivals[msg["id"]] = array("d", [NAN]) * count
            if times[slot] == times[slot]:  # not NaN: seen before
                dups[msg["id"]] += 1
                return
            times[slot] = now
            received[index] += 1
        elif data.startswith(UNREAD):
            unread_times.append(now)
        elif not data.startswith(b'{"type":"hello"'):
            other[bytes(data[:40]).decode("utf-8", "replace")] += 1

    gate = asyncio.Semaphore(concurrency)
    sockets: list[RawWebSocket] = []

    async def one(slot: int, path: str) -> None:
        ws: RawWebSocket | None
        async with gate:
            try:
                ws = await RawWebSocket.connect(
                    target.ws_port, path, source, lambda data, s=slot: on_text(s, data)
                )
            except Exception as exc:  # counted and named
                errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
                ws = None
            else:
                ok[slot] = 1
                try:
                    conn_ids[slot] = orjson.loads(ws.first_text.result()).get("conn_id", "")
                except (orjson.JSONDecodeError, AttributeError):
                    pass
                sockets.append(ws)
            finally:
                state["done"] += 1
                if state["done"] == count and not all_tried.done():
                    all_tried.set_result(None)
        if ws is None:
            return
        reason = await ws.closed
        if not state["letting_go"]:
            drops[reason] += 1

    tasks = [asyncio.create_task(one(i, p)) for i, p in enumerate(paths)]
    del paths
    await all_tried
    settle_heap()
    results.put(
        (
            "connected",
            index,
            {"ok": sum(ok), "errors": dict(errors.most_common(5)), "conn_ids": conn_ids},
        )
    )
    cpu_start = time.process_time()
    await loop.run_in_executor(None, stop.wait)
    cpu_s = time.process_time() - cpu_start
    state["letting_go"] = True
    results.put(
        (
            "done",
            index,
            {
                "ok": ok.tobytes(),
                "arrivals": {k: v.tobytes() for k, v in arrivals.items()},
                "duplicates": dict(dups),
                "unread_times": unread_times.tobytes(),
                "other": dict(other),
                "drops": dict(drops),
                "cpu_s": cpu_s,
            },
        )
    )
    await let_go(sockets, tasks, raw=True)


# Probes: ping round trips while the node fans out -------------------------------------
class Probe:
    def __init__(self, uid: int) -> None:
        self.uid = uid
        self.ws: RawWebSocket | None = None
        self.conn_id = ""
        self.waiting: dict[str, tuple[float, asyncio.Future[float]]] = {}
        self.samples: list[tuple[float, float]] = []  # (wall time sent, round trip ms)
        self.errors = 0

    def on_text(self, data: bytes) -> None:
        if data.startswith(b'{"type":"reply"'):
            reply = orjson.loads(data)
            entry = self.waiting.pop(reply.get("id") or "", None)
            if entry is not None and not entry[1].done():
                entry[1].set_result(time.perf_counter())

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        assert self.ws is not None
        loop = asyncio.get_running_loop()
        n = 0
        while not stop.is_set() and not self.ws.closed.done():
            n += 1
            rid = str(n)
            fut: asyncio.Future[float] = loop.create_future()
            sent_wall, sent = time.time(), time.perf_counter()
            self.waiting[rid] = (sent, fut)
            self.ws.send(0x1, b'{"action":"ping","id":"%s"}' % rid.encode())
            try:
                got = await asyncio.wait_for(fut, 10)
                self.samples.append((sent_wall, (got - sent) * 1000))
            except TimeoutError:
                self.errors += 1
                self.waiting.pop(rid, None)
            await asyncio.sleep(interval)


# Helpers ---------------------------------------------------------------------------
def spread(values: list[float], digits: int = 1) -> dict[str, float | None]:
    """p0/p50/p90/p99/p100 of ``values`` (nearest rank)."""
    if not values:
        return {"p0": None, "p50": None, "p90": None, "p99": None, "p100": None}
    ordered = sorted(values)
    n = len(ordered)

    def at(q: float) -> float:
        return round(ordered[min(n - 1, max(0, math.ceil(q * n) - 1))], digits)

    return {
        "p0": round(ordered[0], digits),
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "p100": round(ordered[-1], digits),
    }


def socket_workers(status: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Socket workers by their id (the registry's worker id), from a node status."""
    if not status:
        return {}
    return {
        str(w.get("id") or f"#{w.get('index')}"): w
        for w in status.get("workers", [])
        if w.get("kind") == "socket"
    }


def fanout_view(status: dict[str, Any] | None, label: dict[str, str]) -> dict[str, Any]:
    return {
        label.get(wid, wid): {
            "connections": w.get("connections"),
            "broadcast_deliveries": w.get("broadcast_deliveries"),
            "fanout_max_stall_ms": w.get("fanout_max_stall_ms"),
        }
        for wid, w in socket_workers(status).items()
    }


def conn_workers(target: Target, prefix: str, worker_ids: list[str]) -> dict[str, str]:
    """conn id -> socket worker id, from each worker's registry hash."""
    import redis

    from pmq.redis.keys import Keys

    keys = Keys(prefix)
    client = redis.Redis.from_url(target.redis_url)
    out: dict[str, str] = {}
    try:
        for wid in worker_ids:
            for conn_id in client.hkeys(keys.worker_conns(wid)):
                out[conn_id.decode() if isinstance(conn_id, bytes) else conn_id] = wid
    except redis.RedisError as exc:
        log(f"could not read the registry: {exc}")
    finally:
        client.close()
    return out


def revision() -> dict[str, Any]:
    """The commit of the working tree and whether pmq/ had uncommitted edits when run."""
    root = Path(__file__).resolve().parent.parent

    def git(*argv: str) -> str:
        try:
            return subprocess.run(
                ["git", *argv], cwd=root, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = git("status", "--short", "--", "pmq").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD"), "pmq_uncommitted": changed}


def cpu_summary(cpu: dict[str, Any], done: dict[int, Any]) -> dict[str, Any]:
    """CPU seconds over the publish phase; ``others`` = what the rest of the machine used
    (other users' processes, py-spy): busy time minus node, Redis and this bench."""
    out = {**cpu, "load_generator": round(sum(d["cpu_s"] for d in done.values()), 2)}
    ours = out["node"]["total"] + out["redis"] + out["load_generator"]
    out["others"] = round(out["machine_busy"] - ours - out["probes_and_publisher"], 2)
    out["capacity"] = round(out["wall"] * (psutil.cpu_count() or 1), 2)
    return out


# Main ------------------------------------------------------------------------------
async def publish_phase(
    target: Target,
    args: argparse.Namespace,
    tag: str,
    label: dict[str, str],
    probe_uid: int,
    prefix: str,
    received: Any,
    expected_each: int,
) -> dict[str, Any]:
    """Open the probes, publish K broadcasts, wait for the deliveries; returns the readings."""
    loop = asyncio.get_running_loop()
    from pmq.domain.jwtauth import mint_token

    # Probes, mapped to their socket worker.
    probes = [Probe(probe_uid + i) for i in range(args.probes)]
    probe_source = source_addresses(1)[0]
    for probe in probes:
        path = f"/ws?token={mint_token(target.secret, probe.uid, ttl=7200)}"
        probe.ws = await RawWebSocket.connect(target.ws_port, path, probe_source, probe.on_text)
        probe.conn_id = orjson.loads(probe.ws.first_text.result()).get("conn_id", "")
    stop_probes = asyncio.Event()
    probe_tasks = [asyncio.create_task(p.run(args.probe_interval, stop_probes)) for p in probes]

    http = await HttpClient.open(target.ingest_port)
    head = post_head("/api/v1/broadcast", target.ingest_port, target.api_key)

    def status() -> Any:
        return loop.run_in_executor(None, node_status, target)

    await asyncio.sleep(args.idle_probe)  # idle round trips, for comparison
    idle_until = time.time()
    statuses = [await status()]
    probe_map = await loop.run_in_executor(
        None, conn_workers, target, prefix, list(socket_workers(statuses[0]))
    )
    cpu0, redis0, machine0 = node_cpu(target.node), redis_cpu(target.redis_url), machine_cpu()
    parent0 = time.process_time()
    calls0 = redis_calls(target.redis_url)
    wall0 = time.time()
    sent: list[dict[str, Any]] = []
    for k in range(args.broadcasts):
        if k:
            await asyncio.sleep(max(0.0, sent[-1]["t"] + args.spacing - time.time()))
        key = f"{tag}-{k}"
        body = {"bench": tag, "seq": k, "t": 0.0, "text": args.text}
        t = time.time()
        body["t"] = t
        payload = orjson.dumps({"group": args.group, "body": body, "id": key})
        code, answer = await http.request(head, payload)
        answered = time.time()
        if code != 202:
            raise RuntimeError(f"broadcast {k}: HTTP {code} {answer[:200]!r}")
        reply = orjson.loads(answer)
        bid = (reply.get("data") or reply)["id"]
        sent.append({"seq": k, "id": bid, "t": t, "http_ms": round((answered - t) * 1000, 2)})
        log(f"broadcast {k} published: id {bid}, 202 in {(answered - t) * 1000:.1f} ms")
        # wait for this one to arrive everywhere (or the spacing / deadline to pass)
        target_count = expected_each * (k + 1)
        limit = t + max(args.spacing if k + 1 < args.broadcasts else args.deadline, 0.1)
        while sum(received) < target_count and time.time() < limit:
            await asyncio.sleep(0.02)
        got = sum(received) - expected_each * k
        log(f"broadcast {k}: {got} of {expected_each} delivered {time.time() - t:.2f}s after")
        if args.settle:
            await asyncio.sleep(max(0.0, t + args.settle - time.time()))
        statuses.append(await status())  # fanout stats of this broadcast (1 s heartbeat)
    cpu1, redis1, machine1 = node_cpu(target.node), redis_cpu(target.redis_url), machine_cpu()
    parent1 = time.process_time()
    calls1 = redis_calls(target.redis_url)
    wall1 = time.time()
    stop_probes.set()
    await asyncio.gather(*probe_tasks, return_exceptions=True)
    http.close()
    for p in probes:
        assert p.ws is not None
        p.ws.close()
    await asyncio.sleep(0.5)
    for p in probes:
        assert p.ws is not None
        p.ws.abort()

    # Probe round trips: idle (before the first publish) and within each broadcast's window.
    probe_report: dict[str, Any] = {}
    by_worker: dict[str, list[Probe]] = collections.defaultdict(list)
    for p in probes:
        by_worker[label.get(probe_map.get(p.conn_id, ""), "unknown")].append(p)
    for name, group in sorted(by_worker.items()):
        samples = [s for p in group for s in p.samples]
        idle = [ms for at, ms in samples if at < idle_until]
        windows = []
        for s in sent:
            during = [ms for at, ms in samples if s["t"] <= at < s["t"] + args.probe_window]
            windows.append(round(max(during), 1) if during else None)
        probe_report[name] = {
            "probes": len(group),
            "pings": len(samples),
            "timeouts": sum(p.errors for p in group),
            "idle_ms": {"p50": spread(idle)["p50"], "max": spread(idle)["p100"]},
            "max_ms_during_broadcast": windows,
        }
    cpu = cpu_used(cpu0, cpu1)
    return {
        "sent": sent,
        "statuses": statuses,
        "probes": probe_report,
        "cpu": {
            "node": cpu,
            "redis": round(redis1 - redis0, 2),
            "probes_and_publisher": round(parent1 - parent0, 2),
            "machine_busy": round(machine1 - machine0, 2),
            "wall": round(wall1 - wall0, 2),
        },
        "redis_calls_per_broadcast": calls_per(calls0, calls1, len(sent)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_target_args(parser)
    parser.add_argument("-n", "--connections", type=int, default=1000)
    parser.add_argument(
        "-p",
        "--processes",
        type=int,
        default=0,
        help="load-generator processes (default: enough for 15,000 sockets each)",
    )
    parser.add_argument("-k", "--broadcasts", type=int, default=1)
    parser.add_argument("--spacing", type=float, default=5.0, help="seconds between publishes")
    parser.add_argument(
        "--deadline",
        type=float,
        default=10.0,
        help="seconds after the last publish to wait for deliveries (later = lost)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=2.5,
        help="seconds after each publish before reading the node's status (its workers "
        "report once a second); must be under --spacing",
    )
    parser.add_argument("--group", default="all")
    parser.add_argument(
        "--text",
        default="scheduled maintenance tonight 02:00-03:00 UTC",
        help="body text, for a realistic frame size",
    )
    parser.add_argument(
        "--concurrency", type=int, default=64, help="connects in flight, over all processes"
    )
    parser.add_argument("--uid-base", type=int, default=3_000_000)
    parser.add_argument("--probes", type=int, default=16, help="ping probe connections")
    parser.add_argument("--probe-interval", type=float, default=0.025)
    parser.add_argument(
        "--probe-window",
        type=float,
        default=3.0,
        help="seconds after a publish that count as 'during' it for probes",
    )
    parser.add_argument(
        "--idle-probe", type=float, default=2.0, help="seconds of probing before the first publish"
    )
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    from pmq import configload

    target = target_from(args)
    prefix = configload.load(args.config).redis.prefix
    n = args.connections
    procs = args.processes or math.ceil(n / MAX_SOCKETS_PER_PROCESS)
    if math.ceil(n / procs) > MAX_SOCKETS_PER_PROCESS:
        parser.error(
            f"{n} connections need at least {math.ceil(n / MAX_SOCKETS_PER_PROCESS)} "
            "processes (15,000 sockets each at most)"
        )
    if args.settle >= args.spacing and args.broadcasts > 1:
        parser.error("--settle must be under --spacing")
    shares = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    per_proc_concurrency = max(1, math.ceil(args.concurrency / procs))
    sources = source_addresses(procs)
    tag = "bb" + secrets.token_hex(4)

    ctx = mp.get_context("fork")
    results: mp.Queue = ctx.Queue()
    go, stop = ctx.Event(), ctx.Event()
    received = ctx.Array("q", procs, lock=False)
    children = []
    uid = args.uid_base
    for i, share in enumerate(shares):
        p = ctx.Process(
            target=child,
            args=(
                i,
                share,
                uid,
                target,
                sources[i],
                per_proc_concurrency,
                tag,
                received,
                results,
                go,
                stop,
            ),
            daemon=True,
        )
        p.start()
        children.append(p)
        uid += share
    probe_uid = uid + 1000
    load_before = load_average()
    try:
        collect(results, "ready", procs, 120)
        log(f"{procs} processes ready; connecting {n}")
        started = time.time()
        go.set()
        connected = collect(results, "connected", procs, 1800)
        ok = sum(c["ok"] for c in connected.values())
        log(f"{ok} of {n} connected in {time.time() - started:.1f}s")
        status0 = node_status(target)
        workers = sorted(socket_workers(status0).items(), key=lambda kv: kv[1].get("index", 0))
        label = {wid: f"socket worker #{w.get('index')}" for wid, w in workers}
        where = conn_workers(target, prefix, [wid for wid, _ in workers])
        load_publish = load_average()
        phase = run(publish_phase(target, args, tag, label, probe_uid, prefix, received, ok))
        load_end = load_average()
        stop.set()
        done = collect(results, "done", procs, 300)
    finally:
        stop.set()
        go.set()
        for p in children:
            p.join(60)
            if p.is_alive():
                p.terminate()

    # Per connection: its worker and, per broadcast, its arrival time.
    slot_worker: list[str] = []
    connected_mask: list[bool] = []
    for i in range(procs):
        oks = done[i]["ok"]
        for slot, conn_id in enumerate(connected[i]["conn_ids"]):
            slot_worker.append(label.get(where.get(conn_id, ""), "unknown"))
            connected_mask.append(bool(oks[slot]))
    # node's own count per socket worker, for the per-worker tables
    names = sorted(set(label[w] for w, _ in workers))
    per_broadcast = []
    all_latency: list[float] = []
    for k, s in enumerate(phase["sent"]):
        times: list[float] = []
        for i in range(procs):
            raw = done[i]["arrivals"].get(s["id"])
            if raw is None:
                times.extend([NAN] * len(connected[i]["conn_ids"]))
            else:
                arr = array("d")
                arr.frombytes(raw)
                times.extend(arr)
        lat: list[float] = []
        per_worker: dict[str, list[float]] = collections.defaultdict(list)
        late = lost = 0
        for t, w, c in zip(times, slot_worker, connected_mask, strict=True):
            if not c:
                continue
            if t != t:
                lost += 1
                continue
            ms = (t - s["t"]) * 1000
            if ms > args.deadline * 1000:
                late += 1
            lat.append(ms)
            per_worker[w].append(ms)
        all_latency.extend(lat)
        before, after = phase["statuses"][k], phase["statuses"][k + 1]
        bw, aw = socket_workers(before), socket_workers(after)
        node_view = {}
        for wid, info in aw.items():
            node_view[label.get(wid, wid)] = {
                "broadcast_deliveries": (info.get("broadcast_deliveries") or 0)
                - (bw.get(wid, {}).get("broadcast_deliveries") or 0),
                "fanout_max_stall_ms_since_start": info.get("fanout_max_stall_ms"),
            }
        duplicates = sum(d["duplicates"].get(s["id"], 0) for d in done.values())
        per_broadcast.append(
            {
                "seq": k,
                "id": s["id"],
                "published_at": round(s["t"], 3),
                "publish_http_ms": s["http_ms"],
                "connected": ok,
                "delivered": len(lat),
                "lost": lost,
                "late_after_deadline": late,
                "duplicates": duplicates,
                "latency_ms": spread(lat),
                "per_worker": {
                    name: {"connections": len(v), **spread(v)}
                    for name, v in sorted(per_worker.items())
                },
                "node": node_view,
                "probe_ping_max_ms": {
                    name: p["max_ms_during_broadcast"][k] for name, p in phase["probes"].items()
                },
            }
        )
    unread = array("d")
    for d in done.values():
        more = array("d")
        more.frombytes(d["unread_times"])
        unread.extend(more)
    unread_after = []
    starts = [s["t"] for s in phase["sent"]] + [math.inf]
    for k, s in enumerate(phase["sent"]):
        mine = [(u - s["t"]) * 1000 for u in unread if s["t"] <= u < starts[k + 1]]
        unread_after.append({"frames": len(mine), "ms_after_publish": spread(mine)})
    errors: collections.Counter[str] = collections.Counter()
    other: collections.Counter[str] = collections.Counter()
    drops: collections.Counter[str] = collections.Counter()
    for c in connected.values():
        errors.update(c["errors"])
    for d in done.values():
        other.update(d["other"])
        drops.update(d["drops"])
    worst = max(per_broadcast, key=lambda b: b["latency_ms"]["p100"] or math.inf)
    result = {
        "bench": "broadcast",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "node": target.node,
        "revision": revision(),
        "connections": n,
        "processes": procs,
        "client": "raw",
        "connected": ok,
        "connect_failed": n - ok,
        "connect_errors": dict(errors.most_common(5)),
        "group": args.group,
        "broadcasts": len(per_broadcast),
        "spacing_s": args.spacing,
        "summary": {
            "delivered": [b["delivered"] for b in per_broadcast],
            "lost": sum(b["lost"] for b in per_broadcast),
            "duplicates": sum(b["duplicates"] for b in per_broadcast),
            "p50_ms": [b["latency_ms"]["p50"] for b in per_broadcast],
            "p100_ms": [b["latency_ms"]["p100"] for b in per_broadcast],
            "worst_p100_ms": worst["latency_ms"]["p100"],
            "all_broadcasts_latency_ms": spread(all_latency),
            "fanout_max_stall_ms_end": {
                label.get(wid, wid): w.get("fanout_max_stall_ms")
                for wid, w in socket_workers(phase["statuses"][-1]).items()
            },
        },
        "per_broadcast": per_broadcast,
        "unread_frames_after": unread_after,
        "probes": phase["probes"],
        "node_status_before": fanout_view(phase["statuses"][0], label),
        "node_workers": names,
        "cpu_s_publish_phase": cpu_summary(phase["cpu"], done),
        "redis_calls_per_broadcast": phase["redis_calls_per_broadcast"],
        "dropped_before_end": dict(drops),
        "other_frames": dict(other.most_common(5)),
        "load_average": {"before": load_before, "publish": load_publish, "end": load_end},
    }
    emit(result)
    if args.out:
        Path(args.out).write_text(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
