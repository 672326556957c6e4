"""Test helpers: free ports, waiting on a condition (:func:`wait_for` and its async twin),
and real PMQ nodes as subprocesses.

A :class:`Node` writes its own config (free ports, a unique node name, a private Redis key
prefix, SQLite in tmp_path), starts ``python -m pmq.ctl start`` for real, and waits on the
master's control socket. Everything it started is stopped and its Redis keys removed at
teardown, so runs never collide.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import http.client
import inspect
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import psutil
import pymysql
import pytest
from websockets.sync.client import ClientConnection, connect

from pmq.domain.jwtauth import mint_token
from pmq.errors import PMQError
from pmq.workers.channel import request

REDIS_URL = os.environ.get("PMQ_TEST_REDIS", "redis://127.0.0.1:6379/0")
MYSQL_URL = os.environ.get("PMQ_TEST_MYSQL", "mysql://root@127.0.0.1:3306")
SECRET = "test-secret-" + "x" * 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


POLL_SECONDS = 0.02  # between two calls of a waited-for condition


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns a truthy value and return that value; fail the
    test ``timeout`` seconds on, naming ``what`` was awaited. The one way tests wait."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL_SECONDS)


async def wait_for_async(
    condition: Callable[[], Any],
    timeout: float = 10.0,
    what: str = "condition",
    *,
    interval: float = POLL_SECONDS,
) -> Any:
    """:func:`wait_for` on an event loop: ``condition`` may also return an awaitable (an
    ``async def`` or a Redis call), whose result is what counts; the loop runs between
    polls. ``interval=0`` polls at each turn of the loop, for a condition that changes
    without I/O (a handler run in memory) and must not cost a real pause per wait."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


class Node:
    """One PMQ node (master + workers) started as a real process tree."""

    def __init__(self, tmp: Path, prefix: str, **sections: dict[str, Any]) -> None:
        self.tmp = tmp
        self.name = "t" + secrets.token_hex(4)
        self.prefix = prefix
        self.port = free_port()
        self.ingest_port = free_port()
        settings: dict[str, dict[str, Any]] = {
            "server": {
                "host": "127.0.0.1", "port": self.port, "workers": 2, "task_workers": 1,
                "node": self.name, "pid_file": str(tmp / f"{self.name}.pid"),
                "graceful_timeout": 5, "worker_timeout": 10,
            },
            "ingest": {"host": "127.0.0.1", "port": self.ingest_port},
            "redis": {"url": REDIS_URL, "prefix": prefix},
            "storage": {"url": f"sqlite:///{tmp}/pmq.db", "shards": 4},
            "auth": {"jwt_secret": SECRET},
            "heartbeat": {"interval": 2, "timeout": 6},
        }
        for section, values in sections.items():
            settings.setdefault(section, {}).update(values)
        self.settings = settings
        self.config_path = tmp / f"{self.name}.toml"
        self.config_path.write_text(
            "\n".join(
                f"[{section}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())
                for section, values in settings.items()
            )
        )
        self.log_path = tmp / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid_file(self) -> str:
        return str(self.settings["server"]["pid_file"])

    @property
    def control(self) -> str:
        return str(Path(self.pid_file).with_suffix(".sock"))

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def ingest_url(self) -> str:
        return f"http://127.0.0.1:{self.ingest_port}"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PMQ_")}
        env.update(extra)
        return env

    def start(self, wait: bool = True, **env: str) -> Node:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pmq.ctl", "start", "-c", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env(**env), cwd=self.tmp,
        )
        log.close()
        if wait:
            self.wait_ready()
        return self

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pmq.ctl", *args, "-c", str(self.config_path)],
            capture_output=True, text=True, env=self.env(), cwd=self.tmp, timeout=timeout,
        )

    def status(self) -> dict[str, Any] | None:
        try:
            return request(self.control, "status", timeout=5)
        except (PMQError, OSError):
            return None

    def wait_ready(self, timeout: float = 30) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"node exited with {self.proc.returncode}:\n{self.log()}")
            status = self.status()
            return status if status and status["ready"] else None

        return wait_for(ready, timeout, f"node {self.name} to be ready")  # type: ignore[no-any-return]

    def workers(self, kind: str = "socket") -> list[dict[str, Any]]:
        status = self.status() or {"workers": []}
        return [w for w in status["workers"] if w["kind"] == kind and not w["retiring"]]

    def master_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        os.kill(self.master_pid(), sig)

    def wait_exit(self, timeout: float = 20) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def processes(self) -> list[psutil.Process]:
        """Every live process whose title names this node."""
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if cmdline and cmdline[0].startswith("pmq: ") and cmdline[0].endswith(
                f"[{self.name}]"
            ):
                with contextlib.suppress(psutil.Error):
                    if proc.status() != psutil.STATUS_ZOMBIE:
                        found.append(proc)
        return found

    def token(self, uid: str | int, groups: tuple[str, ...] = (), role: str = "user") -> str:
        return mint_token(SECRET, uid, groups, role, ttl=3600)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill_all(self) -> None:
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


