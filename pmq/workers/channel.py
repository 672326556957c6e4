"""Line-delimited JSON over a pipe or a Unix socket: how workers and pmqctl talk to the master.

Workers write status events (``ready``, ``heartbeat``, ``reload``) to a pipe the master reads;
pmqctl sends one request line to the master's control socket and reads one reply line.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from typing import Any

import orjson

from pmq.errors import ControlError, NotRunning

MAX_LINE = 1 << 20


def send_event(fd: int, **event: Any) -> bool:
    """Write one event line without blocking; False when the pipe is full or gone."""
    try:
        os.write(fd, orjson.dumps(event) + b"\n")
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EPIPE, errno.EBADF):
            return False
        raise
    return True


class LineReader:
    """Accumulates bytes and yields complete JSON lines as dicts (bad lines are skipped)."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> Iterator[dict[str, Any]]:
        self.buffer += data
        if len(self.buffer) > MAX_LINE and b"\n" not in self.buffer:
            self.buffer = b""
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(value, dict):
                yield value


def request(path: str, command: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
    """Send one command to the master's control socket and return its reply.

    Raises NotRunning when nothing listens there, ControlError when the reply is missing
    or says ``ok: false``.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunning(f"no master listens on {path}") from None
        sock.sendall(orjson.dumps({"cmd": command, **args}) + b"\n")
        reader = LineReader()
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                raise ControlError(f"{command}: no answer within {timeout:g}s") from None
            if not data:
                raise ControlError(f"{command}: the master closed the connection")
            for reply in reader.feed(data):
                if not reply.get("ok"):
                    raise ControlError(str(reply.get("error", "failed")))
                return reply
    finally:
        sock.close()
