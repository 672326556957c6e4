"""A site's webhook endpoint (docs/webhooks.md) for the tests and the chaos suite: an
http.server in a thread that records every POST, checks its signature, counts events it got
again (by id), and can be told to fail or to hang."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bench.chaos_rig import wait_until


class Receiver:
    """Records the events of each POST it took (``events``, in arrival order) and counts
    the bodies whose signature was wrong (``bad_signatures``) and the events taken again
    (``duplicates``: an id taken before, at-least-once delivery); ``status`` is what it answers
    (set 500 to fail), ``gate`` when cleared holds every answer until set again."""

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()
        self.events: list[dict[str, Any]] = []
        self.posts = 0  # answered
        self.arrived = 0  # read, answered or not yet
        self.bad_signatures = 0
        self.duplicates = 0
        self.ids: set[str] = set()
        self.status = 200
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.arrived += 1
                receiver.gate.wait(60)
                status = receiver.take(body, self.headers.get("X-PMQ-Signature", ""))
                with contextlib.suppress(ConnectionError):
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def take(self, body: bytes, signature: str) -> int:
        expected = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        with self.lock:
            self.posts += 1
            if not hmac.compare_digest(signature, expected):
                self.bad_signatures += 1
                return 401
            if self.status == 200:
                events = json.loads(body)["events"]
                self.duplicates += sum(1 for e in events if e["id"] in self.ids)
                self.ids.update(e["id"] for e in events)
                self.events += events
            return self.status

    def of(self, kind: str, **data: Any) -> list[dict[str, Any]]:
        """The events of type ``kind`` taken so far whose data holds ``data``."""
        with self.lock:
            return [
                e for e in self.events
                if e["type"] == kind and all(e["data"].get(k) == v for k, v in data.items())
            ]

    def wait(self, condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
        return wait_until(condition, timeout, what)

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()
