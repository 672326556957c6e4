"""Shared pieces of the load generators: config, node processes and memory, percentiles,
a tiny keep-alive HTTP/1.1 client, and the event loop.

Every bench talks only to 127.0.0.1 and prints one JSON object on stdout; progress goes to
stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import json
import multiprocessing as mp
import os
import queue
import random
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import httptools
import psutil
import uvloop

T = TypeVar("T")

MAX_SOCKETS_PER_PROCESS = 15000  # each process may hold 20,000 files here


def settle_heap() -> None:
    """Freeze what the load generator holds once connected (sockets, tasks) out of the
    garbage collector, so a full collection over them never delays the receipts it times."""
    gc.collect()
    gc.freeze()


def log(*parts: Any) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


def run(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# Node ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """What a bench needs to know about the node under test."""

    node: str
    ws_port: int
    ingest_port: int
    secret: str
    api_key: str
    control: str
    redis_url: str

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/ws"


def add_target_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, help="the node's config file")
    parser.add_argument("--secret", help="JWT secret (default: the config's auth.jwt_secret)")


def target_from(args: argparse.Namespace) -> Target:
    from pmq import configload
    from pmq.domain.jwtauth import resolve_jwt_secret

    config = configload.load(args.config)
    secret = args.secret or resolve_jwt_secret(config)
    pid_file = config.server.pid_file or f"/tmp/pmq-{config.server.node}.pid"
    control = config.server.control_socket or pid_file.removesuffix(".pid") + ".sock"
    return Target(
        node=config.server.node,
        ws_port=config.server.port,
        ingest_port=config.ingest.port,
        secret=secret,
        api_key=config.ingest.api_key,
        control=control,
        redis_url=config.redis.url,
    )


def node_processes(node: str) -> list[psutil.Process]:
    """Every live process titled ``pmq: ... [NODE]``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("pmq: ") and cmdline[0].endswith(f"[{node}]"):
            with contextlib.suppress(psutil.Error):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
    return found


def node_memory(node: str) -> dict[str, Any]:
    """PSS and RSS summed over the node's processes (bytes), and each process's."""
    total_pss = total_rss = 0
    per: dict[str, dict[str, int]] = {}
    for proc in node_processes(node):
        with contextlib.suppress(psutil.Error):
            info = proc.memory_full_info()
            title = proc.cmdline()[0]
            total_pss += info.pss
            total_rss += info.rss
            per[f"{title} pid {proc.pid}"] = {"pss": info.pss, "rss": info.rss}
    return {"pss": total_pss, "rss": total_rss, "processes": per}


def node_cpu(node: str) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each of the node's processes, by title."""
    out: dict[str, float] = {}
    for proc in node_processes(node):
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            out[f"{proc.cmdline()[0]} pid {proc.pid}"] = t.user + t.system
    return out


def redis_cpu(url: str = "redis://127.0.0.1:6379/0") -> float:
    """CPU seconds used so far by the Redis at ``url`` (INFO cpu, main thread and children);
    0.0 if unreachable."""
    import redis

    try:
        client = redis.Redis.from_url(url)
        info = client.info("cpu")
        client.close()
    except redis.RedisError:
        return 0.0
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def redis_calls(url: str = "redis://127.0.0.1:6379/0") -> dict[str, int]:
    """Calls per command so far (INFO commandstats) of the Redis at ``url``; {} if unreachable.
    Counts every client of that Redis, so other users of it show up too."""
    import redis

    try:
        client = redis.Redis.from_url(url)
        stats = client.info("commandstats")
        client.close()
    except redis.RedisError:
        return {}
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def calls_per(before: dict[str, int], after: dict[str, int], per: int) -> dict[str, float]:
    """Redis calls per message (or request) between two redis_calls() readings."""
    if not per:
        return {}
    out = {k: round((v - before.get(k, 0)) / per, 3) for k, v in after.items()}
    out = {k: v for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.01}
    out["total"] = round(sum(out.values()), 3)
    return out


