"""The Python a socket worker spends on one publish, with Redis and the sockets faked.

    python -m bench.hotpath [-n 20000]

End-to-end runs on this machine swing by up to 2x from one hour to the next (other tenants
of the host), which hides a change of a few microseconds in PMQ's own code. This bench
runs the real code of the path in one process, with nothing else to wait for:

- request: the bytes of ``POST /api/v1/messages`` fed to the ingest server's connection
  (pmq.reactor.httpconn), its handler (pmq.reactor.ingest), the publish (pmq.domain.messaging, the
  inbox's key and argument building), the PUBLISH script's reply made up in Python, then
  for half the users a push to their connection here (pmq.domain.routing, pmq.reactor.relay, the
  unread badge of pmq.reactor.unread, pmq.reactor.connections) and for the other half a
  relay to another worker, and the HTTP reply;
- relay: a relayed message as the worker holding the user receives it, to the push.

Transports only count writes. Reported (JSON): CPU microseconds per request and per relay,
the best of five passes.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import time
from typing import Any

import orjson
import redis.asyncio as aioredis

from bench.common import emit, run
from pmq.domain.auth import Identity
from pmq.domain.ids import IdGenerator
from pmq.domain.inbox import Inbox
from pmq.domain.routing import Routes
from pmq.domain.unread import Unread
from pmq.reactor.connections import Client, ConnectionTable
from pmq.reactor.httpconn import HttpConnection
from pmq.reactor.httpserver import HttpServer
from pmq.reactor.ingest import build_router
from pmq.reactor.relay import Relay
from pmq.reactor.unread import UnreadPusher
from pmq.redis.keys import Keys
from pmq.wire import relay as wire_relay
from pmq.wire.relay import Op, UnreadState

USERS = 10_000
HERE, THERE = "w1", "w2"  # this worker, and the one holding the even uids
STATE_REPLY = [b"notice", b"3", b"0"]  # what the script reads back: one kind, no clear
UNREAD_STATE = UnreadState.of_reply(STATE_REPLY)


class CountingTransport:
    """Stands for a socket: counts writes (keeping the last), never pushes back."""

    def __init__(self) -> None:
        self.writes = 0
        self.last = b""

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.last = data

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class OpenWebSocket:
    """What Client.write_frame uses of a connection (pmq.reactor.websocket.Connection)."""

    open = True

    def __init__(self) -> None:
        self.transport = CountingTransport()

    def write(self, frame: bytes) -> int:
        self.transport.write(frame)
        return 0  # bytes not yet sent


class ScriptedRedis:
    """The Batcher's interface, answering at once: the PUBLISH script's reply for a user
    with one connection (on HERE for odd uids, THERE for even), SPUBLISH's 1 receiver."""

    pipe = None

    async def script(self, script: Any, keys: list[Any], args: list[Any]) -> Any:
        return self._reply(args[6])  # the first message's recipient (PUBLISH's ARGV layout)

    async def script_merged(
        self, script: Any, head: Any, keys: list[Any], args: list[Any], items: int, width: int
    ) -> Any:
        return self._reply(args[2])  # as script(), the ARGV without its head

    @staticmethod
    def _reply(uid: str) -> list[Any]:
        worker = HERE if int(uid) % 2 else THERE
        return [1, [b"c" + uid.encode(), worker.encode()], STATE_REPLY]

    async def call(self, *args: Any) -> Any:
        return 1


class Worker:
    """The parts of a socket worker the path goes through, wired as pmq.workers.socket does."""

    def __init__(self) -> None:
        redis = aioredis.Redis()  # never connected: every call goes to ScriptedRedis
        keys = Keys("pmq:hotpath:")
        self.table = ConnectionTable()
        for uid in range(1, USERS + 1):
            ws: Any = OpenWebSocket()
            self.table.add(Client(ws, f"c{uid}", Identity(str(uid)), 1 << 20, 100))
        self.pusher = UnreadPusher(1.0, self.table, Unread(redis, keys, 604_800))
        self.pusher.times, self.pusher.fresh = {"all": []}, True  # broadcast times known
        batch: Any = ScriptedRedis()
        self.routes = Routes(redis, keys, HERE, 25, batch)
        self.relay = Relay(self.table, self.pusher)
        self.routes.subscribe(self.relay.deliver)
        self.inbox = Inbox(redis, keys, IdGenerator(1), 86_400, 604_800, batch)
        self.redis = redis


def requests(count: int) -> list[bytes]:
    rng = random.Random(1)
    out = []
    for n in range(count):
        body = orjson.dumps(
            {
                "to": rng.randrange(1, USERS + 1),
                "kind": "notice",
                "body": {"n": n, "t": time.time(), "text": "bench"},
            }
        )
        out.append(
            b"POST /api/v1/messages HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
    return out


async def main(count: int) -> dict[str, Any]:
    worker = Worker()
    server = HttpServer(build_router(worker), max_body=65_536)  # type: ignore[arg-type]
    conn = HttpConnection(server)
    transport = CountingTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]

    async def serve(batch: list[bytes]) -> None:
        for request in batch:  # one at a time, as a keep-alive publisher sends them
            before = transport.writes
            conn.data_received(request)
            while transport.writes == before:
                await asyncio.sleep(0)
            if not transport.last.startswith(b"HTTP/1.1 202"):  # else it measured a failure
                raise RuntimeError(f"the publish was not accepted: {transport.last[:300]!r}")

    sample = requests(count)
    await serve(sample[: count // 10])  # warm up
    per_request = await best_of(5, count, lambda: serve(sample), worker)

    frame = b'{"type":"push","msg":{"id":"1","kind":"notice","from":null,"to":"5","body":{}}}'
    payload = wire_relay.encode_message(frame, UNREAD_STATE)
    relays = [
        {"data": wire_relay.encode(Op.MESSAGE, str(uid), payload, 0.0)}
        for uid in range(1, count + 1)
    ]

    async def relay() -> None:
        for message in relays:
            worker.relay.on_message(message)

    per_relay = await best_of(5, count, relay, worker)
    return {
        "bench": "hotpath",
        "requests": count,
        "request_cpu_us": round(per_request, 2),
        "relay_cpu_us": round(per_relay, 2),
    }


async def best_of(passes: int, count: int, step: Any, worker: Worker) -> float:
    best = float("inf")
    for _ in range(passes):
        gc.collect()
        worker.pusher.pushed.clear()  # every pass starts with no badge sent this interval
        start = time.process_time()
        await step()
        best = min(best, (time.process_time() - start) / count * 1e6)
    return best


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--requests", type=int, default=20_000)
    args = parser.parse_args()
    emit(run(main(args.requests)))


if __name__ == "__main__":
    cli()
