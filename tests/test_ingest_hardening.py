"""Hostile input against a real node: the ingest HTTP server (Transfer-Encoding, slow
requests, too many connections), the browser handshake (server.allowed_origins) and the
client rate limit counting every frame. HTTP goes over raw sockets, byte by byte where it
matters; the HTTP server's own tests (tests/test_http.py) cover the same rules in detail."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from pmq import config as configuration
from pmq import configload
from pmq.errors import ConfigError
from tests.helpers import Node, wait_for, ws_client

SITE = "https://site.example"
MESSAGE = json.dumps({"to": 7, "kind": "notice", "body": {"n": 1}}).encode()


class Reply:
    """One HTTP response read off a raw socket."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


class RawHttp:
    """A raw TCP connection to the ingest port: bytes out, responses in, as they come."""

    def __init__(self, node: Node) -> None:
        self.sock = socket.create_connection(("127.0.0.1", node.ingest_port), timeout=10)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answered(self) -> bool:
        """True as soon as the server has sent anything (or closed); never blocks."""
        if self.buf:
            return True
        self.sock.setblocking(False)
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True
        finally:
            self.sock.setblocking(True)
        self.buf += data
        return True

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed before a whole response: {self.buf!r}")
        self.buf += data

    def response(self) -> Reply:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return Reply(int(status_line.split()[1]), headers, body)

    def closed(self) -> bool:
        """True once the server has closed (EOF or reset), with nothing more sent."""
        try:
            rest = self.buf + self.sock.recv(65536)
            while chunk := self.sock.recv(65536):
                rest += chunk
        except ConnectionResetError:
            return True
        return rest == b""

    def close(self) -> None:
        self.sock.close()


def request(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: pmq", f"Content-Length: {len(body)}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@contextlib.contextmanager
def raw_http(node: Node) -> Iterator[RawHttp]:
    conn = RawHttp(node)
    try:
        yield conn
    finally:
        conn.close()


def worker_stat(node: Node, name: str) -> int:
    return sum(int(w.get(name, 0)) for w in node.workers())


# Ingest HTTP ------------------------------------------------------------------------------


@pytest.mark.parametrize("coding", ["gzip, chunked", "identity", "x-unknown", "chunked, gzip"])
def test_transfer_encoding_other_than_chunked_is_501(
    make_node: Callable[..., Node], coding: str
) -> None:
    node = make_node().start()
    head = "POST /api/v1/messages HTTP/1.1\r\nHost: pmq\r\nTransfer-Encoding: {}\r\n\r\n"
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(MESSAGE), MESSAGE)
    with raw_http(node) as conn:
        conn.send(head.format(coding).encode() + body)
        reply = conn.response()
        assert (reply.status, reply.headers["connection"]) == (501, "close")
        assert reply.json()["code"] == 501
        assert conn.closed()
    with raw_http(node) as conn:  # chunked itself is served
        conn.send(head.format("chunked").encode() + body)
        assert conn.response().status == 202


