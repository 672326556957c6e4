"""End-to-end: one /metrics scrape shows the whole node, in valid Prometheus text."""

from __future__ import annotations

import os
import signal
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Ingest, Node, wait_for, ws_client

pytestmark = pytest.mark.e2e


def scrape(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the node's /metrics as (name, labels) -> value; parsing fails the test
    if the text is not valid exposition format."""
    with urllib.request.urlopen(f"{node.ingest_url}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_cover_the_whole_node(make_node):
    node = make_node().start()
    ingest = Ingest(node)
    with ws_client(node, 7001) as first, ws_client(node, 7002):
        for _ in range(3):
            status, _ = ingest.publish({"to": 7001, "kind": "notice", "body": {"n": 1}})
            assert status == 202
        first.pushes(3)
        # The gauge is refreshed with each worker heartbeat (every second).
        wait_for(lambda: value(scrape(node), "pmq_connections") == 2, 10, "2 connections")
        # Per-message counts are buffered in each worker and flushed once a second.
        wait_for(
            lambda: value(scrape(node), "pmq_publish_to_deliver_seconds_count") == 3,
            10,
            "3 deliveries counted",
        )
        samples = scrape(node)
    ingest.close()
    assert value(samples, "pmq_messages_accepted_total", kind="notice") == 3
    assert value(samples, "pmq_messages_delivered_total", kind="notice") == 3
    assert value(samples, "pmq_ingest_request_seconds_count", route="/api/v1/messages") == 3
    wait_for(lambda: value(scrape(node), "pmq_storage_batch_size_sum") >= 3, 10, "stored")
    assert ("pmq_queue_depth", (("queue", "store"),)) in scrape(node)


def test_worker_restarts_are_counted(make_node):
    node = make_node().start()
    os.kill(node.workers("task")[0]["pid"], signal.SIGKILL)
    wait_for(lambda: value(scrape(node), "pmq_worker_restarts_total") == 1, 10, "a restart")

