"""A storage outage never stops live traffic: broadcasts still fan out, users still connect.

A real node stores in a throw-away MariaDB database through a TCP proxy the test cuts (the
shared server itself is never stopped).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from pmq.redis.keys import Keys
from tests.helpers import Ingest, MysqlDatabase, Node, TcpProxy, WsClient, wait_for, ws_client

pytestmark = [pytest.mark.e2e, pytest.mark.mysql]

SHARDS = 4


@pytest.fixture
def mysql_db() -> Iterator[MysqlDatabase]:
    db = MysqlDatabase()
    yield db
    db.drop()


@pytest.fixture
def proxy(mysql_db: MysqlDatabase) -> Iterator[TcpProxy]:
    made = TcpProxy(mysql_db.host, mysql_db.port)
    yield made
    made.close()


@pytest.fixture
def node(make_node: Callable[..., Node], mysql_db: MysqlDatabase, proxy: TcpProxy) -> Node:
    made = make_node(
        storage={"url": mysql_db.url(proxy.port), "shards": SHARDS},
        inbox={"hot_seconds": 1, "sweep_seconds": 1},
    )
    result = made.ctl("db", "init")
    assert result.returncode == 0, result.stdout + result.stderr
    return made.start()


def broadcast(site: Ingest, text: str) -> str:
    code, reply = site.call("POST", "/api/v1/broadcast", {"group": "all", "body": {"t": text}})
    assert code == 202, reply
    return str(reply["data"]["id"])


def publish(site: Ingest, uid: int, text: str) -> str:
    code, reply = site.publish({"to": uid, "kind": "notice", "body": {"t": text}})
    assert code == 202, reply
    return str(reply["data"]["ids"][0])


def push_ids(client: WsClient, count: int, timeout: float = 5.0) -> list[str]:
    return [m["id"] for m in client.pushes(count, timeout)]


def test_broadcasts_fan_out_during_a_storage_outage_and_are_stored_after(
    node: Node, mysql_db: MysqlDatabase, proxy: TcpProxy
) -> None:
    site = Ingest(node)
    with ws_client(node, 9) as user:
        proxy.cut()
        sent = [broadcast(site, f"down {n}") for n in range(3)]
        assert push_ids(user, 3) == sent  # live, each one, while storage is down
        proxy.restore()

    def stored() -> list[str]:
        return [str(r[0]) for r in mysql_db.query("SELECT id FROM pmq_broadcast ORDER BY id")]

    wait_for(lambda: stored() == sent, 60, "the broadcasts to reach storage")
    site.close()


def test_a_user_with_cold_messages_connects_during_a_storage_outage(
    node: Node, mysql_db: MysqlDatabase, proxy: TcpProxy, redis_prefix: str,
    redis_client: redis.Redis,
) -> None:
    site = Ingest(node)
    cold = [publish(site, 7, f"old {n}") for n in range(5)]
    keys = Keys(redis_prefix)

    def swept() -> bool:  # only storage holds them now
        rows = mysql_db.query(f"SELECT id FROM pmq_msg_{7 % SHARDS} WHERE uid = 7 AND acked = 0")
        return (
            sorted(str(r[0]) for r in rows) == cold
            and redis_client.zcard(keys.inbox("7")) == 0
            and bool(redis_client.exists(keys.cold("7")))
        )

    wait_for(swept, 30, "the messages to leave Redis for storage")
    proxy.cut()
    with ws_client(node, 7) as user:  # hello, and the replay's end: the connect is accepted
        assert not [f for f in user.kept if f.get("type") == "push"]
        live = publish(site, 7, "new")
        assert push_ids(user, 1) == [live]
        assert user.request("ping")["code"] == 200  # and it stays open
        proxy.restore()
        # Once storage answers: the cold ones, in id order, and nothing twice.
        assert push_ids(user, 5, timeout=30) == cold
        frames: list[dict[str, Any]] = user.quiet(1.0)
        assert not [f for f in frames if f.get("type") == "push"]
    site.close()
