"""Prometheus metrics for a whole node, in prometheus-client's multiprocess mode.

Every process of a node writes its samples to files in one directory; ``GET /metrics`` on
any socket worker's ingest port reads them all, so one scrape shows the whole node. The
master names that directory in $PROMETHEUS_MULTIPROC_DIR before the fork and before anything
imports this module (prometheus-client picks its storage when first imported).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

CONNECTIONS = Gauge(
    "pmq_connections", "Open client WebSocket connections.", multiprocess_mode="livesum"
)
MESSAGES_ACCEPTED = Counter(
    "pmq_messages_accepted", "Unicast messages accepted by the ingest API.", ["kind"]
)
MESSAGES_DELIVERED = Counter(
    "pmq_messages_delivered", "Pushes of unicast messages to connections online.", ["kind"]
)
MESSAGES_ACKED = Counter("pmq_messages_acked", "Messages acknowledged by clients.")
BROADCASTS = Counter("pmq_broadcasts", "Broadcasts accepted (duplicates excluded).", ["group"])
BROADCAST_DELIVERIES = Counter("pmq_broadcast_deliveries", "Broadcast pushes to connections.")
DELIVERY_SECONDS = Histogram(
    "pmq_publish_to_deliver_seconds",
    "From accepting a message to writing it to a connection's socket.",
    buckets=LATENCY_BUCKETS,
)
INGEST_SECONDS = Histogram(
    "pmq_ingest_request_seconds", "Ingest API request handling time.", ["route"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_DEPTH = Gauge(
    "pmq_queue_depth", "Items waiting in a task queue.", ["queue"], multiprocess_mode="mostrecent"
)
STORAGE_BATCH = Histogram(
    "pmq_storage_batch_size", "Items per storage write batch.",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000),
)
STORAGE_ERRORS = Counter("pmq_storage_errors", "Failed storage write attempts.")
WORKER_RESTARTS = Counter("pmq_worker_restarts", "Workers that died and were replaced.")
AUTH_CACHE = Counter("pmq_auth_cache", "User-centre token look-ups by cache result.", ["result"])


def render() -> tuple[bytes, str]:
    """The node's metrics in Prometheus text format, and its content type."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def process_gone(pid: int) -> None:
    """Drop a dead worker's live gauges (the master calls this when it reaps one)."""
    if os.environ.get(ENV):
        multiprocess.mark_process_dead(pid)