def machine_cpu() -> float:
    """CPU seconds used so far by the whole machine (all cores, busy time only)."""
    t = psutil.cpu_times()
    return t.user + t.system + t.nice + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each process used between two node_cpu() readings, and the total."""
    used = {k: round(v - before.get(k, 0.0), 2) for k, v in after.items()}
    used["total"] = round(sum(used.values()), 2)
    return used


def node_status(target: Target) -> dict[str, Any] | None:
    from pmq.workers.channel import request

    try:
        return request(target.control, "status", timeout=10)
    except Exception:  # a status is only informative
        return None


def node_connections(target: Target) -> int | None:
    status = node_status(target)
    if status is None:
        return None
    return sum(
        int(w.get("connections", 0) or 0)
        for w in status.get("workers", [])
        if w.get("kind") == "socket"
    )


def collect(results: mp.Queue, kind: str, procs: int, timeout: float) -> dict[int, Any]:
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(got) < procs:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"only {len(got)} of {procs} processes reported {kind!r}")
        try:
            what, index, payload = results.get(timeout=min(left, 1))
        except queue.Empty:
            continue
        if what != kind:
            raise RuntimeError(f"process {index} reported {what!r}, expected {kind!r}")
        got[index] = payload
    return got


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# Numbers ---------------------------------------------------------------------------
def percentiles(values: Sequence[float], digits: int = 2) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)
    n = len(ordered)

    def at(q: float) -> float:
        return round(ordered[min(n - 1, int(q * n))], digits)

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": round(ordered[-1], digits)}


def source_addresses(count: int) -> list[str]:
    """One loopback source address per load-generator process, fresh for each run, so each
    gets a whole ephemeral port range and no port left in TIME_WAIT by an earlier run."""
    second = random.randint(1, 254)
    return [f"127.{second}.{i // 250}.{i % 250 + 2}" for i in range(count)]


IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


async def connected_socket(port: int, source: str | None, timeout: float = 30) -> socket.socket:
    """A TCP socket connected to 127.0.0.1:port from ``source``. The source port is left to
    connect() (IP_BIND_ADDRESS_NO_PORT): bind() picking it would search every port bound
    on that address, which gets slow with thousands of sockets per process. The connect is
    the socket's own (``connect_ex``, then a wait for writable only if it is in progress):
    uvloop's ``sock_connect`` resolves even a numeric address in its thread pool, which
    with the timers around it took a fifth of a storm client's CPU (docs/benchmarks.md)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if source:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        error = sock.connect_ex(("127.0.0.1", port))
        if error == errno.EINPROGRESS:  # a SYN dropped or not yet answered: wait for it
            loop = asyncio.get_running_loop()
            writable: asyncio.Future[None] = loop.create_future()

            def ready() -> None:
                if not writable.done():
                    writable.set_result(None)

            loop.add_writer(sock.fileno(), ready)
            try:
                async with asyncio.timeout(timeout):
                    await writable
            finally:
                loop.remove_writer(sock.fileno())
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, f"connect to port {port}: {os.strerror(error)}")
    except BaseException:
        sock.close()
        raise
    return sock


P = TypeVar("P", bound=asyncio.BaseProtocol)


async def connection_over(sock: socket.socket, factory: Callable[[], P]) -> P:
    """``loop.create_connection(factory, sock=sock)``'s protocol. Once that returns, the
    descriptor is uvloop's transport's, and ``sock`` is detached from it here. uvloop
    attaches ``sock`` to the transport only when the coroutine resumes, and detaches it
    when the transport closes; a peer that resets the connection in between (a node
    killed as it accepts: connection_lost runs before create_connection returns) leaves a
    closed transport, whose close already closed the descriptor, with ``sock`` still
    holding the number. Its garbage collection then closed whatever the OS had given that
    number to since: in a reconnect storm, connects failed with "File descriptor N is
    used by transport" and live connections were cut. When the connect fails, ``sock`` is
    closed at once, before any other descriptor is made: uvloop before 0.23 left it set
    (its issue 738), since then it is already detached and this is a no-op."""
    loop = asyncio.get_running_loop()
    try:
        _, protocol = await loop.create_connection(factory, sock=sock)
    except BaseException:
        with contextlib.suppress(OSError):
            sock.close()
        raise
    if isinstance(loop, uvloop.Loop):  # asyncio's own transports use the socket object
        sock.detach()
    return protocol


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result, indent=2))
    sys.stdout.flush()


