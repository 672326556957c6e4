"""Reconnect storm: every socket worker of a node restarted at once under N connected clients.

    python -m bench.storm --config CFG -n 50000 -p 4 --fault kill9 --publish-rate 500 --out FILE

N users (uids --uid-base ..) are connected from P load-generator processes (bench.storm_load)
and a site publishes unicast messages to them at --publish-rate per second. After --before
seconds the fault strikes:

    kill9    SIGKILL to every socket worker at once (found by their titles
             ``pmq: socket worker #i [NODE]``); the master respawns them
    restart  ``pmqctl restart`` (the rolling restart) with the node's config

Every client reconnects by the policy below; the site keeps publishing, retrying a request
it got no answer to with the same idempotency key, as a site would. Once all N are connected
again (or --deadline s after the fault) it publishes --after s more, stops, waits for the
accepted messages to arrive (--drain s at most) and reports, as JSON on stdout and in --out:
seconds from the fault until all N had their hello again, with the connected count every
0.5 s; failed connects by kind (refused, 5xx, timeout, reset, closed before hello); accepted
messages never delivered (must be 0); duplicates handed to the application (must be 0) and
redeliveries the client dropped by id; ingest latency p50/p99/max before the fault, in the
storm (fault to all back) and after, both as the site saw it (``latency_ms``: from when the
message was due to its final answer, retries and waits included) and as the node answered
(``answer_ms``: the final try alone); node and machine CPU; ``uptime`` before and after.

The reconnect policy (:class:`bench.storm_load.Reconnect`; its delay is pmq.client's
:class:`~pmq.client.Backoff`, the one the client library reconnects with):

- After a close, or a connect that failed (refused, not through TCP, upgrade and hello
  within ``timeout`` s, answered other than 101, closed before the hello), wait
  ``random.uniform(0, min(cap, base * 2**attempt))`` (full jitter), then try again; each
  wait raises ``attempt`` by one.
- ``attempt`` starts at 0 and goes back to 0 only when a connection that had its hello is
  closed after holding it ``stable`` s or more; a connection that dies sooner keeps the
  back-off growing, so a node that accepts and drops at once is not hammered.
- base 0.5 s, cap 10 s, stable 5 s, timeout 30 s by default (--base, --cap, --stable,
  --timeout). A short timeout is what turns an overloaded node into a stalled one: the
  node keeps working on handshakes whose clients have given up, and every retry adds one.

Full jitter spreads each round of retries evenly over its window, so the connects a node
refuses while it restarts do not come back as one wave; the cap bounds how long a client
that was unlucky several times waits once the node is back.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from array import array
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.chaos import code_version
from bench.chaos_rig import wait_until
from bench.common import (
    MAX_SOCKETS_PER_PROCESS,
    Target,
    add_target_args,
    collect,
    cpu_used,
    emit,
    load_average,
    log,
    machine_cpu,
    node_cpu,
    node_processes,
    percentiles,
    source_addresses,
    target_from,
)
from bench.storm_load import Reconnect, clients_process, site_process

ROOT = Path(__file__).resolve().parent.parent
GOAL_S = 20.0  # the bound for all clients back


class Sampler(threading.Thread):
    """Every 0.5 s: the connected count summed over the client processes, and the
    connections waiting in the node's accept queues on the client port."""

    def __init__(self, connected: Any, port: int) -> None:
        super().__init__(daemon=True)
        self.connected = connected
        self.port = port
        self.samples: list[tuple[float, int, int]] = []
        self.halt = threading.Event()

    def count(self) -> int:
        return sum(self.connected)

    def accept_queue(self) -> int:
        """Summed over the listeners on the port (a LISTEN socket's Recv-Q is its accept
        queue). Asked of ``ss``, whose filter the kernel applies to its listening sockets
        alone: /proc/net/tcp, read before, lists every socket of the machine, and with the
        storm's 100,000 and more, reading and splitting it twice a second took a good part
        of a core from the node being measured."""
        listing = subprocess.run(
            ["ss", "-Hltn", f"sport = :{self.port}"], capture_output=True, text=True
        ).stdout
        return sum(int(line.split()[1]) for line in listing.splitlines())

    def run(self) -> None:
        while not self.halt.wait(0.5):
            self.samples.append((time.time(), self.count(), self.accept_queue()))


