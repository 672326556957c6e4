"""How long a recovery from a Redis data loss takes, by the users with unacked messages.

    python -m bench.redis_recovery [--users 100000] [--storage URL] [--redis URL]

Fills a fresh store (SQLite in a temporary directory unless ``--storage`` names another,
e.g. ``mysql://root@127.0.0.1:3306/pmq_bench``, created if missing; drop it afterwards)
with two unacked messages for each of ``--users`` users over 128 shards, then runs one
recovery (pmq.tasks.recovery) of the one bucket against Redis under a private key prefix,
removed afterwards. Reported (JSON): the users flagged cold and the seconds it took.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from typing import Any

import redis.asyncio as aioredis

from bench.common import emit
from pmq.config import StorageConfig
from pmq.redis.keys import Keys
from pmq.store import Store, StoredMessage, open_store
from pmq.tasks.recovery import Recovery

SHARDS = 128
CHUNK = 20_000  # rows per write


def fill(store: Store, users: int) -> None:
    now = int(time.time() * 1000)
    rows = [
        StoredMessage(i + 1, 1000 + i // 2, "notice", None, "{}", now) for i in range(users * 2)
    ]
    for start in range(0, len(rows), CHUNK):
        store.write_messages(rows[start : start + CHUNK])


async def recover(store: Store, redis_url: str) -> dict[str, Any]:
    prefix = f"pmqbench:{secrets.token_hex(4)}:"
    client = aioredis.Redis.from_url(redis_url)
    try:
        recovery = Recovery(client, Keys(prefix), store, asyncio.to_thread, "bench:0", 3600)
        began = time.monotonic()
        await recovery.check_once()
        seconds = time.monotonic() - began
        return {"users_flagged": recovery.flagged, "seconds": round(seconds, 2)}
    finally:
        keys = [k async for k in client.scan_iter(f"{prefix}*", count=5000)]
        for start in range(0, len(keys), 5000):
            await client.delete(*keys[start : start + 5000])
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--storage", default="")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    url = args.storage or f"sqlite:///{tempfile.mkdtemp()}/pmq.db"
    store = open_store(StorageConfig(url=url, shards=SHARDS, pool_size=4))
    try:
        store.init_schema()
        fill(store, args.users)
        result = asyncio.run(recover(store, args.redis))
    finally:
        store.close()
    emit({"storage": url.split(":", 1)[0], "users": args.users, **result})


if __name__ == "__main__":
    main()
