"""End-to-end: the client WebSocket gateway of a real node (docs/protocol.md, "Client
WebSocket API").

Every test starts a real node (master + 2 socket workers) and talks to it as a browser would
(websockets' sync client, or a raw socket where a misbehaving client is needed) and as the
main site would (a fresh HTTP connection per ingest call, so SO_REUSEPORT spreads the calls
over both workers).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import itertools
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from pmq.domain.auth import CLOCK_LEEWAY
from pmq.domain.jwtauth import mint_token
from pmq.reactor.gateway import ACCEPT_BACKLOG
from pmq.redis.keys import Keys
from tests.helpers import SECRET, Node, connections_of, user_state, wait_for
from tests.test_fuzz_kit import RawWebSocket

pytestmark = pytest.mark.e2e

PUSH_FIELDS = {"id", "kind", "from", "to", "body", "ts"}


# Clients ------------------------------------------------------------------------------


def next_frame(ws: ClientConnection, frame_type: str, timeout: float = 5.0) -> dict[str, Any]:
    """The next frame of ``frame_type``, skipping others (e.g. live ``unread`` updates)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"no {frame_type!r} frame within {timeout}s")
        try:
            frame = json.loads(ws.recv(timeout=remaining))
        except TimeoutError:
            pytest.fail(f"no {frame_type!r} frame within {timeout}s")
        if frame.get("type") == frame_type:
            return frame  # type: ignore[no-any-return]


def ping(ws: ClientConnection, request_id: str = "p1", timeout: float = 5.0) -> dict[str, Any]:
    ws.send(json.dumps({"id": request_id, "action": "ping", "data": {}}))
    reply = next_frame(ws, "reply", timeout)
    assert reply["id"] == request_id
    return reply


def open_client(
    stack: contextlib.ExitStack, node: Node, uid: str, token: str | None = None
) -> tuple[ClientConnection, str]:
    """Connect as ``uid`` (closed when ``stack`` unwinds); returns the socket and its conn id."""
    url = f"{node.ws_url}?token={token or node.token(uid)}"
    ws = stack.enter_context(connect(url, open_timeout=5, close_timeout=2))
    hello = next_frame(ws, "hello")
    assert hello["uid"] == uid
    return ws, hello["conn_id"]


def refused_status(url: str, **kwargs: Any) -> int:
    """The HTTP status a handshake to ``url`` is refused with (fails if it is accepted)."""
    with pytest.raises(InvalidStatus) as refused, connect(url, open_timeout=5, **kwargs):
        pass
    return refused.value.response.status_code


def worker_of(redis_client: Any, node: Node, uid: str, conn_id: str) -> str:
    """The worker id the registry holds for one connection."""
    wid = redis_client.hget(Keys(node.prefix).user_conns(uid), conn_id)
    assert wid, f"connection {conn_id} of {uid} is not in the registry"
    return str(wid)


def spread_over_workers(
    stack: contextlib.ExitStack,
    node: Node,
    redis_client: Any,
    uids: Iterator[str],
    limit: int = 40,
) -> dict[str, list[tuple[str, ClientConnection]]]:
    """Open connections (one per uid taken from ``uids``) until both socket workers hold one;
    returns worker id -> [(uid, socket)]."""
    held: dict[str, list[tuple[str, ClientConnection]]] = {}
    for _ in range(limit):
        uid = next(uids)
        ws, conn_id = open_client(stack, node, uid)
        held.setdefault(worker_of(redis_client, node, uid, conn_id), []).append((uid, ws))
        if len(held) == 2:
            return held
    pytest.fail(f"{limit} connections all landed on one worker")


