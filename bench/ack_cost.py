"""The CPU a socket worker spends on one msg.ack, Redis real, nothing else around it.

    python -m bench.ack_cost [-n 8000] [--concurrency 64]

Publishes one message to each of N users through pmq.domain.inbox, then runs the msg.ack
handler's two steps for each (pmq.domain.broadcast's acknowledge, then the inbox's ack),
``--concurrency`` at a time as a busy worker meets them, and reports this process's CPU per
ack (JSON). Redis is the shared one (127.0.0.1:6379, database 0) under a fresh key prefix,
removed afterwards. Run it with PYTHONPATH set to a checkout to measure that tree's code.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from typing import Any

import redis.asyncio as aioredis

from bench.common import emit, run
from pmq.domain.broadcast import Broadcasts
from pmq.domain.ids import IdGenerator
from pmq.domain.inbox import Inbox
from pmq.redis.batching import Batcher
from pmq.redis.keys import Keys


async def main(count: int, concurrency: int) -> dict[str, Any]:
    client = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
    prefix = f"pmqbench:ack:{secrets.token_hex(4)}:"
    keys = Keys(prefix)
    batch = Batcher(client)  # the socket worker's one hot-path connection, shared
    ids = IdGenerator(7)
    inbox = Inbox(client, keys, ids, 86_400, 86_400, batch)
    try:
        broadcasts = Broadcasts(client, keys, ids, 60, 20, 86_400, batch=batch)
    except TypeError:  # a tree whose Broadcasts takes no batcher (acks through redis-py)
        broadcasts = Broadcasts(client, keys, ids, 60, 20, 86_400)
    users = [str(1_000_000 + i) for i in range(count)]
    messages: list[tuple[str, int]] = []
    try:
        for first in range(0, count, concurrency):
            part = users[first : first + concurrency]
            accepted = await asyncio.gather(
                *(inbox.publish([uid], "notice", None, {"n": 1}) for uid in part)
            )
            messages += [(uid, int(a.ids[0])) for uid, a in zip(part, accepted, strict=True)]

        async def ack(uid: str, message_id: int) -> int:  # as pmq.handlers.msg.ack
            known = await broadcasts.acknowledge(uid, (), [message_id])
            acked = await inbox.ack(uid, [i for i in [message_id] if i not in known])
            return len(known) + len(acked.hot) + acked.cold

        start = time.process_time()
        done = 0
        for first in range(0, count, concurrency):
            part = messages[first : first + concurrency]
            done += sum(await asyncio.gather(*(ack(uid, m) for uid, m in part)))
        used = time.process_time() - start
        if done != count:
            raise RuntimeError(f"{done} of {count} acks removed a message")
    finally:
        found = [key async for key in client.scan_iter(f"{prefix}*", count=1000)]
        for first in range(0, len(found), 500):
            await client.delete(*found[first : first + 500])
        await client.aclose()
    return {
        "bench": "ack_cost",
        "acks": count,
        "concurrency": concurrency,
        "cpu_us_per_ack": round(1e6 * used / count, 1),
    }


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--acks", type=int, default=8000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    emit(run(main(args.acks, args.concurrency)))


if __name__ == "__main__":
    cli()
