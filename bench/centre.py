"""The notification centre's costs (docs/notification-centre.md).

    python -m bench.centre [--stored 10000] [--requests 200] [--publishes 20000]

- list: a node (bench.run_node, SQLite storage, 2 socket workers) and one user with --stored
  messages in storage (written to the node's store directly, acked, the newest a minute
  old) and 20 hot ones. One WebSocket asks msg.list --requests times for each of: the first
  page (20), a page from the middle (``before`` the 5,000th), the first page of one kind, and
  unread_only after msg.read of every other message by ids (1000 a request); then msg.read
  of everything once. Reported: latency percentiles (ms) of each, as the client sees them.
- publish: what the centre adds to a unicast's path is the message's entry in its bucket's
  ``owners`` hash (HSET in inbox_publish, HDEL when the writer stored it); read state costs
  a publish nothing. Redis's CPU per publish script call, one message each, with the
  script as shipped and with its HSET taken out (the same keys and arguments), best of three
  passes of --publishes calls each, on a private key prefix; and the HDEL per message.

JSON on stdout (bench.common.emit). Nothing else should run on the Redis while it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import subprocess
import sys
import time
from typing import Any

import orjson
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from bench.common import emit, load_average, log, percentiles, redis_cpu, run
from bench.run_node import free_port, redis_server
from pmq import configload
from pmq.domain.ids import first_id_at, timestamp_ms
from pmq.domain.jwtauth import mint_token
from pmq.redis import scripts
from pmq.redis.keys import Keys
from pmq.store import StoredMessage, open_store
from pmq.wire.client import Message

UID = 4242
KINDS = ("comment", "notice", "letter")
PACE = 0.03  # seconds between two requests: server.rate is 50 a second


def start_node() -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.run_node", "--workers", "2", "--for", "900"],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit("bench.run_node did not start a node")
    return proc, json.loads(line)


def store_messages(config_path: str, count: int) -> list[int]:
    """``count`` acked messages of UID in the node's store, the newest a minute old."""
    config = configload.load(config_path)
    store = open_store(config.storage)
    start = int(time.time() * 1000) - 60_000 - count
    rows = [
        StoredMessage(first_id_at(start + n) + 1, UID, KINDS[n % 3], 5, f'{{"n": {n}}}', start + n)
        for n in range(count)
    ]
    try:
        store.write_messages(rows)
        store.ack(UID, [r.id for r in rows])
    finally:
        store.close()
    return [r.id for r in rows]


async def timed(ws: Any, action: str, data: dict[str, Any], sequence: list[int]) -> float:
    """One request's round trip in ms, paced under the connection's rate limit (server.rate)."""
    await asyncio.sleep(PACE)
    sequence[0] += 1
    request_id = str(sequence[0])
    began = time.perf_counter()
    await ws.send(orjson.dumps({"id": request_id, "action": action, "data": data}).decode())
    while True:
        frame = orjson.loads(await ws.recv())
        if frame.get("type") == "reply" and frame.get("id") == request_id:
            assert frame["code"] == 200, frame
            return (time.perf_counter() - began) * 1000


async def measure_list(info: dict[str, Any], ids: list[int], requests: int) -> dict[str, Any]:
    token = mint_token(info["secret"], UID)
    url = f"ws://127.0.0.1:{info['ws_port']}/ws?token={token}"
    sequence = [0]
    results: dict[str, Any] = {}
    async with connect(url, max_size=None) as ws:
        await timed(ws, "ping", {}, sequence)  # after the replay
        cases: dict[str, dict[str, Any]] = {
            "first_page": {"limit": 20},
            "middle_page": {"limit": 20, "before": str(ids[len(ids) // 2])},
            "one_kind": {"limit": 20, "kind": "notice"},
        }
        for name, data in cases.items():
            results[name] = percentiles(
                [await timed(ws, "msg.list", data, sequence) for _ in range(requests)]
            )
        half = [str(i) for i in ids[::2]]
        for start in range(0, len(half), 1000):
            await timed(ws, "msg.read", {"ids": half[start : start + 1000]}, sequence)
        unread = {"limit": 20, "unread_only": True}
        results["unread_only"] = percentiles(
            [await timed(ws, "msg.list", unread, sequence) for _ in range(requests)]
        )
        results["read_everything_ms"] = round(await timed(ws, "msg.read", {}, sequence), 1)
    return results


def without_owners(source: str) -> str:
    """inbox_publish less the centre's owners entry."""
    line = "    redis.call('HSET', KEYS[4], ARGV[a], ARGV[a + 2])\n"
    assert line in source
    return source.replace(line, "")


def private_redis() -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server of this bench's own (no persistence), so nothing else skews its CPU."""
    port = free_port()
    return redis_server(port, None, "--appendonly", "no"), f"redis://127.0.0.1:{port}/0"


async def measure_publish(count: int, url: str) -> dict[str, Any]:
    client = aioredis.Redis.from_url(url)
    keys = Keys(f"pmqbench:{secrets.token_hex(4)}:")
    shipped = client.register_script(scripts.source("inbox_publish"))
    bare = client.register_script(without_owners(scripts.source("inbox_publish")))
    passes: dict[str, list[float]] = {"with_owners": [], "without_owners": [], "hdel": []}
    try:
        for number in range(3):
            for name, script in (("with_owners", shipped), ("without_owners", bare)):
                before = redis_cpu(url)
                for n in range(count):
                    uid = str(1_000_000 + n)
                    message_id = first_id_at(int(time.time() * 1000)) + n
                    wire = Message(message_id, "notice", None, uid, {"n": n}, 0).encode()
                    script_keys = [
                        keys.publish_dedupe("", 0),
                        keys.store_queue("b0"),
                        keys.inbox_index(0),
                        keys.owners(0),
                        *keys.publish_keys(uid),
                    ]
                    args: list[Any] = [
                        "0",
                        1,
                        600,
                        b"",
                        message_id,
                        timestamp_ms(message_id),
                        uid,
                        wire,
                        "notice",
                        b"{}",
                    ]
                    await script(keys=script_keys, args=args)
                passes[name].append((redis_cpu(url) - before) / count * 1e6)
                owners = await client.hkeys(keys.owners(0))
                before = redis_cpu(url)
                for start in range(0, len(owners), 500):
                    await client.hdel(keys.owners(0), *owners[start : start + 500])
                if owners:
                    passes["hdel"].append((redis_cpu(url) - before) / len(owners) * 1e6)
                await client.delete(*[k async for k in client.scan_iter(f"{keys.prefix}*")])
            log(
                f"publish pass {number + 1}: "
                + ", ".join(f"{k} {v[-1]:.1f} us" for k, v in passes.items() if v)
            )
    finally:
        found = [k async for k in client.scan_iter(f"{keys.prefix}*")]
        if found:
            await client.delete(*found)
        await client.aclose()
    return {f"redis_cpu_us_{k}": round(min(v), 2) for k, v in passes.items() if v}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stored", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--publishes", type=int, default=20_000)
    args = parser.parse_args()
    proc, info = start_node()
    try:
        ids = store_messages(info["config"], args.stored)
        listing = run(measure_list(info, ids, args.requests))
    finally:
        proc.terminate()
        proc.wait(60)
    server, url = private_redis()
    try:
        publishing = run(measure_publish(args.publishes, url))
    finally:
        server.terminate()
        server.wait(10)
    emit(
        {
            "stored": args.stored,
            "requests": args.requests,
            "msg_list_ms": listing,
            "publish": publishing,
            "load_average": load_average(),
        }
    )


if __name__ == "__main__":
    main()
