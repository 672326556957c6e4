"""End-to-end: one /metrics scrape shows the whole node, in valid Prometheus text."""

from __future__ import annotations

import os
import signal
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from pmq import metrics
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


def test_buffered_metrics_add_up_to_what_direct_ones_record_once_flushed():
    registry = CollectorRegistry()
    direct = Histogram("direct_seconds", "d", buckets=(0.01, 0.1, 1.0), registry=registry)
    late = Histogram("late_seconds", "l", buckets=(0.01, 0.1, 1.0), registry=registry)
    counted = Counter("counted", "c", ["kind"], registry=registry)
    buffered_histogram = metrics.buffered(late)
    buffered_counter = metrics.buffered(counted.labels("notice"))
    for amount in (0.0, 0.01, 0.05, 0.1, 0.5, 7.0, 7.0):  # bounds included, +Inf used
        direct.observe(amount)
        buffered_histogram.observe(amount)
    buffered_counter.inc()
    buffered_counter.inc(2)

    def samples(name: str) -> dict[tuple[str, str], float]:
        return {
            (s.name.removeprefix(name), s.labels.get("le", "")): s.value
            for s in registry.collect()
            for s in s.samples
            if s.name.startswith(name) and not s.name.endswith("_created")
        }

    assert samples("late_seconds")[("_count", "")] == 0  # nothing shows before the flush
    assert registry.get_sample_value("counted_total", {"kind": "notice"}) == 0
    metrics.flush()
    assert samples("late_seconds") == samples("direct_seconds")
    assert samples("late_seconds")[("_bucket", "0.01")] == 2
    assert samples("late_seconds")[("_sum", "")] == pytest.approx(14.66)
    assert registry.get_sample_value("counted_total", {"kind": "notice"}) == 3
    metrics.flush()  # a second flush adds nothing
    assert samples("late_seconds") == samples("direct_seconds")
    assert registry.get_sample_value("counted_total", {"kind": "notice"}) == 3