# Faults ------------------------------------------------------------------------------
def socket_workers(node: str) -> list[int]:
    return [p.pid for p in node_processes(node) if " socket worker #" in p.info["cmdline"][0]]


class Fault:
    """A fault in progress: :meth:`done` says whether it has finished (the restart command
    returned; a kill is over at once); ``detail`` goes into the report."""

    def __init__(self, kind: str, target: Target, config: str) -> None:
        self.kind, self.target = kind, target
        self.at = time.time()
        self.detail: dict[str, Any] = {"kind": kind}
        self.command: subprocess.Popen[bytes] | None = None
        self.before = socket_workers(target.node)
        if kind == "kill9":
            for pid in self.before:
                os.kill(pid, signal.SIGKILL)
            self.detail["killed_pids"] = self.before
        else:
            env = {k: v for k, v in os.environ.items() if not k.startswith("PMQ_")}
            self.command = subprocess.Popen(
                [sys.executable, "-m", "pmq.ctl", "restart", "-c", config],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                cwd=ROOT,
            )

    def done(self) -> bool:
        if "workers_replaced_s" not in self.detail:
            fresh = set(socket_workers(self.target.node)) - set(self.before)
            if len(fresh) >= len(self.before):
                self.detail["workers_replaced_s"] = round(time.time() - self.at, 2)
        if self.command is None:
            return True
        if self.command.poll() is None:
            return False
        if "command_s" not in self.detail:
            self.detail["command_s"] = round(time.time() - self.at, 2)
            self.detail["command_exit"] = self.command.returncode
            assert self.command.stderr is not None
            self.detail["command_stderr"] = self.command.stderr.read().decode()[-500:]
        return True


