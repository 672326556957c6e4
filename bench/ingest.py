"""Ingest only: publish to offline users and measure the HTTP side.

    python -m bench.ingest --config /tmp/x.toml -m 100000 -C 64

C keep-alive connections (over --processes load-generator processes) send M messages in
all, one request at a time per connection, POST /api/v1/messages to random uids in a large
range nobody is connected as. Reports requests/s (answered requests / wall time from the
first send to the last answer), HTTP statuses and latency percentiles (ms), and the CPU the
node used. Every message stays in Redis (nobody acks): run against a node started with a
fresh Redis prefix (bench.run_node) and stop it afterwards, which deletes the keys.
"""

from __future__ import annotations

import argparse
import time

from bench.common import (
    add_target_args,
    calls_per,
    collect,
    cpu_used,
    emit,
    load_average,
    log,
    machine_cpu,
    node_cpu,
    percentiles,
    redis_calls,
    redis_cpu,
    target_from,
)
from bench.publishers import merge, start_publishers


def main() -> None:
    parser = argparse.ArgumentParser(description="Ingest-only load to offline users.")
    add_target_args(parser)
    parser.add_argument("-m", "--messages", type=int, default=100_000)
    parser.add_argument("-C", "--concurrency", type=int, default=64, help="connections")
    parser.add_argument("--processes", type=int, default=1, help="publisher processes")
    parser.add_argument("--uid-base", type=int, default=100_000_000)
    parser.add_argument("--uid-range", type=int, default=10_000_000)
    parser.add_argument("--time-limit", type=float, default=300)
    args = parser.parse_args()

    import multiprocessing as mp

    target = target_from(args)
    ctx = mp.get_context("fork")
    results: mp.Queue = ctx.Queue()
    go = ctx.Event()
    uids = (args.uid_base, args.uid_base + args.uid_range)
    procs = start_publishers(
        ctx,
        target,
        args.processes,
        args.concurrency,
        args.messages,
        uids,
        None,
        args.time_limit,
        results,
        go,
    )
    try:
        collect(results, "ready", len(procs), 60)
        load_before = load_average()
        cpu0, redis0, machine0, t0 = (
            node_cpu(target.node),
            redis_cpu(target.redis_url),
            machine_cpu(),
            time.time(),
        )
        calls0 = redis_calls(target.redis_url)
        log(f"publishing {args.messages} messages over {args.concurrency} connections")
        go.set()
        done = merge(list(collect(results, "done", len(procs), args.time_limit + 60).values()))
        cpu1, redis1, machine1, t1 = (
            node_cpu(target.node),
            redis_cpu(target.redis_url),
            machine_cpu(),
            time.time(),
        )
        calls1 = redis_calls(target.redis_url)
    finally:
        go.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
    answered = len(done["latency"])
    seconds = done["end"] - done["start"]
    emit(
        {
            "bench": "ingest",
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "node": target.node,
            "messages": args.messages,
            "concurrency": args.concurrency,
            "processes": args.processes,
            "answered": answered,
            "accepted": len(done["accepted"]),
            "statuses": done["statuses"],
            "errors": done["errors"],
            "seconds": round(seconds, 3),
            "requests_per_s": round(answered / seconds, 1) if seconds else None,
            "latency_ms": percentiles(done["latency"]),
            "server_cpu_s": cpu_used(cpu0, cpu1),
            "redis_calls_per_request": calls_per(calls0, calls1, answered),
            "server_cpu_ms_per_request": round(cpu_used(cpu0, cpu1)["total"] * 1000 / answered, 3)
            if answered
            else None,
            "client_cpu_s": done["cpu_s"],
            "redis_cpu_s": round(redis1 - redis0, 2),
            "machine_busy_cpu_s": round(machine1 - machine0, 2),
            "wall_s": round(t1 - t0, 2),
            "load_average": {"before": load_before, "end": load_average()},
        }
    )


if __name__ == "__main__":
    main()
