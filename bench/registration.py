"""The socket worker's CPU per connect spent registering, against the real Redis.

    python -m bench.registration [-n 20000] [-c 50] [--passes 3] [--redis URL]

Runs pmq.reactor.registration's ``Registration.register`` for ``n`` new connections (each a
user of its own, in one group), ``c`` at a time as a burst of connects does, on the clients a
socket worker has (pmq.redis.conn's pool, the worker's Batcher), with kicks and broadcast
replay on. It prints (JSON) the CPU microseconds of this process and the wall microseconds
per registration, the best of ``passes`` passes; Redis's own CPU is not counted. Keys go
under a fresh prefix, deleted afterwards.

Counted in instructions under valgrind, which vary little from run to run: run it twice with
``--passes 1`` (``-n 2000`` and ``-n 500``) under ``valgrind --tool=callgrind`` and divide
the difference of the two "Collected" counts by 1,500.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import secrets
import time
from typing import Any

import redis

from bench.common import emit, load_average, run
from pmq.config import RedisConfig
from pmq.domain.auth import Identity
from pmq.domain.broadcast import Broadcasts
from pmq.domain.ids import IdGenerator
from pmq.domain.inbox import Inbox
from pmq.domain.kicks import Kicks
from pmq.domain.routing import Routes
from pmq.reactor.connections import Client
from pmq.reactor.registration import Registration
from pmq.redis import conn as redisconn
from pmq.redis.batching import Batcher
from pmq.redis.keys import Keys


async def measure(args: argparse.Namespace, prefix: str) -> list[tuple[float, float]]:
    """(CPU s, wall s) of each pass of ``args.n`` registrations."""
    client = redisconn.connect(RedisConfig(url=args.redis))
    batch = Batcher(client)
    keys = Keys(prefix)
    ids = IdGenerator(1)
    routes = Routes(client, keys, "w1", 25, batch)
    inbox = Inbox(client, keys, ids, 3600, 86400, batch)
    broadcasts = Broadcasts(client, keys, ids, 60, 50, 86400)
    kicks = Kicks(client, keys, 3600, batch)
    # Registration takes the worker's Batcher; before 413d0e1 it took the redis-py client.
    # Either is given, so that a checkout before that commit is measured the same way.
    sends: Any = batch if "batch" in inspect.signature(Registration).parameters else client
    registration = Registration(sends, routes, inbox, broadcasts, kicks, lambda: 5)
    passes: list[tuple[float, float]] = []
    try:
        await registration.register(client_of("1", "warm"))  # connections opened
        for number in range(args.passes):
            users = range((number + 1) * 10_000_000, (number + 1) * 10_000_000 + args.n)
            clients = [client_of(str(uid), f"c{uid}") for uid in users]
            started, cpu = time.perf_counter(), time.process_time()
            for start in range(0, args.n, args.c):
                burst = clients[start : start + args.c]
                await asyncio.gather(*(registration.register(c) for c in burst))
            passes.append((time.process_time() - cpu, time.perf_counter() - started))
    finally:
        batch.close()
        await client.aclose()
    return passes


def client_of(uid: str, conn_id: str) -> Client:
    """A connection as the gateway hands it over, without its socket (unused here)."""
    ws: Any = None
    return Client(ws, conn_id, Identity(uid, ("vip",)), 100, 100, int(time.time() * 1000))


def clean(url: str, prefix: str) -> None:
    with redis.Redis.from_url(url) as client:
        found = list(client.scan_iter(f"{prefix}*", count=1000))
        for start in range(0, len(found), 1000):
            client.delete(*found[start : start + 1000])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000, help="registrations per pass")
    parser.add_argument("-c", type=int, default=50, help="registrations at a time")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    prefix = f"pmqbench:{secrets.token_hex(4)}:"
    try:
        passes = run(measure(args, prefix))
    finally:
        clean(args.redis, prefix)
    cpu, wall = min(p[0] for p in passes), min(p[1] for p in passes)
    emit(
        {
            "registrations": args.n,
            "at_a_time": args.c,
            "cpu_us_per_registration": round(cpu / args.n * 1e6, 1),
            "wall_us_per_registration": round(wall / args.n * 1e6, 1),
            "passes_cpu_us": [round(p[0] / args.n * 1e6, 1) for p in passes],
            "load_average": load_average(),
        }
    )


if __name__ == "__main__":
    main()
