"""Many nodes (docs/protocol.md, "Many nodes"): two real nodes behind a real nginx, and the
cluster view.

The nginx tests run Debian's nginx with the shipped ``etc/nginx/pmq.conf`` (its upstream
servers pointed at the nodes' client ports, its two ``listen``s at free ports, its
certificate placeholders at a self-signed certificate made for the test with openssl, its
access log in the test's directory), so the production example itself is what carries the
traffic, over TLS. The nodes beat every second (``heartbeat.interval = 1``), so a dead
node's entries expire within about 3 s.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from websockets.sync.client import connect

from pmq import configload
from pmq.config import HeartbeatConfig
from pmq.domain.cluster import live_nodes, snapshot
from pmq.redis.keys import Keys
from tests.helpers import Ingest, Node, WsClient, free_port, user_state, wait_for

pytestmark = pytest.mark.e2e

NGINX = "/usr/sbin/nginx"
PRODUCTION_CONF = Path(__file__).resolve().parent.parent / "etc" / "nginx" / "pmq.conf"
HEARTBEAT = {"interval": 1, "timeout": 3}
TTL = 3 * HEARTBEAT["interval"]  # a dead node's entries go within 3 x interval
SLACK = 2.0  # for a beat (every 0.5 s), a sweep and a busy machine


# nginx ---------------------------------------------------------------------------------


def nginx_binary() -> str:
    """Debian's nginx, installed with apt-get when absent; skips when that cannot be done."""
    if os.access(NGINX, os.X_OK):
        return NGINX
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"{NGINX} is absent and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "nginx"]):
        done = subprocess.run(step, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            pytest.skip(f"cannot install nginx ({' '.join(step)}): {done.stderr.strip()[-300:]}")
    if not os.access(NGINX, os.X_OK):
        pytest.skip(f"apt-get installed nginx but {NGINX} is missing")
    return NGINX


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with openssl (skips without it)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make the test's certificate")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    made = subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext",
         "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    return cert, key


def one_sub(pattern: str, replacement: str, text: str, what: str) -> str:
    """``text`` with the one match of ``pattern`` (a line of pmq.conf) replaced."""
    text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert count == 1, f"pmq.conf: expected one {what}"
    return text


def site_config(tmp: Path, ports: tuple[int, int], upstreams: list[int]) -> str:
    """etc/nginx/pmq.conf with its upstream servers replaced by ``upstreams`` (keeping their
    parameters), its TLS and plain servers listening on 127.0.0.1:``ports`` (in that order),
    its certificate placeholders pointing at a self-signed certificate in ``tmp``, and its
    access log in ``tmp`` (same format)."""
    text = PRODUCTION_CONF.read_text()
    servers = re.findall(r"^[ \t]*server[ \t]+\S+:\d+[^;\n]*;\n", text, re.MULTILINE)
    assert servers and "".join(servers) in text, "pmq.conf: expected consecutive upstream servers"
    head = re.match(r"([ \t]*server[ \t]+)\S+:\d+([^;]*;)", servers[0])
    assert head is not None
    ours = "".join(f"{head[1]}127.0.0.1:{p}{head[2]}\n" for p in upstreams)
    text = text.replace("".join(servers), ours)
    tls, plain = ports
    text = one_sub(r"^(\s*)listen\s+443\s+ssl;", rf"\g<1>listen 127.0.0.1:{tls} ssl;", text,
                   "`listen 443 ssl;`")  # fmt: skip
    text = one_sub(r"^(\s*)listen\s+80;", rf"\g<1>listen 127.0.0.1:{plain};", text, "`listen 80;`")
    cert, key = self_signed(tmp)
    text = one_sub(r"^(\s*ssl_certificate\s+)\S+;", rf"\g<1>{cert};", text, "ssl_certificate")
    text = one_sub(r"^(\s*ssl_certificate_key\s+)\S+;", rf"\g<1>{key};", text,
                   "ssl_certificate_key")  # fmt: skip
    text, logs = re.subn(r"^(\s*access_log\s+)\S+", rf"\g<1>{tmp}/access.log", text,
                         flags=re.MULTILINE)  # fmt: skip
    assert logs == 2, "pmq.conf: expected an access_log in each server"
    return text


class Nginx:
    """Debian's nginx in the foreground with every path inside ``tmp``: TLS on ``port``,
    plain HTTP (redirects) on ``http_port``."""

    def __init__(self, tmp: Path, upstreams: list[int]) -> None:
        self.tmp = tmp
        self.port, self.http_port = free_port(), free_port()
        tmp.mkdir(exist_ok=True)
        (tmp / "pmq.conf").write_text(site_config(tmp, (self.port, self.http_port), upstreams))
        self.tls = ssl.create_default_context(cafile=tmp / "cert.pem")
        temps = "".join(
            f"    {name}_temp_path {tmp}/{name}_temp;\n"
            for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        self.conf = tmp / "nginx.conf"
        self.conf.write_text(
            f"worker_processes 1;\n"
            f"error_log {tmp}/error.log info;\n"
            f"pid {tmp}/nginx.pid;\n"
            f"events {{ worker_connections 256; }}\n"
            f"http {{\n"
            f"{temps}"
            f"    include {tmp}/pmq.conf;\n"
            f"}}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ws_base(self) -> str:
        return f"wss://127.0.0.1:{self.port}/ws"

    def start(self, binary: str) -> Nginx:
        command = [binary, "-e", str(self.tmp / "error.log"), "-c", str(self.conf),
                   "-p", str(self.tmp), "-g", "daemon off;"]  # fmt: skip
        checked = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stderr
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for(lambda: self.get("/")[0] == 404, 10, f"nginx on port {self.port}")
        return self

    def get(self, path: str, plain: bool = False) -> tuple[int, bytes, str | None]:
        """One GET through nginx, over TLS (or ``plain`` HTTP): status, body, Location;
        (0, b"", None) while it does not answer yet."""
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(f"nginx exited with {self.proc.returncode}:\n{self.errors()}")
        conn = (
            http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=5)
            if plain
            else http.client.HTTPSConnection("127.0.0.1", self.port, timeout=5, context=self.tls)
        )
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read(), response.getheader("Location")
        except OSError:
            return 0, b"", None
        finally:
            conn.close()

    def access_log(self) -> str:
        log = self.tmp / "access.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def errors(self) -> str:
        log = self.tmp / "error.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def nginx_for(tmp_path: Path) -> Iterator[Callable[[list[Node]], Nginx]]:
    """Factory: nginx in front of the given nodes' client ports, stopped at teardown."""
    binary = nginx_binary()
    started: list[Nginx] = []

    def make(nodes: list[Node]) -> Nginx:
        started.append(Nginx(tmp_path / "nginx", [n.port for n in nodes]).start(binary))
        return started[-1]

    yield make
    for server in started:
        server.stop()


@contextlib.contextmanager
def client_via(proxy: Nginx, uid: str, token: str) -> Iterator[WsClient]:
    """Like tests.helpers.ws_client, through nginx: the hello first, then a ping whose reply
    comes after the inbox replay (the replayed pushes are then in ``kept``)."""
    with connect(f"{proxy.ws_base}?token={token}", ssl=proxy.tls, open_timeout=10) as ws:
        hello = json.loads(ws.recv(timeout=5))
        assert hello["type"] == "hello" and hello["uid"] == uid, hello
        client = WsClient(ws, hello)
        assert client.request("ping")["code"] == 200
        yield client


# Reading the cluster -------------------------------------------------------------------


def holder_of(client: redis.Redis, keys: Keys, uid: str, nodes: list[Node]) -> Node:
    """The node whose socket worker holds ``uid``'s one connection (worker ids start with
    the node name)."""
    workers = set(client.hvals(keys.user_conns(uid)))
    assert len(workers) == 1, workers
    (worker,) = workers
    return next(n for n in nodes if worker.startswith(f"{n.name}:"))


def publish(node: Node, uid: str, text: str) -> dict[str, Any]:
    site = Ingest(node)
    try:
        code, reply = site.publish({"to": uid, "kind": "comment", "body": {"text": text}})
    finally:
        site.close()
    assert code == 202, reply
    return reply["data"]  # type: ignore[no-any-return]


def cluster_view(node: Node) -> dict[str, Any]:
    """``pmqctl status --cluster --json`` run with ``node``'s config."""
    done = node.ctl("status", "--cluster", "--json", timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def connections_by_node(view: dict[str, Any]) -> dict[str, int]:
    return {n["node"]: n["connections"] for n in view["nodes"]}


def read_view(node: Node) -> dict[str, Any]:
    """What ``status --cluster`` reads, in-process: quick enough to poll a deadline with."""
    return snapshot(configload.load(str(node.config_path), environ={}))


# Tests ---------------------------------------------------------------------------------


def test_production_nginx_example_covers_what_pmq_needs() -> None:
    text = PRODUCTION_CONF.read_text()
    assert "ip_hash;" in text
    assert re.search(r"proxy_set_header Upgrade \$http_upgrade;", text)
    assert re.search(r"proxy_set_header Connection \$pmq_connection_upgrade;", text)
    assert re.search(r"proxy_next_upstream [^;]*\berror\b", text)
    read_timeout = re.search(r"proxy_read_timeout (\d+)s;", text)
    assert read_timeout and int(read_timeout.group(1)) > HeartbeatConfig().timeout
    assert ":9502" not in text, "the ingest port must stay internal"
    # TLS on 443 with clearly marked certificate placeholders; port 80 only redirects.
    assert re.search(r"^\s*listen 443 ssl;", text, re.MULTILINE)
    for directive in ("ssl_certificate", "ssl_certificate_key"):
        assert re.search(rf"^\s*{directive}\s+\S*CHANGE_ME\S*;", text, re.MULTILINE), directive
    plain = re.search(r"server \{\s*listen 80;(.*?)\n\}", text, re.DOTALL)
    assert plain and "location" not in plain[1] and "return 301 https://" in plain[1]
    # The access log format names no query string and no Referer (both carry ?token=).
    fmt = re.search(r"log_format (\w+)([^;]*);", text)
    assert fmt is not None
    for variable in ("$request ", "$request_uri", "$args", "$query_string", "$http_referer"):
        assert variable not in fmt[2] + " ", variable
    assert len(re.findall(rf"access_log \S+ {fmt[1]};", text)) == 2


def test_nginx_terminates_tls_and_keeps_tokens_out_of_its_access_log(
    make_node: Callable[..., Node], nginx_for: Callable[[list[Node]], Nginx]
) -> None:
    node = make_node().start()
    proxy = nginx_for([node])
    token = node.token("4102")

    status, _, location = proxy.get(f"/ws?token={token}", plain=True)
    assert status == 301 and location == f"https://127.0.0.1/ws?token={token}"
    assert proxy.get(f"/cs/chat.html?token={token}")[0] == 200
    with client_via(proxy, "4102", token) as client:
        assert client.hello["uid"] == "4102"
    # nginx logs a WebSocket request when the connection ends.
    log = wait_for(
        lambda: re.search(r'"GET /ws\S* HTTP/1.1" 101', text := proxy.access_log()) and text,
        10,
        "the closed /ws connection in nginx's access log",
    )
    assert "token=" not in log and token not in log, log
    for request in ('"GET /ws HTTP/1.1" 301', '"GET /cs/chat.html HTTP/1.1" 200',
                    '"GET /ws HTTP/1.1" 101'):  # fmt: skip
        assert request in log, log


def test_two_nodes_behind_nginx_deliver_and_fail_over(
    make_node: Callable[..., Node],
    nginx_for: Callable[[list[Node]], Nginx],
    redis_client: redis.Redis,
    redis_prefix: str,
) -> None:
    nodes = [make_node(heartbeat=HEARTBEAT).start(wait=False) for _ in range(2)]
    for node in nodes:
        node.wait_ready()
    proxy = nginx_for(nodes)
    keys = Keys(redis_prefix)
    uid = "4101"
    token = nodes[0].token(uid)  # any node's: they share the secret

    # The pages go through nginx; the ingest API does not.
    assert proxy.get("/cs/chat.html")[0] == 200
    assert proxy.get("/api/v1/users/1")[0] == 404

    with client_via(proxy, uid, token) as user:
        holder = holder_of(redis_client, keys, uid, nodes)
        survivor = next(n for n in nodes if n is not holder)
        # Ingested on the node that does not hold the connection: relayed across nodes.
        first = publish(survivor, uid, "across nodes")
        assert first["online"] == 1
        (pushed,) = user.pushes(1)
        assert pushed["id"] == first["ids"][0] and pushed["body"] == {"text": "across nodes"}
        assert user.request("msg.ack", {"ids": first["ids"]})["data"] == {"acked": 1}
        assert user_state(survivor, uid)["connections"] == 1

        holder.kill_all()
        # The holder never cleaned up: its entries expire on the survivor within the TTL.
        offline = wait_for(
            lambda: (s := user_state(survivor, uid))["connections"] == 0 and s,
            TTL + SLACK,
            "the killed node's user to show offline on the survivor",
        )
        assert offline["online"] is False
        # Published while the user is offline: kept in the inbox.
        kept = publish(survivor, uid, "while away")
        assert kept["online"] == 0

    # Reconnecting through nginx reaches the survivor, which replays the inbox.
    with client_via(proxy, uid, token) as user:
        assert holder_of(redis_client, keys, uid, nodes) is survivor
        replayed = [frame["msg"] for frame in user.kept if frame.get("type") == "push"]
        user.kept.clear()
        assert [m["id"] for m in replayed] == kept["ids"]
        assert replayed[0]["body"] == {"text": "while away"}
        state = user_state(survivor, uid)
        assert state["online"] is True and state["connections"] == 1
        # Live delivery on the survivor still works for the reconnected client.
        live = publish(survivor, uid, "live again")
        assert live["online"] == 1 and user.pushes(1)[0]["id"] == live["ids"][0]


def test_pmqctl_status_cluster_lists_live_nodes_and_their_connections(
    make_node: Callable[..., Node], redis_client: redis.Redis, redis_prefix: str
) -> None:
    a, b = (make_node(heartbeat=HEARTBEAT).start(wait=False) for _ in range(2))
    a.wait_ready()
    b.wait_ready()
    keys = Keys(redis_prefix)
    with contextlib.ExitStack() as stack:
        for node, uid in ((a, "1"), (a, "2"), (b, "3")):
            url = f"{node.ws_url}?token={node.token(uid)}"
            ws = stack.enter_context(connect(url, open_timeout=5))
            assert json.loads(ws.recv(timeout=5))["type"] == "hello"
        wait_for(
            lambda: connections_by_node(read_view(b)) == {a.name: 2, b.name: 1},
            10,
            "both nodes with their connections in the cluster view",
        )
        view = cluster_view(a)
        assert view["connections"] == 3 and view["workers"] == 4
        by_name = sorted((a, b), key=lambda n: n.name)
        for node_view, node in zip(view["nodes"], by_name, strict=True):
            assert node_view["node"] == node.name and node_view["master"] == node.master_pid()
            pids = {w["pid"] for w in node.workers()}
            assert {w["pid"] for w in node_view["workers"]} == pids
            assert sorted(w["index"] for w in node_view["workers"]) == [1, 2]
        text = a.ctl("status", "--cluster")
        assert text.returncode == 0, text.stderr
        assert "2 live nodes, 4 socket workers, 3 connections" in text.stdout
        assert a.name in text.stdout and b.name in text.stdout

        # kill -9: a's entries are skipped within the TTL and swept by b's workers.
        a.kill_all()
        wait_for(lambda: connections_by_node(read_view(b)) == {b.name: 1}, TTL + SLACK, "only b")
        wait_for(
            lambda: not any(
                w.startswith(f"{a.name}:") for w in redis_client.hkeys(keys.cluster_workers())
            ),
            TTL + SLACK,
            "b to sweep a's entries",
        )
        # Asked with the dead node's config: no master runs for it, Redis still answers.
        assert connections_by_node(cluster_view(a)) == {b.name: 1}

    # A graceful stop takes the node's entries with it at once.
    b.signal(signal.SIGTERM)
    assert b.wait_exit() == 0
    assert not redis_client.hkeys(keys.cluster_workers())
    empty = b.ctl("status", "--cluster")
    assert empty.returncode == 0 and "0 live nodes" in empty.stdout, empty


def test_pmqctl_status_cluster_fails_when_redis_does_not_answer(
    tmp_path: Path, redis_prefix: str
) -> None:
    node = Node(tmp_path, redis_prefix, redis={"url": f"redis://127.0.0.1:{free_port()}/0"})
    done = node.ctl("status", "--cluster", "--json", timeout=30)
    assert done.returncode == 1 and done.stdout == ""
    assert "redis does not answer" in done.stderr


def test_live_nodes_groups_fresh_worker_entries_by_node() -> None:
    now = 1_700_000_000_000

    def entry(node: str, index: int, connections: int, age_ms: int) -> bytes:
        return orjson.dumps(
            {"node": node, "host": "h", "index": index, "pid": 100 + index, "master": 99,
             "connections": connections, "started": now - 60_000, "updated": now - age_ms}
        )  # fmt: skip

    entries = {
        b"n2:socket1:101": entry("n2", 1, 4, 100),
        b"n1:socket2:102": entry("n1", 2, 1, 2_000),
        b"n1:socket1:101": entry("n1", 1, 2, 500),
        b"n3:socket1:101": entry("n3", 1, 7, 3_001),  # stopped beating: left out
        b"junk": b"not json",
    }
    nodes = live_nodes(entries, now, 3_000)
    assert [n["node"] for n in nodes] == ["n1", "n2"]
    assert nodes[0]["connections"] == 3 and nodes[0]["updated"] == now - 500
    assert [w["id"] for w in nodes[0]["workers"]] == ["n1:socket1:101", "n1:socket2:102"]
    assert nodes[1]["workers"][0] == {
        "id": "n2:socket1:101", "index": 1, "pid": 101, "connections": 4,
        "started": now - 60_000, "updated": now - 100,
    }  # fmt: skip
