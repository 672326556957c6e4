"""Keep-alive HTTP publishers for POST /api/v1/messages, shared by the unicast and ingest
benches: C connections per process, each sending one request at a time, until M messages
have gone out (or a time limit passes)."""

from __future__ import annotations

import asyncio
import collections
import multiprocessing as mp
import random
import time
from array import array
from typing import Any

import orjson

from bench.common import HttpClient, Target, post_head, run

PATH = "/api/v1/messages"


def publisher(
    index: int,
    connections: int,
    first: int,
    count: int,
    uids: tuple[int, int],
    online: list[int] | None,
    target: Target,
    time_limit: float,
    results: mp.Queue,
    go: Any,
) -> None:
    """Send messages ``first .. first + count - 1`` (the ``n`` in each body) to random uids
    (from ``online`` if given, else from the range ``uids``); report to ``results``."""
    run(
        publisher_main(
            index, connections, first, count, uids, online, target, time_limit, results, go
        )
    )


async def publisher_main(
    index: int,
    connections: int,
    first: int,
    count: int,
    uids: tuple[int, int],
    online: list[int] | None,
    target: Target,
    time_limit: float,
    results: mp.Queue,
    go: Any,
) -> None:
    loop = asyncio.get_running_loop()
    clients = [await HttpClient.open(target.ingest_port) for _ in range(connections)]
    head = post_head(PATH, target.ingest_port, target.api_key)
    results.put(("ready", index, None))
    await loop.run_in_executor(None, go.wait)
    rng = random.Random(index)
    next_n = iter(range(first, first + count))
    accepted = array("q")  # the n of every message answered 202
    accepted_to = array("q")  # and its uid
    latency = array("d")  # ms per request
    statuses: collections.Counter[int] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    cpu_start = time.process_time()
    start = time.time()
    deadline = time.monotonic() + time_limit

    async def worker(client: HttpClient) -> None:
        for n in next_n:
            if time.monotonic() > deadline:
                return
            uid = rng.choice(online) if online is not None else rng.randrange(*uids)
            sent = time.time()
            body = orjson.dumps(
                {"to": uid, "kind": "notice", "body": {"n": n, "t": sent, "text": "bench"}}
            )
            try:
                status, _ = await client.request(head, body)
            except (ConnectionError, OSError) as exc:
                errors[type(exc).__name__] += 1
                return
            latency.append((time.time() - sent) * 1000)
            statuses[status] += 1
            if status == 202:
                accepted.append(n)
                accepted_to.append(uid)

    await asyncio.gather(*(worker(c) for c in clients))
    end = time.time()
    for c in clients:
        c.close()
    results.put(
        (
            "done",
            index,
            {
                "start": start,
                "end": end,
                "accepted": accepted.tobytes(),
                "accepted_to": accepted_to.tobytes(),
                "latency": latency.tobytes(),
                "statuses": dict(statuses),
                "errors": dict(errors),
                "cpu_s": time.process_time() - cpu_start,
            },
        )
    )


def start_publishers(
    ctx: Any,
    target: Target,
    processes: int,
    concurrency: int,
    messages: int,
    uids: tuple[int, int],
    online: list[int] | None,
    time_limit: float,
    results: mp.Queue,
    go: Any,
) -> list[Any]:
    """Start ``processes`` publisher processes sharing ``concurrency`` connections and
    ``messages`` messages between them; they report ready, then wait for ``go``."""
    procs = []
    first = 0
    for i in range(processes):
        conns = concurrency // processes + (1 if i < concurrency % processes else 0)
        share = messages // processes + (1 if i < messages % processes else 0)
        p = ctx.Process(
            target=publisher,
            args=(i, conns, first, share, uids, online, target, time_limit, results, go),
            daemon=True,
        )
        p.start()
        procs.append(p)
        first += share
    return procs


def merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    accepted = array("q")
    accepted_to = array("q")
    latency = array("d")
    statuses: collections.Counter[int] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    for r in reports:
        accepted.frombytes(r["accepted"])
        accepted_to.frombytes(r["accepted_to"])
        latency.frombytes(r["latency"])
        statuses.update({int(k): v for k, v in r["statuses"].items()})
        errors.update(r["errors"])
    return {
        "start": min(r["start"] for r in reports),
        "end": max(r["end"] for r in reports),
        "accepted": accepted,
        "accepted_to": accepted_to,
        "latency": latency,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": dict(errors),
        "cpu_s": round(sum(r["cpu_s"] for r in reports), 2),
    }
