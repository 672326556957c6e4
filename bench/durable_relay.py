"""The plain relay plus the least durable work the contract asks of each message: a floor.

    redis-server --port 6520 --save "" --appendonly no --daemonize yes
    python -m bench.durable_relay --workers 2 --redis redis://127.0.0.1:6520/0

bench.plain_relay's processes, except that a publish first runs one Lua script that keeps the
message in the user's inbox (ZADD to the index, HSET of the body), counts it unread
(HINCRBY), queues it for storage (RPUSH) and returns the user's counters, which ride inside
the push frame as its badge; and one more process moves that queue into SQLite (LPOP of up to
500, one executemany and one commit per batch, WAL, synchronous NORMAL, one index). SPEC 4
asks this of every unicast message: an inbox in Redis that a reconnect replays, an unread
counter, a badge, a row in SQL.

It leaves out whatever else PMQ does for a message: expiry, the sweep's index, the owners
entry of a retraction, the registry lookup, idempotency keys, validation, the badge as a
frame of its own, sharded tables, the relay op's routing. So its figures are above what
any server keeping the contract in Python on this design can reach: the floor under the
issue's goals ("PMQ / plain relay") is this relay's own ratio to the plain one, measured in
the same sitting.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from typing import Any

import orjson
import redis.asyncio

from bench.plain_relay import Relay, run

KEEP = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
redis.call('RPUSH', KEYS[4], ARGV[5])
return redis.call('HGETALL', KEYS[3])
"""
BATCH = 500
LINGER = 0.02  # seconds the writer waits on an empty queue, as PMQ's writer lingers


class DurableRelay(Relay):
    def __init__(self, index: int, workers: int, node: str, url: str) -> None:
        super().__init__(index, workers, node, url)
        self.keep = self.redis.register_script(KEEP)
        self.queue = f"durable:{node}:queue"
        self.prefix = f"durable:{node}:"

    async def publish(self, message: dict[str, Any]) -> bytes:
        uid = int(message["to"])
        msg_id = next(self.ids)
        kind = message["kind"]
        msg = {"id": str(msg_id), "kind": kind, "body": message["body"]}
        wire = orjson.dumps(msg).decode()
        counters = await self.keep(
            keys=[
                f"{self.prefix}i:{uid}",
                f"{self.prefix}b:{uid}",
                f"{self.prefix}u:{uid}",
                self.queue,
            ],
            args=[msg_id, msg_id, wire, kind, orjson.dumps([msg_id, uid, kind, wire])],
        )
        unread = {counters[i].decode(): int(counters[i + 1]) for i in range(0, len(counters), 2)}
        await self.deliver(uid, orjson.dumps({"type": "push", "msg": msg, "unread": unread}))
        return b'{"id":"%d"}' % msg_id


async def write(node: str, url: str, run_dir: str) -> None:
    """Move the storage queue into SQLite (in ``run_dir``) until SIGTERM."""
    client = redis.asyncio.Redis.from_url(url)
    db = sqlite3.connect(os.path.join(run_dir, "store.db"), isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute(
        "CREATE TABLE IF NOT EXISTS msg (id INTEGER PRIMARY KEY, uid INTEGER NOT NULL,"
        " kind TEXT NOT NULL, body BLOB NOT NULL)"
    )
    db.execute("CREATE INDEX IF NOT EXISTS msg_uid ON msg (uid, id)")
    queue = f"durable:{node}:queue"
    while True:
        items = await client.lpop(queue, BATCH)
        if not items:
            await asyncio.sleep(LINGER)
            continue
        db.execute("BEGIN")
        db.executemany(
            "INSERT OR IGNORE INTO msg VALUES (?, ?, ?, ?)", [orjson.loads(item) for item in items]
        )
        db.execute("COMMIT")


def main() -> int:
    return run("durable relay", DurableRelay, write)


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