# The run -----------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_target_args(parser)
    add = parser.add_argument
    add("-n", "--clients", type=int, default=5000)
    add("-p", "--processes", type=int, default=4, help="client processes")
    add("--fault", choices=["kill9", "restart"], default="kill9")
    add("--publish-rate", type=float, default=500.0, help="unicast messages per second")
    add("--base", type=float, default=Reconnect.base, help="policy: first window, s")
    add("--cap", type=float, default=Reconnect.cap, help="policy: largest window, s")
    add(
        "--stable",
        type=float,
        default=Reconnect.stable,
        help="policy: seconds held that reset the back-off",
    )
    add("--timeout", type=float, default=Reconnect.timeout, help="policy: one connect's limit")
    add("--ramp", type=int, default=64, help="first connects in flight, over all processes")
    add("--ramp-timeout", type=float, default=300.0)
    add("--before", type=float, default=5.0, help="seconds of publishing before the fault")
    add("--deadline", type=float, default=90.0, help="seconds after the fault to wait for all")
    add("--after", type=float, default=5.0, help="seconds of publishing once all are back")
    add("--drain", type=float, default=30.0, help="seconds to wait for accepted messages")
    add("--uid-base", type=int, help="first uid (default: a fresh block of 100,000 users)")
    add("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.uid_base is None:  # users of an earlier run may still have messages waiting
        args.uid_base = 3_000_000 + random.randrange(10_000) * 100_000
    if -(-args.clients // args.processes) > MAX_SOCKETS_PER_PROCESS:
        parser.error(f"at most {MAX_SOCKETS_PER_PROCESS} clients per process")
    return args


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    target = target_from(args)
    policy = Reconnect(args.base, args.cap, args.stable, args.timeout)
    n, procs = args.clients, args.processes
    ctx = mp.get_context("fork")
    results: mp.Queue = ctx.Queue()
    shared = (ctx.Array("q", procs, lock=False), ctx.Array("q", procs, lock=False))
    stop_clients, go_site, stop_site = ctx.Event(), ctx.Event(), ctx.Event()
    uids = range(args.uid_base, args.uid_base + n)
    sources = source_addresses(procs)
    ramp = max(1, args.ramp // procs)
    workers = [
        ctx.Process(
            target=clients_process,
            daemon=True,
            args=(
                i,
                uids[i::procs],
                target,
                sources[i],
                policy,
                ramp,
                shared,
                results,
                stop_clients,
            ),
        )
        for i in range(procs)
    ]
    workers.append(
        ctx.Process(
            target=site_process,
            daemon=True,
            args=(
                target,
                uids,
                args.publish_rate,
                secrets.token_hex(4),
                results,
                go_site,
                stop_site,
            ),
        )
    )
    sampler = Sampler(shared[0], target.ws_port)
    t: dict[str, float] = {}
    readings: dict[str, Any] = {"uptime_before": uptime(), "load_before": load_average()}
    # Respawned workers load the working tree of the moment: name the code measured.
    readings["code"] = code_version()
    for p in workers:
        p.start()
    try:
        t["start"] = time.time()
        wait_until(lambda: sampler.count() >= n, args.ramp_timeout, f"{n} clients connected")
        t["ramped"] = time.time()
        log(f"{n} connected in {t['ramped'] - t['start']:.1f} s; publishing")
        sampler.start()
        go_site.set()
        t["publishing"] = time.time()
        cpu0, mach0 = node_cpu(target.node), machine_cpu()
        time.sleep(args.before)
        cpu1, mach1 = node_cpu(target.node), machine_cpu()
        fault = Fault(args.fault, target, args.config)
        t["fault"] = fault.at
        log(f"fault {args.fault} struck")
        back = False
        try:  # the clients notice at once; until then the count still says all
            wait_until(lambda: sampler.count() < n, 10, "clients to notice the fault")
        except TimeoutError as exc:
            log(exc)
        try:
            wait_until(
                lambda: fault.done() and sampler.count() >= n,
                args.deadline,
                f"all {n} connected again",
            )
            back = True
        except TimeoutError as exc:
            log(exc)
        t["back"] = time.time()
        cpu2, mach2 = node_cpu(target.node), machine_cpu()
        log(f"{sampler.count()} connected {t['back'] - fault.at:.1f} s after the fault")
        time.sleep(args.after)
        stop_site.set()
        site = collect(results, "site", 1, 120)[0]
        t["published"] = time.time()
        accepted = len(site["ids"]) // 8
        try:
            wait_until(lambda: sum(shared[1]) >= accepted, args.drain, "the accepted messages")
        except TimeoutError as exc:
            log(exc)
        time.sleep(1.0)  # late duplicates, if any, still count
        sampler.halt.set()
        stop_clients.set()
        clients = collect(results, "clients", procs, 60)
    finally:
        sampler.halt.set()
        for event in (go_site, stop_site, stop_clients):
            event.set()
        for p in workers:
            p.join(10)
            if p.is_alive():
                p.terminate()
    readings.update(uptime_after=uptime(), load_after=load_average())
    result = report(
        args,
        policy,
        target,
        t,
        back,
        fault,
        sampler.samples,
        site,
        clients,
        readings,
        {"before": (cpu0, cpu1, mach0, mach1), "storm": (cpu1, cpu2, mach1, mach2)},
    )
    emit(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


# The report ----------------------------------------------------------------------------
def unpack(kind: str, raw: bytes) -> array[Any]:
    out = array(kind)
    out.frombytes(raw)
    return out


def report(
    args: argparse.Namespace,
    policy: Reconnect,
    target: Target,
    t: dict[str, float],
    back: bool,
    fault: Fault,
    samples: list[tuple[float, int, int]],
    site: dict[str, Any],
    clients: dict[int, dict[str, Any]],
    readings: dict[str, Any],
    cpu: dict[str, tuple[Any, Any, float, float]],
) -> dict[str, Any]:
    at = t["fault"]
    got: dict[int, int] = {}
    counts: collections.Counter[str] = collections.Counter()
    failures: collections.Counter[str] = collections.Counter()
    failure_text: collections.Counter[str] = collections.Counter()
    closes: collections.Counter[str] = collections.Counter()
    outage: list[float] = []
    tries: collections.Counter[int] = collections.Counter()
    for c in clients.values():
        got.update(zip(unpack("q", c["got_ids"]), unpack("q", c["got_uids"]), strict=True))
        for total, part in (
            (counts, "counts"),
            (failures, "failures"),
            (failure_text, "failure_text"),
            (closes, "closes"),
        ):
            total.update(c[part])
        outage.extend(unpack("d", c["outage_s"]))
        tries.update(unpack("q", c["tries"]))
    sent_to = dict(zip(unpack("q", site["ids"]), unpack("q", site["to"]), strict=True))
    lost = [mid for mid in sent_to if mid not in got]
    away = {uid for c in clients.values() for uid in c["away"]}  # not connected at the end
    wrong = [mid for mid, uid in sent_to.items() if mid in got and got[mid] != uid]
    # All back: the first sample after the last one short of N (a rolling restart drops
    # clients worker by worker, so the count dips more than once).
    short = [s for s, count, _ in samples if s > at and count < args.clients]
    since = short[-1] if short else at
    all_back = next((s - at for s, n, _ in samples if s > since and n >= args.clients), None)
    last_hello = max(c["last_hello"] for c in clients.values())
    end_of_storm = t["back"] if back else t["published"]
    windows = {
        "before": (t["publishing"], at),
        "storm": (at, end_of_storm),
        "after": (end_of_storm, t["published"]),
    }
    due, latency = unpack("d", site["due"]), unpack("d", site["latency_ms"])
    answer = unpack("d", site["answer_ms"])
    status = unpack("q", site["status"])
    ingest = {}
    for name, (lo, hi) in windows.items():
        picked = [i for i, d in enumerate(due) if lo <= d < hi]
        ingest[name] = {
            "requests": len(picked),
            "latency_ms": percentiles([latency[i] for i in picked]),
            "answer_ms": percentiles([answer[i] for i in picked]),
            "status": dict(collections.Counter(str(status[i]) for i in picked)),
        }
    seconds = {k: round(hi - lo, 2) for k, (lo, hi) in windows.items()}

    def cpu_of(name: str) -> dict[str, Any]:
        before, after, mach0, mach1 = cpu[name]
        used = cpu_used(before, after)
        span = seconds[name] if name == "before" else round(t["back"] - at, 2)
        return {
            "seconds": span,
            "node_cpu_s": used,
            "node_cores_busy": round(used["total"] / span, 2) if span else None,
            "machine_cores_busy": round((mach1 - mach0) / span, 2) if span else None,
        }

    curve = [[round(s - at, 1), count, queued] for s, count, queued in samples if s >= at - 2]
    return {
        "bench": "storm",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "node": target.node,
        "fault": fault.detail,
        "clients": args.clients,
        "processes": args.processes,
        "publish_rate": args.publish_rate,
        "policy": asdict(policy),
        "ramp": {
            "seconds": round(t["ramped"] - t["start"], 1),
            "per_s": round(args.clients / (t["ramped"] - t["start"]), 1),
        },
        "reconnect": {
            "all_back_s": None if all_back is None else round(all_back, 2),
            "last_hello_s": round(last_hello - at, 2),
            "goal_s": GOAL_S,
            "met": all_back is not None and all_back <= GOAL_S,
            "connected_at_end": sum(c["connected"] for c in clients.values()),
            "outage_s": percentiles(outage),
            "reconnects": len(outage),
            "tries_per_reconnect": dict(sorted(tries.items())),
            "connects": counts["connects"],
            "failed_by_kind": dict(failures),
            "failure_samples": dict(failure_text.most_common(5)),
            "closes": dict(closes),
            "curve": curve,  # [s since the fault, connected, in the node's accept queues]
            "client_loop_lag_ms": percentiles([ms for c in clients.values() for ms in c["lag_ms"]]),
        },
        "messages": {
            "requests": len(due),
            "accepted": len(sent_to),
            "delivered": len(got),
            "lost": len(lost),
            "lost_to_users_away": sum(1 for mid in lost if sent_to[mid] in away),
            "lost_sample": lost[:10],
            "wrong_recipient": len(wrong),
            "delivered_not_accepted": len(set(got) - set(sent_to)),
            "duplicates_to_application": counts["dup_same_connection"]
            + counts["dup_after_confirmed_ack"],
            "dup_same_connection": counts["dup_same_connection"],
            "dup_same_connection_sample": [d for c in clients.values() for d in c["dup_sample"]],
            "dup_after_confirmed_ack": counts["dup_after_confirmed_ack"],
            "redelivered_dropped_by_client": counts["redelivered"],
            "ack_frames": counts["ack_frames"],
            "other": {k: v for k, v in counts.items() if k.startswith("ack answered")},
        },
        "ingest": {"windows_s": seconds, **ingest, "failed_tries": site["failures"]},
        "cpu": {
            "before": cpu_of("before"),
            "storm": cpu_of("storm"),
            "clients_s": round(sum(c["cpu_s"] for c in clients.values()), 1),
            "site_s": round(site["cpu_s"], 1),
        },
        **readings,
    }


if __name__ == "__main__":
    sys.exit(main())