# A tiny keep-alive HTTP/1.1 server connection ------------------------------------------
class RequestReader(asyncio.Protocol):
    """One keep-alive server connection of a bench's own HTTP endpoint (the plain relay's
    ingest, the webhook receiver): requests parsed by httptools, each handed whole to
    :meth:`request` in order; the subclass writes the answer to :attr:`transport`."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url, self.body = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.request(self.url, b"".join(self.body))

    def request(self, url: bytes, body: bytes) -> None:
        raise NotImplementedError


# A tiny keep-alive HTTP/1.1 client -------------------------------------------------
class HttpClient(asyncio.Protocol):
    """One keep-alive connection, one request at a time; responses parsed by httptools."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.body: list[bytes] = []
        self.closed = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> HttpClient:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(cls, host, port)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(exc)

    def on_message_begin(self) -> None:
        self.body = []

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.parser.get_status_code(), b"".join(self.body)))

    async def request(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        """Send ``head`` (request line and headers, without Content-Length) and ``body``."""
        assert self.transport is not None
        if self.transport.is_closing():
            raise ConnectionError("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def post_head(path: str, port: int, api_key: str = "") -> bytes:
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\n{auth}"
    ).encode()


# A minimal WebSocket client ---------------------------------------------------------
class RawWebSocket(asyncio.Protocol):
    """The least a load generator needs of RFC 6455, far cheaper per connection than a full
    client: send the upgrade, check for 101, answer pings with pongs, hand text frames to
    ``on_text``, notice the server's close. The server's Sec-WebSocket-Accept is not checked
    and our frames use an all-zero mask (valid framing; the server does not care)."""

    def __init__(self, request: bytes, on_text: Any = None) -> None:
        self.request = request
        self.on_text = on_text
        self.buf = bytearray()
        self.upgraded = False
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[str] = loop.create_future()
        self.first_text: asyncio.Future[bytes] = loop.create_future()  # the hello
        self.closing = False

    @classmethod
    async def connect(
        cls,
        port: int,
        path: str,
        source: str | None = None,
        on_text: Any = None,
        timeout: float = 30,
        wait_hello: bool = True,
    ) -> RawWebSocket:
        """Connect and upgrade; with ``wait_hello`` also wait for the first text frame (the
        server's hello, sent once the connection is registered)."""
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        async with asyncio.timeout(timeout):
            sock = await connected_socket(port, source)
            ws = await connection_over(sock, lambda: cls(request, on_text))
            try:
                await ws.opened
                if wait_hello:
                    waits: list[asyncio.Future[Any]] = [ws.first_text, ws.closed]
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    if ws.first_text.cancelled() or not ws.first_text.done():
                        raise ConnectionError(f"{ws.closed.result()} before the hello")
            except BaseException:  # a timeout too: no connection left open at the node
                ws.abort()
                raise
        return ws

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed before the upgrade: {exc}"))
        if not self.closed.done():
            self.closed.set_result("no close frame")
        if not self.first_text.done():
            self.first_text.cancel()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[:end].split(b"\r\n", 1)[0])
            if not status.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(ConnectionError(status.decode("latin-1")))
                assert self.transport is not None
                self.transport.close()
                return
            del buf[: end + 4]
            self.upgraded = True
            self.opened.set_result(None)
        pos, size = 0, len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if size - pos < head + length:
                break
            payload = bytes(buf[pos + head : pos + head + length])
            pos += head + length
            opcode = b0 & 0x0F
            if opcode == 0x1 or opcode == 0x0:
                if not self.first_text.done():
                    self.first_text.set_result(payload)
                if self.on_text is not None:
                    self.on_text(payload)
            elif opcode == 0x9:
                self.send(0xA, payload)
            elif opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                if not self.closed.done():
                    self.closed.set_result(f"close {code}")
                if not self.closing:
                    self.send(0x8, payload[:2])
                assert self.transport is not None
                self.transport.close()
        del buf[:pos]

    def send(self, opcode: int, payload: bytes) -> None:
        assert self.transport is not None and len(payload) < 126
        if not self.transport.is_closing():
            self.transport.write(
                bytes((0x80 | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload
            )

    def close(self, code: int = 1000) -> None:
        """Start the closing handshake; the server answers and closes the TCP connection."""
        self.closing = True
        self.send(0x8, code.to_bytes(2, "big"))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def let_go(sockets: list[Any], tasks: list[asyncio.Task[Any]], raw: bool) -> None:
    """Close the load generator's connections gently, 500 at a time (a close storm is not
    what a bench measures), abort what is left after 5 s a chunk, and cancel the tasks."""
    for start in range(0, len(sockets), 500):
        chunk = sockets[start : start + 500]
        if raw:
            for ws in chunk:
                ws.close()
            waits = [asyncio.ensure_future(ws.closed) for ws in chunk]
        else:
            waits = [asyncio.create_task(ws.close()) for ws in chunk]
        await asyncio.wait(waits, timeout=5)
    for ws in sockets:
        ws.transport.abort()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
