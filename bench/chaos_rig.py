"""The chaos suite's rig: everything the harness owns and breaks on purpose.

A private ``redis-server`` (AOF on, ``appendfsync everysec``, ``noeviction``) in its own
directory; TCP proxies in front of Redis and MariaDB that can cut every connection and
refuse new ones for a while; a throw-away MariaDB database; and a PMQ node run as a real
process tree (``python -m pmq.ctl start``) that the harness restarts after its master dies,
as systemd would. Only 127.0.0.1 is used; every process started here is stopped by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pymysql
import redis

from bench.common import node_processes
from bench.run_node import free_port, redis_server, toml_value
from pmq.errors import PMQError
from pmq.workers.channel import request


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` every 50 ms until it is truthy; TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


class RedisServer:
    """A redis-server of the harness on a free port, persisting with AOF everysec in
    ``directory``. :meth:`kill` is kill -9; :meth:`start` again restarts it from its AOF;
    :meth:`wipe` deletes its files, so the next start comes up empty."""

    def __init__(self, directory: Path, binary: str = "redis-server") -> None:
        self.directory = directory
        self.binary = binary
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = redis_server(
            self.port, self.directory,
            "--appendonly", "yes", "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction", "--logfile", str(self.directory / "redis.log"),
            binary=self.binary, wait=30,  # a restart loads the AOF first
        )

    def version(self) -> str:
        client = redis.Redis(port=self.port, socket_timeout=5)
        try:
            info = client.info("server")
        finally:
            client.close()
        if "valkey_version" in info:
            return f"valkey {info['valkey_version']}"
        return f"redis {info['redis_version']}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def wipe(self) -> None:
        """Delete the AOF and any snapshot (call while stopped)."""
        for path in self.directory.iterdir():
            if path.name.startswith(("appendonly", "dump")):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class Proxy:
    """A TCP forwarder from a free local port to ``target_port``, on its own event loop in a
    thread. :meth:`cut` aborts every connection through it, and until :meth:`restore` new
    ones are accepted and reset at once: the listener stays bound, so no other socket can
    take its port in the meantime."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.open = True
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.transports: set[asyncio.WriteTransport] = set()
        self.thread.start()
        self.server: asyncio.Server = self._run(
            asyncio.start_server(self._serve, "127.0.0.1", self.port)
        )

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def restore(self) -> None:
        self.open = True

    def cut(self) -> None:
        async def abort_all() -> None:
            self.open = False
            for transport in list(self.transports):
                transport.abort()
            self.transports.clear()

        self._run(abort_all())

    def close(self) -> None:
        self.cut()

        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        self._run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.transport.abort()
            return
        self.transports.add(writer.transport)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            self.transports.discard(writer.transport)
            return
        if not self.open:  # cut while connecting
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self.transports.add(up_writer.transport)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()
            self.transports.discard(writer.transport)