def test_slow_client_is_answered_408_after_request_timeout(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(ingest={"request_timeout": 2.0}).start()
    slow = request("POST", "/api/v1/messages", MESSAGE, Content_Type="application/json")
    sent = 0
    with raw_http(node) as conn:
        while not conn.answered():  # a byte a second, as a slowloris sends
            assert sent < len(slow), "the whole request went out unanswered"
            conn.send(slow[sent : sent + 1])
            sent += 1
            time.sleep(1)
        reply = conn.response()
        assert (reply.status, reply.headers["connection"]) == (408, "close")
        assert reply.json()["code"] == 408
        assert conn.closed()
    assert sent < len(slow)
    assert wait_for(lambda: worker_stat(node, "ingest_timed_out") == 1, 10, "the 408 counted")
    with raw_http(node) as conn:  # a prompt client on a fresh connection is served
        conn.send(request("GET", "/healthz"))
        assert conn.response().status == 200


def test_keep_alive_and_pipelining_outlive_request_timeout(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(ingest={"request_timeout": 1.0}).start()
    publish = request("POST", "/api/v1/messages", MESSAGE, Content_Type="application/json")
    with raw_http(node) as conn:
        conn.send(publish + request("GET", "/api/v1/users/7") + publish)  # in one write
        statuses = [conn.response().status for _ in range(3)]
        assert statuses == [202, 200, 202]
        time.sleep(2.5)  # idle between requests longer than request_timeout: still open
        conn.send(request("GET", "/api/v1/users/7"))
        reply = conn.response()
        assert (reply.status, reply.headers["connection"]) == (200, "keep-alive")
        assert reply.json()["data"]["unread"]["total"] >= 0


def test_connection_over_max_connections_is_answered_503(
    make_node: Callable[..., Node],
) -> None:
    # One socket worker, so every connection counts against the same limit.
    node = make_node(server={"workers": 1}, ingest={"max_connections": 4}).start()
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(raw_http(node)) for _ in range(4)]
        for conn in held:  # each one served, so each one is counted
            conn.send(request("GET", "/healthz"))
            assert conn.response().status == 200
        with raw_http(node) as extra:
            reply = extra.response()  # answered at once, before any request
            assert (reply.status, reply.headers["connection"]) == (503, "close")
            assert reply.headers["retry-after"] == "1"
            assert reply.json()["code"] == 503
            assert extra.closed()
        held[0].send(request("GET", "/healthz"))  # the served ones carry on
        assert held[0].response().status == 200
        held.pop().close()

        def served_again() -> bool:
            with raw_http(node) as conn:
                conn.send(request("GET", "/healthz"))
                try:
                    return conn.response().status == 200
                except ConnectionError:
                    return False

        wait_for(served_again, 10, "a freed slot to serve a new connection")
    wait_for(lambda: worker_stat(node, "ingest_refused") >= 1, 10, "the refusal counted")


# Browsers ---------------------------------------------------------------------------------


def handshake_status(node: Node, uid: int, origin: str | None, token: str | None = None) -> int:
    """101 when the WebSocket opens (and says hello), else the HTTP status of the refusal."""
    url = f"{node.ws_url}?token={token if token is not None else node.token(uid)}"
    try:
        with connect(url, origin=origin, open_timeout=5) as ws:  # type: ignore[arg-type]
            assert json.loads(ws.recv(timeout=5))["type"] == "hello"
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


def test_allowed_origins_refuse_other_sites_with_403(make_node: Callable[..., Node]) -> None:
    node = make_node(server={"allowed_origins": [SITE, "http://localhost:8080"]}).start()
    assert handshake_status(node, 1, SITE) == 101
    assert handshake_status(node, 1, "http://localhost:8080") == 101
    assert handshake_status(node, 1, None) == 101  # native apps send no Origin
    assert handshake_status(node, 1, "https://evil.example") == 403
    assert handshake_status(node, 1, "null") == 403  # sandboxed pages, file://
    assert handshake_status(node, 1, SITE + ".evil.example") == 403
    # Refused before the token is looked at: a foreign page learns nothing of its tokens.
    assert handshake_status(node, 1, "https://evil.example", token="bad") == 403
    assert handshake_status(node, 1, SITE, token="bad") == 401


def test_without_allowed_origins_any_origin_passes(make_node: Callable[..., Node]) -> None:
    node = make_node().start()
    assert handshake_status(node, 1, "https://evil.example") == 101


# The client rate limit ----------------------------------------------------------------------


def test_rate_limit_counts_frames_that_are_not_json(make_node: Callable[..., Node]) -> None:
    node = make_node(server={"rate": 5}).start()
    with ws_client(node, 9) as client:
        for _ in range(50):
            client.ws.send("this is not JSON")
        replies = [client.next("reply") for _ in range(50)]
        codes = [r["code"] for r in replies]
        assert set(codes) == {400, 429}, codes
        assert all(r["id"] is None for r in replies)
        limited = next(r for r in replies if r["code"] == 429)
        assert limited["msg"] == "rate limit: slow down"
        # The garbage drew on the same bucket as requests: a request right after waits.
        wait_for(lambda: client.request("ping")["code"] == 200, 5, "the bucket to refill")


# Configuration ----------------------------------------------------------------------------


def load_with(tmp_path: Any, text: str) -> configuration.Config:
    path = tmp_path / "pmq.toml"
    path.write_text(text)
    return configload.load(str(path), environ={})


def test_config_keys_and_their_checks(tmp_path: Any) -> None:
    defaults = load_with(tmp_path, "")
    assert defaults.server.allowed_origins == []
    assert (defaults.ingest.request_timeout, defaults.ingest.max_connections) == (10.0, 1024)
    loaded = load_with(tmp_path, f'[server]\nallowed_origins = ["{SITE}", "http://a.b:81"]\n')
    assert loaded.server.allowed_origins == [SITE, "http://a.b:81"]
    for bad, key in (
        ('[server]\nallowed_origins = "https://a.b"\n', "server.allowed_origins"),
        ('[server]\nallowed_origins = ["https://a.b/"]\n', "server.allowed_origins"),
        ('[server]\nallowed_origins = ["a.b"]\n', "server.allowed_origins"),
        ("[ingest]\nrequest_timeout = 0\n", "ingest.request_timeout"),
        ("[ingest]\nmax_connections = 0\n", "ingest.max_connections"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_with(tmp_path, bad)
    (tmp_path / "pmq.toml").write_text("")
    environ = {"PMQ_SERVER_ALLOWED_ORIGINS": f'["{SITE}"]'}
    from_env = configload.load(str(tmp_path / "pmq.toml"), environ)
    assert from_env.server.allowed_origins == [SITE]
