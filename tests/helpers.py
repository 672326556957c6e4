"""Test helpers: free ports, deadlines, and real PMQ nodes as subprocesses.

A :class:`Node` writes its own config (free ports, a unique node name, a private Redis key
prefix, SQLite in tmp_path), starts ``python -m pmq.ctl start`` for real, and waits on the
master's control socket. Everything it started is stopped and its Redis keys removed at
teardown, so runs never collide.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from pmq.auth import mint_token
from pmq.errors import PMQError
from pmq.workers.channel import request

REDIS_URL = os.environ.get("PMQ_TEST_REDIS", "redis://127.0.0.1:6379/0")
MYSQL_URL = os.environ.get("PMQ_TEST_MYSQL", "mysql://root@127.0.0.1:3306")
SECRET = "test-secret-" + "x" * 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns a truthy value; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


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
