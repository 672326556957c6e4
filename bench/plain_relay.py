"""Two plain Python processes relaying through Redis: a floor for PMQ's delivery figures.

    redis-server --port 6520 --save "" --appendonly no --daemonize yes
    python -m bench.plain_relay --workers 2 --redis redis://127.0.0.1:6520/0

The issue's yardstick ("two plain Python processes relaying through Redis without any
storage"), built so bench.unicast, bench.ingest and bench.broadcast (with ``--probes 0``: it
has no ``ping`` action) can run against it unchanged. Forks N processes after the imports,
each on uvloop with:

- a websockets server on one SO_REUSEPORT port: the uid comes from the JWT in ``?token=``
  (PyJWT), the connection goes into a dict, a hello is sent;
- an HTTP server on another SO_REUSEPORT port (httptools): ``POST /api/v1/messages`` with
  ``{"to": uid, "kind", "body"}`` answers 202 after pushing to the user if it is here, or
  after one PUBLISH (redis-py asyncio with hiredis) to each other process's channel if not;
- ``POST /api/v1/broadcast`` with ``{"body": {...}}`` (any ``group``: everyone) answers 202
  with an id after one PUBLISH to every process's channel, its own included;
- a redis-py subscription to its own channel, pushing what arrives to its user, or to all
  its connections at once (``websockets``' ``broadcast``, no waiting) for a broadcast.

No storage, no inbox, no unread counters, no validation beyond JSON, no auth on ingest: the
least a relay does, so PMQ's figures can be read against it on the same machine in the same
hour. The processes are titled ``pmq: plain relay #i [NODE]`` so the benches count their
CPU as a node's. Prints one JSON line with the config path; runs until SIGINT/SIGTERM, then
deletes the config.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import orjson
import redis.asyncio
from websockets.asyncio.server import ServerConnection, broadcast

from bench.common import RequestReader
from bench.plain_server import run_forked, serve_websockets
from bench.run_node import free_port

SECRET = "plain-relay-secret-of-thirty-two-bytes!"
ACCEPTED = b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"


class Relay:
    """One process: its users' connections, its Redis client, the other processes' channels."""

    def __init__(self, index: int, workers: int, node: str, url: str) -> None:
        self.users: dict[int, ServerConnection] = {}
        self.redis = redis.asyncio.Redis.from_url(url)
        self.channel = f"plain:{node}:{index}"
        self.others = [f"plain:{node}:{i}" for i in range(workers) if i != index]
        self.ids = itertools.count(index << 48)

    async def connection(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        token = parse_qs(urlsplit(ws.request.path).query)["token"][0]
        uid = int(jwt.decode(token, SECRET, algorithms=["HS256"])["sub"])
        self.users[uid] = ws
        try:
            await ws.send('{"type":"hello"}')
            async for _ in ws:
                pass
        finally:
            if self.users.get(uid) is ws:
                del self.users[uid]

    async def publish(self, message: dict[str, Any]) -> bytes:
        uid = int(message["to"])
        msg_id = next(self.ids)
        msg = {"id": str(msg_id), "kind": message["kind"], "body": message["body"]}
        await self.deliver(uid, orjson.dumps({"type": "push", "msg": msg}))
        return b'{"id":"%d"}' % msg_id

    async def deliver(self, uid: int, frame: bytes) -> None:
        """Push ``frame`` to ``uid`` if connected here, else to the other processes."""
        ws = self.users.get(uid)
        if ws is not None:
            await ws.send(frame.decode())
        else:
            relayed = b"%d " % uid + frame
            for channel in self.others:
                await self.redis.publish(channel, relayed)

    async def announce(self, message: dict[str, Any]) -> bytes:
        msg_id = next(self.ids)
        msg = {"id": str(msg_id), "kind": message.get("kind", "system"), "body": message["body"]}
        relayed = b"* " + orjson.dumps({"type": "push", "msg": msg})
        for channel in [self.channel, *self.others]:
            await self.redis.publish(channel, relayed)
        return b'{"id":"%d"}' % msg_id

    async def relay(self) -> None:
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(self.channel)
        async for item in pubsub.listen():
            if item["type"] != "message":
                continue
            uid, _, frame = item["data"].partition(b" ")
            if uid == b"*":
                broadcast(self.users.values(), frame.decode())
                continue
            ws = self.users.get(int(uid))
            if ws is not None:
                await ws.send(frame.decode())


class Ingest(RequestReader):
    """Keep-alive HTTP/1.1, one request at a time per connection, as the publishers send."""

    def __init__(self, relay: Relay) -> None:
        super().__init__()
        self.relay = relay

    def request(self, url: bytes, body: bytes) -> None:
        publish = self.relay.announce if url == b"/api/v1/broadcast" else self.relay.publish
        asyncio.get_running_loop().create_task(self.answer(publish, body))

    async def answer(self, publish: Any, body: bytes) -> None:
        reply = await publish(orjson.loads(body))
        assert self.transport is not None
        self.transport.write(ACCEPTED % len(reply) + reply)


async def serve(relay: Relay, ws_port: int, http_port: int) -> None:
    loop = asyncio.get_running_loop()
    relaying = loop.create_task(relay.relay())
    http = await loop.create_server(lambda: Ingest(relay), "127.0.0.1", http_port, reuse_port=True)
    await serve_websockets(relay.connection, ws_port, 25)
    http.close()
    relaying.cancel()


def main() -> int:
    return run("plain relay", Relay)


def run(
    name: str,
    relay: Callable[[int, int, str, str], Relay],
    extra: Callable[[str, str, str], Coroutine[Any, Any, None]] | None = None,
) -> int:
    """Parse ``--workers`` and ``--redis``, write the config the benches read, and fork
    the processes: ``relay(index, workers, node, url)`` served in each, and
    ``extra(node, url, run_dir)`` run in one more when given."""
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--redis", required=True, help="redis:// URL (a private server)")
    args = parser.parse_args()
    ws_port, http_port = free_port(), free_port()
    node = f"{name.replace(' ', '')}{os.getpid()}"
    run_dir = tempfile.mkdtemp(prefix=f"pmq-{name.replace(' ', '-')}-")
    path = os.path.join(run_dir, "relay.toml")
    with open(path, "w") as f:
        f.write(
            f'[server]\nport = {ws_port}\nnode = "{node}"\n'
            f"[ingest]\nport = {http_port}\n"
            f'[redis]\nurl = "{args.redis}"\n'
            f'[auth]\njwt_secret = "{SECRET}"\n'
        )

    def process(i: int) -> Coroutine[Any, Any, None]:
        if extra is not None and i == args.workers:
            return extra(node, args.redis, run_dir)
        return serve(relay(i, args.workers, node, args.redis), ws_port, http_port)

    try:
        return run_forked(
            name,
            node,
            args.workers + (extra is not None),
            process,
            {"config": path, "node": node, "ws_port": ws_port},
        )
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