class MysqlDatabase:
    """The database ``pmq_chaos_<random>`` on the MariaDB at host:port, created now and
    dropped by :meth:`drop`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 3306, user: str = "root") -> None:
        self.host, self.port, self.user = host, port, user
        self.name = f"pmq_chaos_{secrets.token_hex(5)}"
        self.conn = pymysql.connect(host=host, port=port, user=user, autocommit=True)
        self.query(f"CREATE DATABASE `{self.name}` CHARACTER SET utf8mb4")
        self.query(f"USE `{self.name}`")

    def url(self, port: int) -> str:
        return f"mysql://{self.user}@{self.host}:{port}/{self.name}"

    def query(self, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())

    def stored(self, shards: int, lo: int, hi: int) -> list[tuple[int, int, str, int]]:
        """(id, uid, body, shard) of every stored message to a uid in [lo, hi), one row
        per row found (a message stored twice shows twice)."""
        rows: list[tuple[int, int, str, int]] = []
        for n in range(shards):
            for mid, uid, body in self.query(
                f"SELECT id, uid, body FROM pmq_msg_{n} WHERE uid >= %s AND uid < %s", (lo, hi)
            ):
                rows.append((int(mid), int(uid), str(body), n))
        return rows

    def count(self, shards: int, lo: int, hi: int) -> int:
        """How many rows of the message tables are for a uid in [lo, hi)."""
        return sum(
            int(self.query(
                f"SELECT COUNT(*) FROM pmq_msg_{n} WHERE uid >= %s AND uid < %s", (lo, hi)
            )[0][0])
            for n in range(shards)
        )

    def drop(self) -> None:
        with contextlib.suppress(pymysql.MySQLError):
            self.query(f"DROP DATABASE IF EXISTS `{self.name}`")
        self.conn.close()


class Node:
    """One PMQ node as a real process tree, its config written into ``directory``.

    ``extra`` sections are merged over the harness's settings (e.g. ``{"redis":
    {"durability": "aof"}}``), so a key is passed only when asked for."""

    def __init__(
        self,
        directory: Path,
        redis_url: str,
        storage_url: str,
        workers: int,
        task_workers: int,
        shards: int,
        extra: dict[str, dict[str, Any]],
    ) -> None:
        self.directory = directory
        self.name = "chaos" + secrets.token_hex(3)
        self.port = free_port()
        self.ingest_port = free_port()
        self.secret = secrets.token_urlsafe(32)
        self.shards = shards
        settings: dict[str, dict[str, Any]] = {
            "server": {
                "host": "127.0.0.1", "port": self.port, "workers": workers,
                "task_workers": task_workers, "node": self.name,
                "pid_file": str(directory / f"{self.name}.pid"),
                "graceful_timeout": 5, "worker_timeout": 10,
            },
            "ingest": {"host": "127.0.0.1", "port": self.ingest_port},
            "redis": {"url": redis_url, "prefix": f"pmqchaos:{secrets.token_hex(3)}:"},
            "storage": {"url": storage_url, "shards": shards},
            "auth": {"jwt_secret": self.secret},
            "heartbeat": {"interval": 5, "timeout": 15},
            "log": {"level": "warning"},
        }
        for section, values in extra.items():
            settings.setdefault(section, {}).update(values)
        self.settings = settings
        self.config = directory / f"{self.name}.toml"
        self.config.write_text(
            "\n".join(
                f"[{section}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())
                for section, values in settings.items()
            )
        )
        self.log_path = directory / f"{self.name}.log"
        self.control = str(directory / f"{self.name}.sock")
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("PMQ_")}

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pmq.ctl", *args, "-c", str(self.config)],
            capture_output=True, text=True, env=self.env(), cwd=self.directory, timeout=120,
        )

    def start(self, timeout: float = 60) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pmq.ctl", "start", "-c", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env(), cwd=self.directory,
            )
        wait_until(self.ready, timeout, f"node {self.name} to be ready")

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"node exited with {self.proc.returncode}; log {self.log_path}")
        status = self.status()
        return bool(status and status.get("ready"))

    def status(self) -> dict[str, Any] | None:
        try:
            return request(self.control, "status", timeout=5)
        except (PMQError, OSError):
            return None

    def worker_pids(self, kind: str) -> list[int]:
        status = self.status() or {"workers": []}
        return [
            int(w["pid"]) for w in status["workers"] if w["kind"] == kind and not w["retiring"]
        ]

    def master_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def restart_after_crash(self, timeout: float = 60) -> None:
        """What systemd does after the master died: reap it, start the node again (the new
        master stops the orphaned workers it finds)."""
        assert self.proc is not None
        self.proc.wait(30)
        self.start(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for proc in node_processes(self.name):
            with contextlib.suppress(psutil.Error):
                proc.kill()

    def log_errors(self) -> list[str]:
        """Lines of the node's log that name an error or a traceback."""
        if not self.log_path.exists():
            return []
        text = self.log_path.read_text(errors="replace")
        return [
            line for line in text.splitlines()
            if "ERROR" in line or "Traceback" in line or "CRITICAL" in line
        ]