# Clients of a node: the main site over HTTP, users over WebSocket ----------------------


class Ingest:
    """The main site's side of a node: one keep-alive HTTP connection to the ingest port.

    :meth:`call` returns ``(status, decoded JSON reply)``; the connection reopens by itself
    after a reply that closed it (413, 400 on a malformed request)."""

    def __init__(self, node: Node, api_key: str = "", timeout: float = 10.0) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", node.ingest_port, timeout=timeout)
        self.api_key = api_key

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        form: dict[str, str] | None = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        sent = dict(headers or {})
        if self.api_key and "Authorization" not in sent:
            sent["Authorization"] = f"Bearer {self.api_key}"
        payload: bytes | None = raw
        if form is not None:
            payload = urlencode(form).encode()
            sent.setdefault("Content-Type", "application/x-www-form-urlencoded")
        elif body is not None:
            payload = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        try:
            self.conn.request(method, path, body=payload, headers=sent)
            response = self.conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            raise
        if response.will_close:
            self.conn.close()
        return response.status, json.loads(data) if data else None

    def publish(self, body: dict[str, Any], **kwargs: Any) -> tuple[int, Any]:
        return self.call("POST", "/api/v1/messages", body, **kwargs)

    def close(self) -> None:
        self.conn.close()


class WsClient:
    """One user's real WebSocket connection. Frames are read in order; frames a call did not
    ask for are kept for later calls, so pushes, unread events and replies can interleave."""

    def __init__(self, ws: ClientConnection, hello: dict[str, Any]) -> None:
        self.ws = ws
        self.hello = hello
        self.kept: collections.deque[dict[str, Any]] = collections.deque()
        self.sequence = 0

    def _read(self, deadline: float, what: str) -> dict[str, Any]:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"timed out waiting for {what}")
        try:
            frame = self.ws.recv(timeout=left)
        except TimeoutError:
            pytest.fail(f"timed out waiting for {what}")
        return json.loads(frame)  # type: ignore[no-any-return]

    def next(self, frame_type: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next frame of ``frame_type`` (kept ones first); others stay kept."""
        for frame in self.kept:
            if frame.get("type") == frame_type:
                self.kept.remove(frame)
                return frame
        deadline = time.monotonic() + timeout
        while True:
            frame = self._read(deadline, f"a {frame_type!r} frame")
            if frame.get("type") == frame_type:
                return frame
            self.kept.append(frame)

    def pushes(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The ``msg`` of the next ``count`` push frames, in the order they came."""
        return [self.next("push", timeout)["msg"] for _ in range(count)]

    def request(
        self, action: str, data: dict[str, Any] | None = None, timeout: float = 5.0
    ) -> dict[str, Any]:
        """Send one request and return its reply frame; frames before it are kept."""
        self.sequence += 1
        request_id = f"r{self.sequence}"
        self.ws.send(json.dumps({"id": request_id, "action": action, "data": data or {}}))
        deadline = time.monotonic() + timeout
        while True:
            frame = self._read(deadline, f"the reply to {action}")
            if frame.get("type") == "reply" and frame.get("id") == request_id:
                return frame
            self.kept.append(frame)

    def quiet(self, seconds: float) -> list[dict[str, Any]]:
        """Every frame that arrives within ``seconds`` (kept ones first)."""
        frames = list(self.kept)
        self.kept.clear()
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                frames.append(json.loads(self.ws.recv(timeout=left)))
            except TimeoutError:
                break
        return frames


@contextlib.contextmanager
def ws_client(
    node: Node, uid: str | int, sync: bool = True, groups: tuple[str, ...] = ()
) -> Iterator[WsClient]:
    """Connect as ``uid`` (in ``groups``); the first frame must be the hello, which the
    client keeps.

    With ``sync`` it also waits for the reply to a ping, which the server sends only after
    the inbox replay: the replayed pushes are then in ``kept``, and a message published
    afterwards cannot also be part of the replay."""
    with connect(f"{node.ws_url}?token={node.token(uid, groups)}", open_timeout=5) as ws:
        hello = json.loads(ws.recv(timeout=5))
        assert hello["type"] == "hello" and hello["uid"] == str(uid), hello
        client = WsClient(ws, hello)
        if sync:
            assert client.request("ping")["code"] == 200
        yield client


# Servers a test controls ------------------------------------------------------------


class RedisServer:
    """A private ``redis-server`` on a free port, as a subprocess the test can stop."""

    def __init__(self, tmp: Path, *options: str, binary: str = "redis-server") -> None:
        self.tmp = tmp
        self.port = free_port()
        self.options = options  # more redis-server arguments, e.g. "--requirepass", "pw"
        self.binary = binary  # another server build, e.g. one with WAITAOF
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(self.tmp),
                *self.options,
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(self.answers, 10, f"redis-server on port {self.port}")
        return self

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


GOOD_ANSWER = {"uid": 123, "groups": ["author"], "role": "user"}


class UserCentre:
    """A user centre (``auth.mode = "http"``) on 127.0.0.1, in a thread: answers by token
    (:meth:`answer`: "good..." is uid 123, "forbidden" 403, "crash" 500, ...), or with the
    answers :meth:`script` queued for a token; counts calls per token."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.scripted: dict[str, list[tuple[int, bytes, float]]] = {}
        self.gates: dict[str, threading.Event] = {}
        self.lock = threading.Lock()
        centre = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                token = parse_qs(self.rfile.read(length).decode()).get("token", [""])[0]
                status, body = centre.respond(token)
                with contextlib.suppress(ConnectionError):  # PMQ gave up waiting: a timeout
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/check"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def script(self, token: str, *answers: tuple[int, bytes, float]) -> None:
        """Answer the next calls for ``token`` with (status, body, seconds to wait first),
        in order; then as :meth:`answer` says."""
        with self.lock:
            self.scripted.setdefault(token, []).extend(answers)

    def gate(self, token: str) -> threading.Event:
        """Hold every answer for ``token`` until the returned event is set (or 30 s pass)."""
        with self.lock:
            return self.gates.setdefault(token, threading.Event())

    def respond(self, token: str) -> tuple[int, bytes]:
        with self.lock:
            self.calls[token] = self.calls.get(token, 0) + 1
            queued = self.scripted.get(token)
            status, body, delay = queued.pop(0) if queued else (*self.answer(token), 0.0)
            gate = self.gates.get(token)
        if gate is not None:
            gate.wait(30)
        if delay:
            time.sleep(delay)
        return status, body

    @staticmethod
    def answer(token: str) -> tuple[int, bytes]:
        if token.startswith("good"):
            if token.startswith("good-slow"):
                time.sleep(0.2)
            return 200, json.dumps(GOOD_ANSWER).encode()
        if token == "agent":
            return 200, json.dumps({"uid": "9", "role": "agent"}).encode()
        if token == "uid0":
            return 200, b'{"uid": 0}'
        if token == "uid0-string":
            return 200, b'{"uid": "0", "groups": []}'
        if token == "forbidden":
            return 403, b'{"error": "no such token"}'
        if token == "crash":
            return 500, b"<html>Internal Server Error</html>"
        if token == "slow":
            time.sleep(1.0)
            return 200, json.dumps(GOOD_ANSWER).encode()
        return 401, b""

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class TcpProxy:
    """A TCP forwarder from a free local port to ``target``, run on its own event loop in a
    thread. :meth:`cut` closes the listener and every connection through it (clients see
    their connections die and new ones refused); :meth:`restore` listens again on the same
    port. ``upstream_bytes`` counts what clients sent on to the target; setting
    ``upstream_rate`` (bytes per second) slows that direction down, so a test can act while
    a large write is still on the wire."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.upstream_bytes = 0
        self.upstream_rate: float | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.Server | None = None
        self.transports: set[asyncio.BaseTransport] = set()
        self.thread.start()
        self.restore()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def restore(self) -> None:
        async def listen() -> None:
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

        self._run(listen())

    def cut(self) -> None:
        async def close() -> None:
            if self.server is not None:
                self.server.close()
            for transport in list(self.transports):
                transport.abort()
            self.transports.clear()
            if self.server is not None:
                await self.server.wait_closed()
                self.server = None

        self._run(close())

    def close(self) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.transports.add(writer.transport)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            self.transports.discard(writer.transport)
            return
        self.transports.add(up_writer.transport)
        await asyncio.gather(
            self._pipe(reader, up_writer, upstream=True),
            self._pipe(up_reader, writer, upstream=False),
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool
    ) -> None:
        try:
            while data := await reader.read(4096 if upstream and self.upstream_rate else 65536):
                writer.write(data)
                await writer.drain()
                if upstream:
                    self.upstream_bytes += len(data)
                    if self.upstream_rate:
                        await asyncio.sleep(len(data) / self.upstream_rate)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()
            self.transports.discard(writer.transport)


class MysqlDatabase:
    """A throw-away database on the test server (``MYSQL_URL``), created now and dropped by
    :meth:`drop`; pytest.skip if the server does not answer. ``url(port)`` is its
    ``storage.url``, optionally through another port (a :class:`TcpProxy`)."""

    def __init__(self) -> None:
        parts = urlsplit(MYSQL_URL)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 3306
        self.user = parts.username or "root"
        self.password = parts.password or ""
        self.name = f"pmq_test_{secrets.token_hex(6)}"
        try:
            self.conn = pymysql.connect(
                host=self.host, port=self.port, user=self.user, password=self.password,
                connect_timeout=2, autocommit=True,
            )
        except pymysql.MySQLError as exc:
            pytest.skip(f"MariaDB not reachable at {self.host}:{self.port}: {exc}")
        self.query(f"CREATE DATABASE `{self.name}` CHARACTER SET utf8mb4")
        self.query(f"USE `{self.name}`")

    def url(self, port: int | None = None) -> str:
        auth = self.user + (f":{self.password}" if self.password else "")
        return f"mysql://{auth}@{self.host}:{port or self.port}/{self.name}"

    def query(self, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
        """Run one statement in autocommit, so each read sees every committed write."""
        with self.conn.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())

    def message_ids(self, shards: int) -> list[int]:
        """Every stored message id over ``pmq_msg_0..shards-1`` (repeats kept); [] while the
        tables do not exist yet."""
        try:
            return [
                int(row[0])
                for n in range(shards)
                for row in self.query(f"SELECT id FROM pmq_msg_{n}")
            ]
        except pymysql.err.ProgrammingError:
            return []

    def drop(self) -> None:
        with contextlib.suppress(pymysql.MySQLError):
            self.query(f"DROP DATABASE IF EXISTS `{self.name}`")
        self.conn.close()


def counting_pipelines(client: Any) -> list[int]:
    """Count the pipelines made on ``client`` from now on (one round trip each)."""
    made: list[int] = []
    make = client.pipeline

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        made.append(1)
        return make(*args, **kwargs)

    client.pipeline = pipeline
    return made


def user_state(node: Node, uid: str | int) -> dict[str, Any]:
    """The user as the site's API reads it (``GET /api/v1/users/{uid}``): online,
    connections, ..."""
    site = Ingest(node)
    try:
        status, reply = site.call("GET", f"/api/v1/users/{uid}")
    finally:
        site.close()
    assert status == 200, reply
    return reply["data"]  # type: ignore[no-any-return]


def connections_of(node: Node, uid: str | int) -> int:
    """The user's connections in the registry, as the site's API reads them."""
    return int(user_state(node, uid)["connections"])
