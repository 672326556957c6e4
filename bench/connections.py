"""Idle connections: open N WebSocket connections, hold them, measure the node.

    python -m bench.connections --config /tmp/x.toml -n 50000 -p 4 --hold 60

N connections (uids --uid-base .. +N-1, one JWT each, signed with the node's secret) are
spread over P load-generator processes (at most 15,000 sockets each: every process may hold
20,000 files here), each process from its own loopback source address. The websockets
client answers the server's pings by itself; it sends none of its own (--client-pings to
change that). Reported, as JSON on stdout:

- connect rate: connections made / (last connect done - first connect started), over all
  processes, a connection counting as made when the server's hello arrived (it is sent
  once the connection is registered); connect latency percentiles (TCP, upgrade, hello);
- failed: connects that did not open; dropped: connections closed by the other side before
  the bench let go (during the connect phase or the hold);
- memory: PSS (shared pages counted once) and RSS summed over the node's processes
  (``pmq: ... [NODE]``), before connecting, once all are connected, and at the end of the
  hold; per connection = growth / connections held.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import multiprocessing as mp
import time
from typing import Any

import websockets
from websockets.asyncio.client import connect

from bench.common import (
    MAX_SOCKETS_PER_PROCESS,
    RawWebSocket,
    Target,
    add_target_args,
    calls_per,
    collect,
    connected_socket,
    cpu_used,
    emit,
    let_go,
    load_average,
    log,
    node_connections,
    node_cpu,
    node_memory,
    percentiles,
    redis_calls,
    redis_cpu,
    run,
    source_addresses,
    target_from,
)

KIB = 1024


def child(
    index: int,
    count: int,
    uid_start: int,
    target: Target,
    source: str,
    concurrency: int,
    client_pings: bool,
    raw: bool,
    results: mp.Queue,
    go: Any,
    release: Any,
) -> None:
    run(
        child_main(
            index,
            count,
            uid_start,
            target,
            source,
            concurrency,
            client_pings,
            raw,
            results,
            go,
            release,
        )
    )


async def child_main(
    index: int,
    count: int,
    uid_start: int,
    target: Target,
    source: str,
    concurrency: int,
    client_pings: bool,
    raw: bool,
    results: mp.Queue,
    go: Any,
    release: Any,
) -> None:
    from pmq.domain.jwtauth import mint_token

    loop = asyncio.get_running_loop()
    urls = [f"/ws?token={mint_token(target.secret, uid_start + i, ttl=7200)}" for i in range(count)]
    results.put(("ready", index, None))
    await loop.run_in_executor(None, go.wait)
    cpu_start = time.process_time()

    gate = asyncio.Semaphore(concurrency)
    sockets: list[Any] = []
    handshake: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    drops: collections.Counter[str] = collections.Counter()
    state = {"first": math.inf, "last": 0.0, "done": 0, "letting_go": False}
    all_tried = loop.create_future()

    async def one(url: str) -> None:
        async with gate:
            started = time.time()
            state["first"] = min(state["first"], started)
            ws: Any
            try:
                if raw:
                    ws = await RawWebSocket.connect(target.ws_port, url, source)
                else:
                    ws = await connect(
                        f"ws://127.0.0.1:{target.ws_port}{url}",
                        sock=await connected_socket(target.ws_port, source),
                        proxy=None,
                        compression=None,
                        user_agent_header=None,
                        open_timeout=30,
                        ping_interval=20 if client_pings else None,
                        close_timeout=5,
                        max_queue=8,
                    )
                    try:
                        await asyncio.wait_for(ws.recv(), 30)  # the hello
                    except BaseException:
                        ws.transport.abort()
                        raise
            except Exception as exc:  # counted and named
                errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
                ws = None
            else:
                now = time.time()
                handshake.append((now - started) * 1000)
                state["last"] = max(state["last"], now)
                sockets.append(ws)
            state["done"] += 1
            if state["done"] == count and not all_tried.done():
                all_tried.set_result(None)
        if ws is None:
            return
        if raw:
            reason = await ws.closed
            if not state["letting_go"]:
                drops[reason] += 1
            return
        try:
            async for _ in ws:
                pass  # hello, then nothing: idle
        except websockets.ConnectionClosed:
            pass
        if not state["letting_go"]:
            rcvd = ws.protocol.close_rcvd
            drops[f"close {rcvd.code}" if rcvd else "no close frame"] += 1

    tasks = [asyncio.create_task(one(url)) for url in urls]
    del urls
    await all_tried
    results.put(
        (
            "connected",
            index,
            {
                "ok": len(handshake),
                "failed": count - len(handshake),
                "first": state["first"],
                "last": state["last"],
                "connect_ms": handshake,
                "errors": dict(errors.most_common(5)),
                "cpu_s": time.process_time() - cpu_start,
            },
        )
    )
    await loop.run_in_executor(None, release.wait)
    state["letting_go"] = True
    results.put(("held", index, {"dropped": sum(drops.values()), "drops": dict(drops)}))
    # Let go gently, a few hundred at a time: a close storm is not what is measured here.
    await let_go(sockets, tasks, raw)


def warm_up(target: Target, args: argparse.Namespace, ctx: Any) -> None:
    """Open and close --warmup connections first, so the baseline already holds the one-time
    costs (first-touch copy-on-write of pages shared with the master, lazy imports, pools)."""
    results: mp.Queue = ctx.Queue()
    go, release = ctx.Event(), ctx.Event()
    go.set()
    release.set()
    p = ctx.Process(
        target=child,
        args=(
            0,
            args.warmup,
            args.uid_base - args.warmup,
            target,
            source_addresses(1)[0],
            64,
            False,
            args.client == "raw",
            results,
            go,
            release,
        ),
        daemon=True,
    )
    p.start()
    collect(results, "ready", 1, 120)
    collect(results, "connected", 1, 300)
    collect(results, "held", 1, 120)
    p.join(60)
    time.sleep(3)
    log(f"warm-up: {args.warmup} connections opened and closed")


def mib(n: float) -> float:
    return round(n / 2**20, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description="Open, hold and measure idle connections.")
    add_target_args(parser)
    parser.add_argument("-n", "--connections", type=int, default=1000)
    parser.add_argument(
        "-p",
        "--processes",
        type=int,
        default=0,
        help="load-generator processes (default: enough for 15,000 each)",
    )
    parser.add_argument("--hold", type=float, default=60, help="seconds to hold them")
    parser.add_argument(
        "--concurrency", type=int, default=64, help="connects in flight, over all processes"
    )
    parser.add_argument("--uid-base", type=int, default=1_000_000)
    parser.add_argument(
        "--client-pings",
        action="store_true",
        help="clients send pings every 20 s too (default: only answer)",
    )
    parser.add_argument(
        "--client",
        choices=["websockets", "raw"],
        default="websockets",
        help="websockets: the websockets library's client; raw: a minimal "
        "RFC 6455 client (much less CPU per connection, same server work)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=2000,
        help="connections opened and closed before the baseline reading",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=2.0,
        help="seconds between the last connect and the memory reading",
    )
    args = parser.parse_args()

    target = target_from(args)
    n = args.connections
    procs = args.processes or math.ceil(n / MAX_SOCKETS_PER_PROCESS)
    if math.ceil(n / procs) > MAX_SOCKETS_PER_PROCESS:
        parser.error(
            f"{n} connections need at least {math.ceil(n / MAX_SOCKETS_PER_PROCESS)} "
            "processes (15,000 sockets each at most)"
        )
    shares = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    per_proc_concurrency = max(1, math.ceil(args.concurrency / procs))
    sources = source_addresses(procs)

    ctx = mp.get_context("fork")
    results: mp.Queue = ctx.Queue()
    go, release = ctx.Event(), ctx.Event()
    workers = []
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
                args.client_pings,
                args.client == "raw",
                results,
                go,
                release,
            ),
            daemon=True,
        )
        p.start()
        workers.append(p)
        uid += share
    try:
        cold = node_memory(target.node)
        if args.warmup:
            warm_up(target, args, ctx)
        collect(results, "ready", procs, 120)
        base_conns = node_connections(target)
        before = node_memory(target.node)
        load_before = load_average()
        log(f"{procs} processes ready; node PSS {mib(before['pss'])} MiB; connecting {n}")
        cpu0, redis0 = node_cpu(target.node), redis_cpu(target.redis_url)
        calls0 = redis_calls(target.redis_url)
        go.set()
        connected = collect(results, "connected", procs, 600)
        cpu1, redis1 = node_cpu(target.node), redis_cpu(target.redis_url)
        calls1 = redis_calls(target.redis_url)
        ok = sum(c["ok"] for c in connected.values())
        first = min(c["first"] for c in connected.values())
        last = max(c["last"] for c in connected.values() if c["ok"]) if ok else first
        log(f"{ok} connected in {last - first:.2f}s; settling {args.settle}s")
        time.sleep(args.settle)
        after = node_memory(target.node)
        conns_after = node_connections(target)
        log(f"node PSS {mib(after['pss'])} MiB, {conns_after} connections; holding {args.hold}s")
        cpu2, redis2 = node_cpu(target.node), redis_cpu(target.redis_url)
        calls2 = redis_calls(target.redis_url)
        time.sleep(args.hold)
        cpu3, redis3 = node_cpu(target.node), redis_cpu(target.redis_url)
        calls3 = redis_calls(target.redis_url)
        end = node_memory(target.node)
        conns_end = node_connections(target)
        load_end = load_average()
        release.set()
        held = collect(results, "held", procs, 120)
    finally:
        release.set()
        go.set()
        for p in workers:
            p.join(60)
            if p.is_alive():
                p.terminate()

    dropped = sum(h["dropped"] for h in held.values())
    drops: collections.Counter[str] = collections.Counter()
    for h in held.values():
        drops.update(h["drops"])
    errors: collections.Counter[str] = collections.Counter()
    for c in connected.values():
        errors.update(c["errors"])
    handshake = [ms for c in connected.values() for ms in c["connect_ms"]]

    def per_conn(now: dict[str, Any], key: str) -> float | None:
        return round((now[key] - before[key]) / ok / KIB, 2) if ok else None

    emit(
        {
            "bench": "connections",
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "node": target.node,
            "connections": n,
            "processes": procs,
            "client": args.client,
            "concurrency": per_proc_concurrency * procs,
            "hold_s": args.hold,
            "connected": ok,
            "failed": n - ok,
            "connect_errors": dict(errors.most_common(5)),
            "connect_seconds": round(last - first, 3),
            "connect_rate_per_s": round(ok / (last - first), 1) if ok and last > first else None,
            "connect_ms": percentiles(handshake),
            "server_cpu_s_connect_phase": cpu_used(cpu0, cpu1),
            "server_cpu_ms_per_connect": round(cpu_used(cpu0, cpu1)["total"] * 1000 / ok, 3)
            if ok
            else None,
            "client_cpu_s_connect_phase": round(sum(c["cpu_s"] for c in connected.values()), 2),
            "server_cpu_s_hold": cpu_used(cpu2, cpu3),
            "redis_cpu_s_connect_phase": round(redis1 - redis0, 2),
            "redis_cpu_s_hold": round(redis3 - redis2, 2),
            "redis_calls_per_connect": calls_per(calls0, calls1, ok),
            "redis_calls_per_second_of_hold": calls_per(calls2, calls3, int(args.hold)),
            "dropped": dropped,
            "drops": dict(drops),
            "server_connections": {
                "before": base_conns,
                "after_connect": conns_after,
                "end_of_hold": conns_end,
            },
            "warmup": args.warmup,
            "server_pss_mib": {
                "fresh_node": mib(cold["pss"]),
                "before": mib(before["pss"]),
                "after_connect": mib(after["pss"]),
                "end_of_hold": mib(end["pss"]),
            },
            "server_rss_mib": {
                "fresh_node": mib(cold["rss"]),
                "before": mib(before["rss"]),
                "after_connect": mib(after["rss"]),
                "end_of_hold": mib(end["rss"]),
            },
            "pss_per_connection_kib": {
                "after_connect": per_conn(after, "pss"),
                "after_connect_from_fresh_node": round((after["pss"] - cold["pss"]) / ok / KIB, 2)
                if ok
                else None,
                "end_of_hold": per_conn(end, "pss"),
            },
            "rss_per_connection_kib": {
                "after_connect": per_conn(after, "rss"),
                "end_of_hold": per_conn(end, "rss"),
            },
            "server_processes_end": {
                k: {"pss_mib": mib(v["pss"]), "rss_mib": mib(v["rss"])}
                for k, v in end["processes"].items()
            },
            "load_average": {"before": load_before, "end": load_end},
        }
    )


if __name__ == "__main__":
    main()
