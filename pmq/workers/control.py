"""The master's control socket: pmqctl's way to ask for status, reload and restart.

A Unix stream socket; each client sends one JSON line ``{"cmd": ...}`` and gets one JSON
line back. ``status`` is answered at once; ``reload`` and ``restart`` are answered when the
master calls :meth:`ControlServer.finish` for them, so pmqctl can report what happened.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Protocol

import orjson

from pmq.workers.channel import LineReader

log = logging.getLogger(__name__)


class Supervisor(Protocol):
    def status(self) -> dict[str, Any]: ...
    def reload(self) -> None: ...
    def rolling_restart(self) -> None: ...


class ControlServer:
    def __init__(self, path: str, master: Supervisor) -> None:
        self.path = path
        self.master = master
        self.listener: socket.socket | None = None
        self.clients: dict[int, tuple[socket.socket, LineReader]] = {}
        self.waiting: dict[str, list[socket.socket]] = {"reload": [], "restart": []}

    def open(self) -> None:
        try:
            os.unlink(self.path)  # stale: start() checked that no master is alive
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(self.path)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        sock.setblocking(False)
        self.listener = sock

    def fds(self) -> list[int]:
        if self.listener is None:
            return []
        return [self.listener.fileno(), *self.clients]

    def handle(self, fd: int) -> None:
        if self.listener is not None and fd == self.listener.fileno():
            try:
                client, _ = self.listener.accept()
            except BlockingIOError:
                return
            client.setblocking(False)
            self.clients[client.fileno()] = (client, LineReader())
            return
        client, reader = self.clients[fd]
        try:
            data = client.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.drop(client)
            return
        for request in reader.feed(data):
            self.dispatch(client, request)

    def dispatch(self, client: socket.socket, request: dict[str, Any]) -> None:
        command = request.get("cmd")
        if command == "status":
            self.reply(client, {"ok": True, **self.master.status()})
        elif command == "reload":
            self.waiting["reload"].append(client)
            self.master.reload()
        elif command == "restart":
            self.waiting["restart"].append(client)
            self.master.rolling_restart()
        else:
            self.reply(client, {"ok": False, "error": f"unknown command {command!r}"})

    def finish(self, command: str, result: dict[str, Any]) -> None:
        """Answer every client waiting for ``command`` with ``result``."""
        waiting, self.waiting[command] = self.waiting[command], []
        for client in waiting:
            self.reply(client, result)

    def reply(self, client: socket.socket, value: dict[str, Any]) -> None:
        try:
            client.setblocking(True)
            client.settimeout(1.0)
            client.sendall(orjson.dumps(value) + b"\n")
        except OSError as exc:
            log.warning("control reply failed: %s", exc)
        self.drop(client)

    def drop(self, client: socket.socket) -> None:
        self.clients.pop(client.fileno(), None)
        for waiting in self.waiting.values():
            if client in waiting:
                waiting.remove(client)
        client.close()

    def close(self) -> None:
        """Stop listening and hang up on every client (idempotent)."""
        for client, _ in list(self.clients.values()):
            self.drop(client)
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def close_in_child(self) -> None:
        """In a forked worker: close the descriptors without touching the socket file."""
        for client, _ in self.clients.values():
            client.close()
        if self.listener is not None:
            self.listener.close()
        self.clients.clear()
        self.listener = None
