"""Unicast end to end: U online users, C keep-alive publishers, M messages.

    python -m bench.unicast --config /tmp/x.toml -u 10000 -m 100000 -C 64 -p 2

U users (one WebSocket each, distinct uids, spread over P receiver processes) connect and
wait for their hello. Then C keep-alive HTTP connections (over --pub-processes processes)
send M messages in all, POST /api/v1/messages, each to a random online user, the body
carrying the send time and a sequence number. Receivers note when each push arrives.

Reported (JSON on stdout): accepted (202) and delivered counts, lost (accepted but not
received within --deadline seconds after the last publish), duplicates, end-to-end
throughput (delivered / first send to last receive), publish-to-receive latency and publish
HTTP latency percentiles (ms), unread frames seen, and the CPU the node, Redis, the load
generator and the whole machine used. Nobody acks, so every message stays in Redis: run
against a node with a fresh Redis prefix (bench.run_node), stopped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import multiprocessing as mp
import time
from array import array
from typing import Any

import orjson
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
    machine_cpu,
    node_connections,
    node_cpu,
    percentiles,
    redis_calls,
    redis_cpu,
    run,
    settle_heap,
    source_addresses,
    target_from,
)
from bench.publishers import merge, start_publishers


def receiver(
    index: int,
    uids: list[int],
    target: Target,
    source: str,
    raw: bool,
    counter: Any,
    results: mp.Queue,
    stop: Any,
) -> None:
    run(receiver_main(index, uids, target, source, raw, counter, results, stop))


async def receiver_main(
    index: int,
    uids: list[int],
    target: Target,
    source: str,
    raw: bool,
    counter: Any,
    results: mp.Queue,
    stop: Any,
) -> None:
    from pmq.domain.jwtauth import mint_token

    loop = asyncio.get_running_loop()
    got = array("q")
    latency = array("d")
    arrived = array("d")
    seen = {"unread": 0, "hello": 0, "tried": 0, "other": 0, "first": math.inf, "last": 0.0}
    all_hello = loop.create_future()  # set once every connect was tried (hello or error)
    letting_go = False
    drops: collections.Counter[str] = collections.Counter()
    dropped_uids = array("q")
    errors: collections.Counter[str] = collections.Counter()

    def on_text(frame: bytes | str) -> None:
        data = frame.encode() if isinstance(frame, str) else frame
        if data.startswith(b'{"type":"push"'):
            now = time.time()
            body = orjson.loads(data)["msg"]["body"]
            got.append(body["n"])
            latency.append((now - body["t"]) * 1000)
            arrived.append(now)
            seen["first"] = min(seen["first"], now)
            seen["last"] = now
            counter.value += 1
        elif data.startswith(b'{"type":"unread"'):
            seen["unread"] += 1
        elif data.startswith(b'{"type":"hello"'):
            seen["hello"] += 1
        else:
            seen["other"] += 1

    gate = asyncio.Semaphore(64)
    sockets: list[Any] = []
    online: list[int] = []

    async def one(uid: int) -> None:
        path = f"/ws?token={mint_token(target.secret, uid, ttl=7200)}"
        async with gate:
            ws: Any
            try:
                if raw:
                    ws = await RawWebSocket.connect(target.ws_port, path, source, on_text)
                else:
                    ws = await connect(
                        f"ws://127.0.0.1:{target.ws_port}{path}",
                        sock=await connected_socket(target.ws_port, source),
                        proxy=None,
                        compression=None,
                        user_agent_header=None,
                        open_timeout=30,
                        ping_interval=None,
                        close_timeout=5,
                        max_queue=None,
                    )
                    try:
                        on_text(await asyncio.wait_for(ws.recv(), 30))  # the hello
                    except BaseException:
                        ws.transport.abort()
                        raise
            except Exception as exc:  # counted and named
                errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
                ws = None
            seen["tried"] += 1
            if seen["tried"] == len(uids) and not all_hello.done():
                all_hello.set_result(None)
        if ws is None:
            return
        sockets.append(ws)
        online.append(uid)
        if raw:
            reason = await ws.closed
        else:
            try:
                async for frame in ws:
                    on_text(frame)
            except websockets.ConnectionClosed:
                pass
            rcvd = ws.protocol.close_rcvd
            reason = f"close {rcvd.code}" if rcvd else "no close frame"
        if not letting_go:
            drops[reason] += 1
            dropped_uids.append(uid)

    tasks = [asyncio.create_task(one(uid)) for uid in uids]
    try:
        async with asyncio.timeout(300):
            await all_hello
            settle_heap()
    except TimeoutError:
        pass
    results.put(
        (
            "connected",
            index,
            {"hello": seen["hello"], "errors": dict(errors), "online": online},
        )
    )
    cpu_start = time.process_time()
    await loop.run_in_executor(None, stop.wait)
    letting_go = True
    results.put(
        (
            "done",
            index,
            {
                "got": got.tobytes(),
                "latency": latency.tobytes(),
                "arrived": arrived.tobytes(),
                "unread": seen["unread"],
                "other": seen["other"],
                "first": seen["first"],
                "last": seen["last"],
                "drops": dict(drops),
                "dropped_uids": dropped_uids.tobytes(),
                "cpu_s": time.process_time() - cpu_start,
            },
        )
    )
    await let_go(sockets, tasks, raw)


def main() -> None:
    parser = argparse.ArgumentParser(description="Unicast end to end to online users.")
    add_target_args(parser)
    parser.add_argument("-u", "--users", type=int, default=10_000, help="online users")
    parser.add_argument("-m", "--messages", type=int, default=100_000)
    parser.add_argument("-C", "--concurrency", type=int, default=64, help="publisher conns")
    parser.add_argument(
        "-p",
        "--processes",
        type=int,
        default=0,
        help="receiver processes (default: 1 per 5,000 users, at least 1)",
    )
    parser.add_argument("--pub-processes", type=int, default=1, help="publisher processes")
    parser.add_argument(
        "--client",
        choices=["websockets", "raw"],
        default="websockets",
        help="receivers' WebSocket client (raw: a minimal one, less CPU)",
    )
    parser.add_argument("--uid-base", type=int, default=5_000_000)
    parser.add_argument(
        "--deadline",
        type=float,
        default=10.0,
        help="seconds after the last publish a message may still arrive",
    )
    parser.add_argument(
        "--time-limit", type=float, default=300, help="stop publishing after this many seconds"
    )
    parser.add_argument(
        "--dump",
        help="write every delivery (n, arrival time, latency ms) as CSV to this file",
    )
    args = parser.parse_args()

    target = target_from(args)
    u = args.users
    procs = args.processes or max(1, math.ceil(u / 5000))
    if math.ceil(u / procs) > MAX_SOCKETS_PER_PROCESS:
        parser.error("at most 15,000 users per receiver process")
    uids = list(range(args.uid_base, args.uid_base + u))
    slices = [uids[i::procs] for i in range(procs)]
    sources = source_addresses(procs)

    ctx = mp.get_context("fork")
    results: mp.Queue = ctx.Queue()
    pub_results: mp.Queue = ctx.Queue()
    stop, go = ctx.Event(), ctx.Event()
    counters = [ctx.Value("q", 0, lock=False) for _ in range(procs)]
    receivers = [
        ctx.Process(
            target=receiver,
            args=(
                i,
                slices[i],
                target,
                sources[i],
                args.client == "raw",
                counters[i],
                results,
                stop,
            ),
            daemon=True,
        )
        for i in range(procs)
    ]
    for p in receivers:
        p.start()
    publishers: list[Any] = []
    try:
        connected = collect(results, "connected", procs, 400)
        hellos = sum(c["hello"] for c in connected.values())
        online_uids = {uid for c in connected.values() for uid in c["online"]}
        conn_errors: collections.Counter[str] = collections.Counter()
        for c in connected.values():
            conn_errors.update(c["errors"])
        log(f"{hellos} of {u} users online (node reports {node_connections(target)})")
        publishers = start_publishers(
            ctx,
            target,
            args.pub_processes,
            args.concurrency,
            args.messages,
            (0, 0),
            uids,
            args.time_limit,
            pub_results,
            go,
        )
        collect(pub_results, "ready", len(publishers), 60)
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
        pub = merge(
            list(collect(pub_results, "done", len(publishers), args.time_limit + 60).values())
        )
        accepted = len(pub["accepted"])
        log(f"{accepted} accepted in {pub['end'] - pub['start']:.2f}s; waiting for delivery")
        deadline = time.monotonic() + args.deadline
        while time.monotonic() < deadline:
            if sum(c.value for c in counters) >= accepted:
                break
            time.sleep(0.05)
        cpu1, redis1, machine1, t1 = (
            node_cpu(target.node),
            redis_cpu(target.redis_url),
            machine_cpu(),
            time.time(),
        )
        calls1 = redis_calls(target.redis_url)
        stop.set()
        done = collect(results, "done", procs, 120)
    finally:
        stop.set()
        go.set()
        for p in [*receivers, *publishers]:
            p.join(60)
            if p.is_alive():
                p.terminate()

    got = array("q")
    latency = array("d")
    drops: collections.Counter[str] = collections.Counter()
    dropped_uids = array("q")
    for d in done.values():
        dropped_uids.frombytes(d["dropped_uids"])
        got.frombytes(d["got"])
        latency.frombytes(d["latency"])
        drops.update(d["drops"])
    if args.dump:
        arrived = array("d")
        for d in done.values():
            arrived.frombytes(d["arrived"])
        with open(args.dump, "w") as f:
            f.write("n,arrived,latency_ms\n")
            for n, at, ms in zip(got, arrived, latency, strict=True):
                f.write(f"{n},{at:.6f},{ms:.3f}\n")
    received = set(got)
    accepted_set = set(pub["accepted"])
    delivered = len(received & accepted_set)
    # Users whose connection dropped, or never came up, cannot count against delivery: their
    # messages wait in the inbox. "lost" is about the users online throughout.
    offline = set(dropped_uids) | (set(uids) - online_uids)
    missing = [
        (n, to)
        for n, to in zip(pub["accepted"], pub["accepted_to"], strict=True)
        if n not in received
    ]
    lost = sum(1 for n, to in missing if to not in offline)
    last = max((d["last"] for d in done.values() if d["last"]), default=pub["start"])
    e2e_seconds = last - pub["start"]
    server_cpu = cpu_used(cpu0, cpu1)
    wall = t1 - t0
    emit(
        {
            "bench": "unicast",
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "node": target.node,
            "users": u,
            "users_online": hellos,
            "connect_errors": dict(conn_errors.most_common(5)),
            "receiver_processes": procs,
            "client": args.client,
            "messages": args.messages,
            "concurrency": args.concurrency,
            "publisher_processes": args.pub_processes,
            "accepted": accepted,
            "publish_statuses": pub["statuses"],
            "publish_errors": pub["errors"],
            "delivered": delivered,
            "lost": lost,
            "not_received_offline_users": len(missing) - lost,
            "users_dropped_or_never_online": len(offline),
            "duplicates": len(got) - len(received),
            "publish_seconds": round(pub["end"] - pub["start"], 3),
            "publish_rate_per_s": round(accepted / (pub["end"] - pub["start"]), 1),
            "end_to_end_seconds": round(e2e_seconds, 3),
            "throughput_delivered_per_s": round(delivered / e2e_seconds, 1)
            if e2e_seconds > 0
            else None,
            "latency_publish_to_receive_ms": percentiles(latency),
            "latency_publish_http_ms": percentiles(pub["latency"]),
            "unread_frames": sum(d["unread"] for d in done.values()),
            "dropped_connections": dict(drops),
            "cpu_s": {
                "node": server_cpu,
                "redis": round(redis1 - redis0, 2),
                "publishers": pub["cpu_s"],
                "receivers": round(sum(d["cpu_s"] for d in done.values()), 2),
                "machine_busy": round(machine1 - machine0, 2),
                "wall": round(wall, 2),
            },
            "redis_calls_per_message": calls_per(calls0, calls1, delivered),
            "server_cpu_ms_per_message": round(server_cpu["total"] * 1000 / delivered, 3)
            if delivered
            else None,
            "load_average": {"before": load_before, "end": load_average()},
        }
    )


if __name__ == "__main__":
    main()
