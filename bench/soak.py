"""Soak: a node under steady, churning load for a long time; is its memory flat?

    python -m bench.soak --minutes 30

Starts its own redis-server (AOF on, appendfsync everysec, noeviction) on a free port in a
temporary directory and a node (real master, 2 socket workers, 1 task worker, SQLite in the
same directory), then for ``--minutes``: unicast messages at ``--rate`` per second to random
users of ``--users`` (``--online`` of them connected at any time, a ``--churn`` per cent of
those leaving per minute and replaced by users who were offline; clients ack what they get,
now and then ``msg.pull`` and ``unread.get``), and a broadcast every ``--broadcast-every``
seconds. Messages to offline users leave Redis for storage after ``inbox.hot_seconds``
(120 here, swept every 10 s), so Redis holds a window of the traffic, not all of it.

Every ``--sample`` seconds it reads the RSS and PSS of each node process (by title) and of
the redis-server, Redis's used_memory and key count, and the storage queue's depth. At the
end: a least-squares slope per series in MiB per hour over the samples after the warm-up
(the first half of the run unless ``--warmup``), the node log's ERROR and Traceback lines,
and the loss check: every message answered 2xx was received by its user or is still given
to a new connection of theirs (replay and ``msg.pull``), and is in storage. Writes the JSON
to ``--out`` (default bench/figures/<today>/soak-<HHMM>.json), prints a table, stops the node
and Redis, and removes the directory. Talks only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

import psutil
import redis

import pmq
from bench import soak_load
from bench.common import (
    Target,
    collect,
    load_average,
    log,
    machine_cpu,
    node_processes,
    node_status,
    run,
    source_addresses,
)
from bench.run_node import free_port, redis_server, start_master, wait_ready, write_config

MIB = 1024 * 1024
# Settings of the node beyond bench.run_node's, as PMQ_<SECTION>_<KEY> variables. Messages
# to offline users leave Redis after two minutes, so Redis holds a window of the traffic. A
# sweep spends at most a second per pass; every 10 s it keeps up with the soak's few hundred
# offline messages a second on a loaded 2-core machine (every 30 s it fell behind).
NODE_SETTINGS = {"inbox.hot_seconds": "120", "inbox.sweep_seconds": "10"}
LOG_FINDING = re.compile(r" (ERROR|CRITICAL) ")
STAMPED = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")  # a log line's start, not a traceback's
# INFO memory fields that say where Redis's memory goes
REDIS_MEMORY = (
    "used_memory_dataset",
    "mem_clients_normal",
    "mem_aof_buffer",
    "used_memory_scripts",
)
REDIS_TROUBLE = re.compile(r"(?i)warning|error|fail|unable|can't|cannot")


# Redis and the node -------------------------------------------------------------------
def start_redis(port: int, directory: Path) -> subprocess.Popen[bytes]:
    """A redis-server of our own with AOF on (as PMQ's docs ask), ready to serve."""
    return redis_server(
        port, directory, "--logfile", str(directory / "redis.log"), "--appendonly", "yes",
        "--appendfsync", "everysec", "--maxmemory-policy", "noeviction",
    )


def start_node(
    args: argparse.Namespace, directory: Path, settings: dict[str, str]
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Write the config (bench.run_node's) and start the master in the foreground."""
    info = write_config(args, directory)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PMQ_")}
    # The node runs the code this bench was started from (a snapshot of one commit, say),
    # not whatever the installed package points at.
    paths = [str(Path(pmq.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    for key, value in settings.items():
        section, name = key.split(".", 1)
        env[f"PMQ_{section.upper()}_{name.upper()}"] = value
    proc = start_master(info, directory, env)
    if not wait_ready(proc, info["control"], 60):
        stop_process(proc, 40)
        raise RuntimeError(f"node did not become ready: {Path(info['log']).read_text()[-3000:]}")
    return proc, info


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


# Sampling -----------------------------------------------------------------------------------
def memory_of(proc: psutil.Process) -> dict[str, int]:
    info = proc.memory_full_info()
    return {"pid": proc.pid, "rss": info.rss, "pss": info.pss}


def sample(node: str, redis_pid: int, client: redis.Redis, keys: list[str]) -> dict[str, Any]:
    """One reading: memory per node process (by title without the node) and of Redis, Redis's
    own figures (where its memory goes), the storage queue's depth, the messages held in the
    users' inboxes in Redis, the machine's load. ``keys``: the storage queues, then the
    users' inboxes."""
    processes: dict[str, Any] = {}
    for proc in node_processes(node):
        with contextlib.suppress(psutil.Error):
            title = proc.cmdline()[0].removeprefix("pmq: ").removesuffix(f" [{node}]")
            processes[title] = memory_of(proc)
    with contextlib.suppress(psutil.Error):
        processes["redis-server"] = memory_of(psutil.Process(redis_pid))
    info = client.info("memory")
    pipe = client.pipeline(transaction=False)
    for key in keys:
        if key.endswith(":q:store"):
            pipe.llen(key)
        else:
            pipe.zcard(key)
    pipe.dbsize()
    *counts, dbsize = pipe.execute()
    queued = sum(n for key, n in zip(keys, counts, strict=True) if key.endswith(":q:store"))
    return {
        "processes": processes,
        "redis_used_memory": int(info["used_memory"]),
        "redis_memory": {k: int(info[k]) for k in REDIS_MEMORY if k in info},
        "redis_keys": int(dbsize),
        "inbox_messages": int(sum(counts) - queued),
        "store_queue": int(queued),
        "machine_cpu_s": round(machine_cpu(), 1),
        "load_average": load_average(),
    }


def least_squares(points: list[tuple[float, float]]) -> float | None:
    """Slope of the least-squares line through (x, y) points."""
    n = len(points)
    if n < 3:
        return None
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else None


def series(samples: list[dict[str, Any]]) -> dict[str, list[tuple[float, float, int]]]:
    """(seconds, MiB, pid) per memory figure: each process's RSS and PSS, Redis used_memory."""
    out: dict[str, list[tuple[float, float, int]]] = {}
    for s in samples:
        for name, m in s["processes"].items():
            out.setdefault(f"{name} rss", []).append((s["t"], m["rss"] / MIB, m["pid"]))
            out.setdefault(f"{name} pss", []).append((s["t"], m["pss"] / MIB, m["pid"]))
        out.setdefault("redis used_memory", []).append((s["t"], s["redis_used_memory"] / MIB, 0))
    return out


def slopes(samples: list[dict[str, Any]], warmup: float) -> dict[str, dict[str, Any]]:
    """Per series: MiB at the end of the warm-up and at the end, the most, and the slope in
    MiB per hour of the samples after the warm-up; the pids seen (more than one: respawned)."""
    out = {}
    for name, points in series(samples).items():
        after = [(t / 3600, mib) for t, mib, _ in points if t >= warmup]
        slope = least_squares(after)
        out[name] = {
            "mib_after_warmup": round(after[0][1], 1) if after else None,
            "mib_end": round(points[-1][1], 1),
            "mib_max": round(max(mib for _, mib, _ in points), 1),
            "slope_mib_per_hour": None if slope is None else round(slope, 2),
            "samples_fitted": len(after),
            "pids": sorted({pid for _, _, pid in points if pid}),
        }
    return out


# Findings ------------------------------------------------------------------------------------
def log_findings(path: Path, limit: int = 40) -> dict[str, Any]:
    """The log's ERROR and CRITICAL events, each with the last line of the traceback that
    follows it (the exception), counted and the first ``limit`` shown; Traceback lines
    counted; WARNING lines counted by their message with numbers blanked."""
    events: list[str] = []
    tracebacks = 0
    warnings: dict[str, int] = {}
    text = path.read_text(errors="replace") if path.exists() else ""
    for line in text.splitlines():
        if line.startswith("Traceback"):
            tracebacks += 1
        if STAMPED.match(line):
            if LOG_FINDING.search(line):
                events.append(line)
            elif " WARNING " in line:
                shape = re.sub(r"\d+", "N", line.split(": ", 1)[-1])[:160]
                warnings[shape] = warnings.get(shape, 0) + 1
        elif events and line.strip() and not line.startswith((" ", "Traceback", "The above")):
            events[-1] = events[-1].split(" => ")[0] + " => " + line.strip()
    return {
        "count": len(events),
        "tracebacks": tracebacks,
        "events": events[:limit],
        "warnings": warnings,
    }


def redis_warnings(path: Path) -> list[str]:
    """Redis log lines at warning level ('#') that say something went wrong."""
    text = path.read_text(errors="replace") if path.exists() else ""
    return [line for line in text.splitlines() if " # " in line and REDIS_TROUBLE.search(line)]


def wait_drained(client: redis.Redis, queues: list[str], prefix: str, limit: float) -> float:
    """Wait until the storage queues and every taken list are empty; the seconds it took."""
    began = time.monotonic()
    while time.monotonic() - began < limit:
        taken = list(client.scan_iter(match=f"{prefix}*q:store:taken*", count=1000))
        if sum(client.llen(k) for k in [*queues, *taken]) == 0:
            break
        time.sleep(0.5)
    return round(time.monotonic() - began, 1)


def stored(db: Path, shards: int, accepted: list[tuple[int, int]]) -> int:
    """How many of the (id, uid) are rows of the store's message tables."""
    by_table: dict[int, list[int]] = {}
    for mid, uid in accepted:
        by_table.setdefault(uid % shards, []).append(mid)
    found = 0
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        for shard, ids in by_table.items():
            for at in range(0, len(ids), 500):
                chunk = ids[at : at + 500]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT COUNT(*) FROM pmq_msg_{shard} WHERE id IN ({marks})"
                found += conn.execute(query, chunk).fetchone()[0]
    return found


def check_loss(
    target: Target, accepted: list[tuple[int, int]], got: set[int], db: Path
) -> dict[str, Any]:
    """Every 2xx id received, or still given to a new connection of its user; and stored."""
    missing: dict[int, set[int]] = {}
    for mid, uid in accepted:
        if mid not in got:
            missing.setdefault(uid, set()).add(mid)
    pending = run(soak_load.still_pending(target, sorted(missing)))
    lost = sorted(
        (mid, uid) for uid, ids in missing.items() for mid in ids - pending.get(uid, set())
    )
    in_store = stored(db, 128, accepted)
    return {
        "accepted": len(accepted),
        "received_by_clients": len(accepted) - sum(len(v) for v in missing.values()),
        "not_received_but_pending": sum(len(v) for v in missing.values()) - len(lost),
        "users_checked_at_end": len(missing),
        "lost": len(lost),
        "lost_examples": lost[:20],
        "stored": in_store,
        "not_stored": len(accepted) - in_store,
    }


# The run -------------------------------------------------------------------------------------
def run_load(
    args: argparse.Namespace,
    target: Target,
    info: dict[str, Any],
    redis_pid: int,
    out: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start the load processes, sample until the time is up, stop them; their reports."""
    ctx = mp.get_context("fork")
    results: mp.Queue = ctx.Queue()
    stop = ctx.Event()
    sent, live = ctx.Value("q", 0, lock=False), ctx.Value("q", 0, lock=False)
    uids = (args.uid_base, args.uid_base + args.users)
    seconds = args.minutes * 60
    client_proc = ctx.Process(
        target=soak_load.clients,
        args=(
            target,
            source_addresses(1)[0],
            uids,
            args.online,
            args.churn,
            args.request_every,
            stop,
            live,
            results,
        ),
        daemon=True,
    )
    client_proc.start()
    rclient = redis.Redis.from_url(target.redis_url)
    from pmq.redis.keys import Keys

    keys = Keys(info["prefix"])
    queues = [keys.store_queue(tag) for tag in keys.store_tags()]
    inboxes = [keys.inbox(str(uid)) for uid in range(*uids)]
    wait_connected(live, args.online, 120)
    pub_proc = ctx.Process(
        target=soak_load.publisher,
        args=(target, args.rate, seconds, uids, args.broadcast_every, sent, results),
        daemon=True,
    )
    pub_proc.start()
    start = time.monotonic()
    out["load_started"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    samples = out["samples"]
    try:
        while True:
            s = sample(target.node, redis_pid, rclient, queues + inboxes)
            s.update(t=round(time.monotonic() - start, 1), accepted=sent.value, online=live.value)
            samples.append(s)
            log(progress(s))
            if time.monotonic() - start >= seconds:
                break
            time.sleep(min(args.sample, max(0.0, seconds - (time.monotonic() - start))))
        published = collect(results, "published", 1, 120)[0]
        stop.set()
        seen = collect(results, "clients", 1, 120)[0]
    finally:
        stop.set()
        for p in (pub_proc, client_proc):
            p.join(30)
            if p.is_alive():
                p.terminate()
    out["store_drain_seconds"] = wait_drained(rclient, queues, info["prefix"], 120)
    out["status_at_end"] = node_status(target)
    rclient.close()
    return published, seen


def wait_connected(live: Any, want: int, limit: float) -> None:
    deadline = time.monotonic() + limit
    while live.value < want * 0.95 and time.monotonic() < deadline:
        time.sleep(0.5)
    log(f"{live.value} clients connected")


def progress(s: dict[str, Any]) -> str:
    mem = " ".join(
        f"{name.replace('socket worker ', 'sw').replace('task worker ', 'tw')}={m['rss'] / MIB:.0f}"
        for name, m in sorted(s["processes"].items())
    )
    return (
        f"t={s['t']:.0f}s accepted={s['accepted']} online={s['online']} "
        f"queue={s['store_queue']} inbox={s['inbox_messages']} "
        f"redis_used={s['redis_used_memory'] / MIB:.1f}MiB "
        f"keys={s['redis_keys']} rss_mib[{mem}] load={s['load_average'][0]}"
    )


def summarize(published: dict[str, Any], seen: dict[str, Any]) -> dict[str, Any]:
    latency = sorted(array("d", published["latency_ms"]))

    def at(q: float) -> float | None:
        return round(latency[min(len(latency) - 1, int(q * len(latency)))], 1) if latency else None

    return {
        "publish_seconds": published["seconds"],
        "publish_statuses": published["statuses"],
        "publish_errors": published["errors"],
        "publish_latency_ms": {"p50": at(0.5), "p99": at(0.99), "max": at(1.0)},
        **{k: v for k, v in seen.items() if k != "got"},
    }


def table(result: dict[str, Any]) -> str:
    rows = [
        "| series | after warm-up MiB | end MiB | max MiB | slope MiB/h | pids |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in sorted(result["memory"].items()):
        rows.append(
            f"| {name} | {s['mib_after_warmup']} | {s['mib_end']} | {s['mib_max']} | "
            f"{s['slope_mib_per_hour']} | {len(s['pids']) or ''} |"
        )
    loss = result["loss"]
    rows.append("")
    rows.append(
        f"accepted {loss['accepted']}, received {loss['received_by_clients']}, pending at end "
        f"{loss['not_received_but_pending']}, lost {loss['lost']}, not stored "
        f"{loss['not_stored']}; log errors {result['node_log']['count']}"
    )
    return "\n".join(rows)


def stop_on_signal(signum: int, frame: Any) -> None:
    """SIGTERM or SIGINT (ignored in background jobs otherwise): leave through the finally
    blocks, which stop the node and Redis."""
    raise SystemExit(f"stopped by signal {signum}")


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, stop_on_signal)
    signal.signal(signal.SIGINT, stop_on_signal)
    directory = Path(tempfile.mkdtemp(prefix="pmq-soak-"))
    day, stamp = time.strftime("%Y-%m-%d", time.gmtime()), time.strftime("%H%M", time.gmtime())
    out_path = Path(args.out or f"bench/figures/{day}/soak-{stamp}.json")
    settings = {**NODE_SETTINGS, **dict(kv.split("=", 1) for kv in args.set)}
    args.redis = f"redis://127.0.0.1:{free_port()}/0"
    result: dict[str, Any] = {
        "bench": "soak",
        "args": vars(args),
        "node_settings": settings,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "commit": commit(),
        "samples": [],
    }
    redis_proc = start_redis(int(args.redis.rsplit(":", 1)[1].split("/")[0]), directory)
    node = None
    try:
        node, info = start_node(args, directory, settings)
        target = Target(
            info["node"],
            info["ws_port"],
            info["ingest_port"],
            info["secret"],
            "",
            info["control"],
            args.redis,
        )
        published, seen = run_load(args, target, info, redis_proc.pid, result)
        accepted = list(
            zip(
                array("q", published["accepted"]), array("q", published["accepted_to"]), strict=True
            )
        )
        result["load"] = summarize(published, seen)
        result["loss"] = check_loss(
            target, accepted, set(array("q", seen["got"])), directory / "pmq.db"
        )
        result["node_exit_code"] = stop_process(node, 60)
        result["node_log"] = log_findings(Path(info["log"]))
    finally:
        if node is not None:
            stop_process(node, 60)
        stop_process(redis_proc, 30)
        result["redis_log_warnings"] = redis_warnings(directory / "redis.log")
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    warmup = args.warmup * 60 if args.warmup is not None else args.minutes * 30
    result["warmup_seconds"] = warmup
    result["memory"] = slopes(result["samples"], warmup)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"written to {out_path}")
    return 0


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--rate", type=float, default=600, help="unicast messages per second")
    p.add_argument("--users", type=int, default=3000)
    p.add_argument("--online", type=int, default=1000, help="connections held at any time")
    p.add_argument("--churn", type=float, default=8, help="per cent of them leaving per minute")
    p.add_argument("--broadcast-every", type=float, default=10, help="seconds")
    p.add_argument(
        "--request-every",
        type=float,
        default=120,
        help="seconds between one client's msg.pull (and its unread.get), on average",
    )
    p.add_argument("--sample", type=float, default=15, help="seconds between memory samples")
    p.add_argument("--warmup", type=float, help="minutes left out of the slopes (default: half)")
    p.add_argument("--uid-base", type=int, default=7_000_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--task-workers", type=int, default=1)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a node setting beyond the soak's (e.g. redis.durability=aof)",
    )
    p.add_argument(
        "--durability",
        choices=["none", "aof"],
        default="none",
        help="redis.durability (aof needs WAITAOF: Redis 7.2 or later)",
    )
    p.add_argument("--log-level", default="warning")
    p.add_argument("--out", help="JSON file (default: bench/figures/<date>/soak-<HHMM>.json)")
    p.add_argument("--keep", action="store_true", help="keep the run directory")
    args = p.parse_args()
    args.churn = args.churn / 100  # a share per minute
    args.port = args.ingest_port = 0
    args.storage, args.heartbeat, args.heartbeat_timeout = None, 25.0, 60.0
    if args.online >= args.users:
        p.error("--online must be below --users: leaving clients come back as other users")
    return args


if __name__ == "__main__":
    sys.exit(main())