class RawClient:
    """A WebSocket client by hand: it completes the handshake and then reads only when told,
    so it neither drains its receive buffer nor answers pings."""

    def __init__(self, node: Node, token: str, rcvbuf: int = 4096) -> None:
        self.sock = socket.socket()
        # Before connect, so the window the kernel advertises stays small.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(5)
        self.sock.connect(("127.0.0.1", node.port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /ws?token={token} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{node.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1024)
            assert chunk, f"connection closed during the handshake: {head!r}"
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head

    def read_until_closed(self, timeout: float) -> None:
        """Read (and drop) until the server's end is gone: EOF or a reset."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                if not self.sock.recv(65536):
                    return
            except ConnectionResetError:
                return
            except TimeoutError:
                break
        pytest.fail(f"the server kept the connection open for {timeout}s")

    def close(self) -> None:
        self.sock.close()


# The ingest API ----------------------------------------------------------------------


def api(node: Node, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    """One ingest call on a fresh connection (so SO_REUSEPORT picks a worker each time)."""
    conn = http.client.HTTPConnection("127.0.0.1", node.ingest_port, timeout=10)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {} if payload is None else {"Content-Type": "application/json"}
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def publish(node: Node, uid: str, body: dict[str, Any]) -> dict[str, Any]:
    status, answer = api(
        node, "POST", "/api/v1/messages", {"to": uid, "kind": "notice", "body": body}
    )
    assert status == 202 and answer["code"] == 202, answer
    return answer["data"]  # type: ignore[no-any-return]


def assert_push(frame: dict[str, Any], message_id: str, uid: str, body: dict[str, Any]) -> None:
    msg = frame["msg"]
    assert set(msg) == PUSH_FIELDS
    assert msg["id"] == message_id and msg["kind"] == "notice"
    assert msg["from"] is None and msg["to"] == uid and msg["body"] == body
    assert isinstance(msg["ts"], int) and msg["ts"] > 0


# 1. Handshake ------------------------------------------------------------------------


def test_bad_tokens_are_refused_401_and_leave_nothing(make_node, redis_client):
    node = make_node().start()
    uid = "101"
    tokens = {
        "bad signature": mint_token("another-secret-" + "y" * 32, uid),
        # Past the clock leeway the node grants, so it is expired for sure.
        "expired": mint_token(SECRET, uid, ttl=-(CLOCK_LEEWAY + 10)),
        "garbage": "not-a-token",
    }
    assert refused_status(node.ws_url) == 401, "missing token"
    for what, token in tokens.items():
        assert refused_status(f"{node.ws_url}?token={token}") == 401, what
        bearer = {"Authorization": f"Bearer {token}"}
        assert refused_status(node.ws_url, additional_headers=bearer) == 401, what
    state = user_state(node, uid)
    assert state["online"] is False and state["connections"] == 0
    assert not redis_client.exists(Keys(node.prefix).user_conns(uid))

    bearer = {"Authorization": f"Bearer {node.token(uid)}"}
    with connect(node.ws_url, additional_headers=bearer, open_timeout=5) as ws:
        assert next_frame(ws, "hello")["uid"] == uid
        assert ping(ws)["code"] == 200
        assert user_state(node, uid)["connections"] == 1

    other_path = f"ws://127.0.0.1:{node.port}/other?token={node.token(uid)}"
    assert refused_status(other_path) == 404


def raw_answer(node: Node, head: bytes) -> bytes:
    """What the client port answers ``head`` with, up to its closing the connection."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_request_head_too_large_or_malformed_is_refused(make_node):
    node = make_node().start()
    cookie = b"Cookie: " + b"x" * (20 * 1024) + b"\r\n"  # past the 16 KiB a head may take
    big = b"GET /ws?token=t HTTP/1.1\r\nHost: x\r\n" + cookie + b"\r\n"
    assert raw_answer(node, big).startswith(b"HTTP/1.1 431 ")
    assert raw_answer(node, b"GET /ws HTTP/1.1\r\nHost x\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw_answer(node, b"POST /cs/chat.html HTTP/1.1\r\nHost: x\r\n\r\n").startswith(
        b"HTTP/1.1 404 "
    )


def test_the_client_port_queues_a_storm_of_connects(make_node):
    """Every client of a restarted node comes back at once: each worker's accept queue holds
    ACCEPT_BACKLOG of them (asyncio's default of 100 drops the rest's SYNs, retried by TCP
    only after 1 s, 3 s, 7 s). ``ss`` shows a listening socket's queue size as Send-Q."""
    node = make_node().start()
    shown = subprocess.run(
        ["ss", "-Hltn", f"sport = :{node.port}"], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    queues = {int(line.split()[2]) for line in shown if line.strip()}
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert queues == {min(ACCEPT_BACKLOG, somaxconn)}, shown


# 2. Delivery across workers ----------------------------------------------------------


def socket_worker_connections(node: Node) -> dict[int, int]:
    status = node.status() or {"workers": []}
    return {
        w["pid"]: w.get("connections", 0)
        for w in status["workers"]
        if w["kind"] == "socket" and not w["retiring"]
    }


def test_publish_reaches_users_on_both_workers(make_node, redis_client):
    node = make_node().start()
    clients: dict[str, ClientConnection] = {}
    with contextlib.ExitStack() as stack:
        for n in range(1, 41):
            uid = str(200 + n)
            clients[uid], _ = open_client(stack, node, uid)

            def counted(opened: int = len(clients)) -> dict[int, int] | None:
                counts = socket_worker_connections(node)  # from each worker's 1 s heartbeat
                return counts if sum(counts.values()) == opened else None

            counts = wait_for(counted, 5, "the workers' heartbeats to count the connections")
            if len(counts) == 2 and all(counts.values()):
                break
        else:
            pytest.fail("40 connections all landed on one worker")
        keys = Keys(node.prefix)
        holders = {
            int(next(iter(redis_client.hvals(keys.user_conns(uid)))).rsplit(":", 1)[1])
            for uid in clients
        }
        assert holders == set(counts), "the registry and the workers disagree"

        # A fresh HTTP connection per publish: about half land on the worker that does not
        # hold the user and go through its pub/sub channel.
        for round_ in range(8):
            for uid, ws in clients.items():
                body = {"round": round_, "text": f"hello {uid}"}
                data = publish(node, uid, body)
                assert data["online"] == 1 and len(data["ids"]) == 1
                assert_push(next_frame(ws, "push"), data["ids"][0], uid, body)


def test_every_device_of_a_user_gets_the_push(make_node, redis_client):
    node = make_node().start()
    uid = "300"
    with contextlib.ExitStack() as stack:
        held = spread_over_workers(stack, node, redis_client, itertools.repeat(uid))
        devices = [conns[0][1] for conns in held.values()]  # one on each worker
        for _, ws in itertools.chain(*(conns[1:] for conns in held.values())):
            ws.close()
        wait_for(lambda: connections_of(node, uid) == 2, 5, "two devices in the registry")
        for n in range(4):
            body = {"n": n}
            data = publish(node, uid, body)
            assert data["online"] == 2
            for ws in devices:
                assert_push(next_frame(ws, "push"), data["ids"][0], uid, body)


# 3. Frames ---------------------------------------------------------------------------


def test_bad_frames_get_replies_and_the_connection_stays(make_node):
    node = make_node().start()
    with contextlib.ExitStack() as stack:
        ws, _ = open_client(stack, node, "400")
        ws.send("{this is not json")
        reply = next_frame(ws, "reply")
        assert reply["code"] == 400 and reply["id"] is None and reply["msg"]
        assert ping(ws, "after-bad-json")["code"] == 200

        ws.send(json.dumps({"id": "u1", "action": "no.such_action", "data": {}}))
        reply = next_frame(ws, "reply")
        assert reply["code"] == 404 and reply["id"] == "u1" and "no.such_action" in reply["msg"]
        for name in ("Ping", "action1", "foo-bar", "x" * 200):  # any unknown name: 404
            ws.send(json.dumps({"id": "u2", "action": name, "data": {}}))
            reply = next_frame(ws, "reply")
            assert reply["code"] == 404 and reply["msg"] == f"unknown action {name[:64]!r}"
        for action in (None, "", 7):
            ws.send(json.dumps({"id": "u3", "action": action, "data": {}}))
            reply = next_frame(ws, "reply")
            assert reply["code"] == 400 and reply["msg"] == "action: missing or not a string"
        assert ping(ws, "after-unknown")["code"] == 200


# 4. The user centre ------------------------------------------------------------------


class UserCentre:
    """A stand-in for the site's token check: uid 5 for the good tokens, 403 for others."""

    def __init__(self) -> None:
        self.good: set[str] = set()
        self.calls = 0
        self.lock = threading.Lock()
        centre = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                token = form.get("token", [""])[0]
                with centre.lock:
                    centre.calls += 1
                if token in centre.good:
                    status, answer = 200, {"uid": 5, "groups": ["author"], "role": "user"}
                else:
                    status, answer = 403, {"error": "invalid token"}
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/check"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.running = True

    def stop(self) -> None:
        """Stop and close the port (idempotent): the node then finds nobody listening."""
        if self.running:
            self.running = False
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(5)


@pytest.fixture
def user_centre() -> Iterator[UserCentre]:
    centre = UserCentre()
    yield centre
    centre.stop()


def test_http_auth_caches_the_user_centre_answer(make_node, redis_client, user_centre):
    node = make_node(
        auth={"mode": "http", "url": user_centre.url, "cache_ttl": 100, "cache_jitter": 50}
    ).start()
    good = "good-" + os.urandom(8).hex()
    user_centre.good.add(good)
    with contextlib.ExitStack() as stack:
        first, _ = open_client(stack, node, "5", token=good)
        assert user_centre.calls == 1
        key = Keys(node.prefix).auth_cache(hashlib.sha256(good.encode()).hexdigest())
        ttl_ms = redis_client.pttl(key)
        assert 100_000 < ttl_ms <= 150_000, ttl_ms  # cache_ttl + random(1..cache_jitter)
        second, _ = open_client(stack, node, "5", token=good)
        assert user_centre.calls == 1, "the second connect asked the user centre again"

        assert refused_status(f"{node.ws_url}?token=bad-token") == 401
        assert user_centre.calls == 2

        user_centre.stop()
        unknown = "good-" + os.urandom(8).hex()
        user_centre.good.add(unknown)
        assert refused_status(f"{node.ws_url}?token={unknown}") == 503

        # Connections and cached tokens keep working while the user centre is down.
        assert ping(first, "still-1")["code"] == 200
        assert ping(second, "still-2")["code"] == 200
        third, _ = open_client(stack, node, "5", token=good)
        assert ping(third, "new")["code"] == 200
        assert user_state(node, "5")["connections"] == 3


# 5. Limits and heartbeat -------------------------------------------------------------

LIMITS = {"max_frame": 2048, "rate": 5, "max_pending": 65536}
QUIET_HEARTBEAT = {"interval": 20, "timeout": 60}  # so only the limit under test closes


def test_frame_over_max_frame_closes_1009(make_node):
    node = make_node(server=LIMITS, heartbeat=QUIET_HEARTBEAT).start()
    with contextlib.ExitStack() as stack:
        ws, _ = open_client(stack, node, "500")
        assert ping(ws, "small")["code"] == 200
        ws.send(json.dumps({"id": "big", "action": "ping", "data": {"pad": "x" * 3000}}))
        with pytest.raises(ConnectionClosed) as closed:
            next_frame(ws, "reply")
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    wait_for(lambda: connections_of(node, "500") == 0, 5, "the registry to drop it")


def test_rate_limit_answers_429_and_keeps_the_connection(make_node):
    node = make_node(server=LIMITS, heartbeat=QUIET_HEARTBEAT).start()
    with contextlib.ExitStack() as stack:
        ws, _ = open_client(stack, node, "501")
        for n in range(30):
            ws.send(json.dumps({"id": f"r{n}", "action": "ping", "data": {}}))
        replies = [next_frame(ws, "reply") for _ in range(30)]
        assert [r["id"] for r in replies] == [f"r{n}" for n in range(30)]
        codes = [r["code"] for r in replies]
        assert 429 in codes and 200 in codes
        assert codes.count(200) <= 10, codes  # a burst of rate=5, plus what refilled meanwhile
        limited = next(r for r in replies if r["code"] == 429)
        assert limited["msg"]
        # The bucket refills: the same connection is served again.
        wait_for(lambda: ping(ws, "later")["code"] == 200, 5, "the rate limit to let a ping by")


def test_slow_client_is_dropped_and_others_are_served(make_node, redis_client):
    # The default rate: the other client pings far more often than 5 times a second here.
    node = make_node(server={"max_pending": 65536}, heartbeat=QUIET_HEARTBEAT).start()
    slow_uid = "510"
    slow = RawClient(node, node.token(slow_uid))
    try:
        wait_for(lambda: connections_of(node, slow_uid) == 1, 5, "the slow client to register")
        slow_worker = next(iter(redis_client.hvals(Keys(node.prefix).user_conns(slow_uid))))
        with contextlib.ExitStack() as stack:
            # Another client on the very worker that holds the slow one.
            for n in range(40):
                fast_uid = str(520 + n)
                fast, conn_id = open_client(stack, node, fast_uid)
                if worker_of(redis_client, node, fast_uid, conn_id) == slow_worker:
                    break
                fast.close()
            else:
                pytest.fail("no connection landed on the slow client's worker")

            blob = "x" * 30_000
            dropped_after = None
            for n in range(1, 401):
                if publish(node, slow_uid, {"n": n, "blob": blob})["online"] == 0:
                    dropped_after = n
                    break
                if n % 10 == 0:  # the other client is served promptly all along
                    body = {"n": n}
                    data = publish(node, fast_uid, body)
                    assert data["online"] == 1
                    assert_push(next_frame(fast, "push", timeout=2), data["ids"][0], fast_uid, body)
                    assert ping(fast, f"during-{n}", timeout=2)["code"] == 200
            assert dropped_after is not None, "400 messages of 30 KB did not drop the client"
            wait_for(lambda: connections_of(node, slow_uid) == 0, 5, "the registry to drop it")
            assert ping(fast, "after")["code"] == 200
        slow.read_until_closed(10)
        assert "slow client" in node.log()
    finally:
        slow.close()


def test_client_that_never_answers_pings_is_closed(make_node):
    node = make_node(heartbeat={"interval": 1, "timeout": 3}).start()
    silent = RawClient(node, node.token("530"))
    try:
        with contextlib.ExitStack() as stack:
            alive, _ = open_client(stack, node, "531")  # answers pings by itself
            wait_for(lambda: connections_of(node, "530") == 1, 5, "the silent client to register")
            wait_for(lambda: connections_of(node, "530") == 0, 8, "the silent client to be dropped")
            assert connections_of(node, "531") == 1
            assert ping(alive)["code"] == 200
        silent.read_until_closed(5)
    finally:
        silent.close()


# 6. The registry at stop and after a crash -------------------------------------------


def registry_keys(redis_client: Any, node: Node) -> list[str]:
    found = []
    for pattern in ("u:*:conns", "w:*:conns"):
        found += list(redis_client.scan_iter(f"{node.prefix}{pattern}", count=1000))
    return found


def node_workers_in_zset(redis_client: Any, node: Node) -> list[str]:
    members = redis_client.zrange(Keys(node.prefix).workers(), 0, -1)
    return [m for m in members if m.startswith(f"{node.name}:")]


def test_sigterm_leaves_no_route_entries(make_node, redis_client):
    node = make_node().start()
    with contextlib.ExitStack() as stack:
        held = spread_over_workers(stack, node, redis_client, (str(600 + n) for n in range(40)))
        assert registry_keys(redis_client, node)
        assert len(node_workers_in_zset(redis_client, node)) == 2
        node.signal(signal.SIGTERM)
        for conns in held.values():
            for _, ws in conns:
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv(timeout=10)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert node.wait_exit(20) == 0
    assert registry_keys(redis_client, node) == []
    assert node_workers_in_zset(redis_client, node) == []


def test_kill_9_route_entries_expire_by_themselves(make_node, redis_client):
    node = make_node(heartbeat={"interval": 1, "timeout": 3}).start()
    with contextlib.ExitStack() as stack:
        spread_over_workers(stack, node, redis_client, (str(650 + n) for n in range(40)))
        assert list(redis_client.scan_iter(f"{node.prefix}*:u:*:conns"))
        node.kill_all()
        wait_for(lambda: not node.processes(), 5, "every process of the node to die")
        wait_for(
            lambda: not list(redis_client.scan_iter(f"{node.prefix}*:u:*:conns")),
            8,  # 3 x heartbeat.interval, and slack
            "the dead node's user entries to expire",
        )
        wait_for(lambda: not registry_keys(redis_client, node), 3, "its worker entries to expire")


# 7. Kick ------------------------------------------------------------------------------


def test_kick_closes_every_connection_4001_on_both_workers(make_node, redis_client):
    node = make_node().start()
    uid = "700"
    with contextlib.ExitStack() as stack:
        held = spread_over_workers(stack, node, redis_client, itertools.repeat(uid))
        devices = [ws for conns in held.values() for _, ws in conns]
        bystander, _ = open_client(stack, node, "701")
        assert connections_of(node, uid) == len(devices)

        status, answer = api(node, "POST", f"/api/v1/users/{uid}/kick", {"reason": "logout"})
        assert status == 200 and answer["data"] == {"closed": len(devices)}
        for ws in devices:
            with pytest.raises(ConnectionClosed) as closed:
                next_frame(ws, "never")
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
            assert closed.value.rcvd.reason == "logout"
        wait_for(lambda: connections_of(node, uid) == 0, 5, "the registry to drop the user")
        assert ping(bystander)["code"] == 200
        assert connections_of(node, "701") == 1


def test_a_kicked_user_reads_offline_when_the_kick_answers(make_node):
    """The registry drops a kicked connection at once, not when its closing handshake ends:
    this client never answers the close, which keeps its TCP connection CLOSE_SECONDS."""
    node = make_node().start()
    ws = RawWebSocket(node, 704)
    try:
        wait_for(lambda: connections_of(node, "704") == 1, 5, "the connection to register")
        status, answer = api(node, "POST", "/api/v1/users/704/kick", {"reason": "logout"})
        assert status == 200 and answer["data"] == {"closed": 1}
        assert connections_of(node, "704") == 0
        assert ws.close_code(timeout=10) == 4001
    finally:
        ws.close()


def test_a_client_that_closed_reads_offline_when_its_close_completes(make_node):
    """A client's close ends (the server ends the TCP connection) only once its registry
    entry is gone: a site asking right after sees the user offline, every time. Before,
    the entry left in a batch a moment later and about a third of these asks counted it."""
    node = make_node().start()
    for uid, role in [("705", "user")] * 20 + [("706", "agent")] * 5:
        with connect(f"{node.ws_url}?token={node.token(uid, role=role)}", open_timeout=5) as ws:
            assert next_frame(ws, "hello")["uid"] == uid
        assert connections_of(node, uid) == 0


def test_a_kick_reason_too_long_for_a_close_frame_is_cut_and_the_connection_closed(make_node):
    node = make_node().start()
    with contextlib.ExitStack() as stack:
        ws, _ = open_client(stack, node, "702")
        status, answer = api(node, "POST", "/api/v1/users/702/kick", {"reason": 5})
        assert status == 400 and answer["msg"] == "reason: must be a string"
        reason = "é" * 300  # 600 bytes of UTF-8: a close frame holds 123
        status, answer = api(node, "POST", "/api/v1/users/702/kick", {"reason": reason})
        assert status == 200 and answer["data"] == {"closed": 1}
        with pytest.raises(ConnectionClosed) as closed:
            next_frame(ws, "never")
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
        assert closed.value.rcvd.reason == "é" * 61  # 122 bytes: the 62nd would not fit
        wait_for(lambda: connections_of(node, "702") == 0, 5, "the registry to drop the user")
    assert "Task exception was never retrieved" not in node.log()


def test_a_close_the_client_never_answers_still_ends_the_connection(make_node):
    """The server's close frame left unanswered: the server ends the TCP connection itself
    (pmq.reactor.websocket.CLOSE_SECONDS), so a peer that stopped reading holds nothing."""
    node = make_node().start()
    ws = RawWebSocket(node, 703)
    try:
        status, _ = api(node, "POST", "/api/v1/users/703/kick", {"reason": "bye"})
        assert status == 200
        assert ws.close_code(timeout=10) == 4001  # read on to EOF, never answering
    finally:
        ws.close()
