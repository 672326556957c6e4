"""A socket worker that lost its message-id generator lease makes every id with its new number.

The generator number is bits 10-21 of an id; two workers holding one number can make the
same id. A worker whose lease was taken over (it expired while the worker was stalled, and
another worker leased the number) must stop using that number everywhere: for messages and
chat, and for broadcasts too.
"""

from __future__ import annotations

import secrets

import pytest
import redis

from pmq.domain.ids import GENERATOR_BITS, SEQUENCE_BITS
from pmq.redis.keys import Keys
from tests.helpers import REDIS_URL, Ingest, Node, wait_for

pytestmark = pytest.mark.e2e


def generator_of(message_id: str) -> int:
    return (int(message_id) >> SEQUENCE_BITS) & ((1 << GENERATOR_BITS) - 1)


def ids_made(node: Node) -> tuple[int, int]:
    """The generator numbers of one new broadcast and of one new message."""
    ingest = Ingest(node)
    try:
        body = {"n": secrets.token_hex(4)}  # a broadcast of the same body is a duplicate
        status, broadcast = ingest.call("POST", "/api/v1/broadcast", {"group": "all", "body": body})
        assert status == 202, broadcast
        status, message = ingest.publish({"to": 77, "kind": "notice", "body": {}})
        assert status == 202, message
    finally:
        ingest.close()
    return generator_of(broadcast["data"]["id"]), generator_of(message["data"]["ids"][0])


def test_a_renewed_lease_renumbers_broadcast_ids_too(make_node) -> None:
    node = make_node(server={"workers": 1}).start()
    (worker,) = node.workers("socket")
    broadcast_before, message_before = ids_made(node)
    assert broadcast_before == message_before
    keys = Keys(node.prefix)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        # Another worker now holds the number: the lease is lost, the next renewal sees it.
        client.set(keys.id_lease(message_before), "thief", ex=600)

        def leased_again() -> bool:
            return any(
                key != keys.id_lease(message_before).encode()
                and (client.get(key) or b"").endswith(f":{worker['pid']}".encode())
                for key in client.scan_iter(keys.id_lease(0).removesuffix("0") + "*")
            )

        wait_for(leased_again, 20, "the worker to lease a new generator number")
    finally:
        client.close()
    broadcast_after, message_after = ids_made(node)
    assert message_after != message_before
    assert broadcast_after == message_after  # was still the lost number


def test_a_stopping_worker_keeps_its_id_number_until_its_ingest_has_drained() -> None:
    # Ingest requests still draining make ids. A number let go before they end could be
    # taken by a worker starting meanwhile, which makes ids from sequence 0 again, in the
    # same millisecond: two messages with one id, the second skipped by storage.
    from pmq.workers.socket import SocketWorker

    order = [step.__name__ for step in SocketWorker.stop_order]
    assert order.index("release_ids") > order.index("drain")
    assert order.index("release_ids") < order.index("disconnect")
