"""Prometheus metrics for a whole node, in prometheus-client's multiprocess mode.

Every process of a node writes its samples to files in one directory; ``GET /metrics`` on
any socket worker's ingest port reads them all, so one scrape shows the whole node. The
master names that directory in $PROMETHEUS_MULTIPROC_DIR before the fork and before anything
imports this module (prometheus-client picks its storage when first imported).

The socket workers' per-message metrics are buffered (:func:`buffered`): counted in the
process's memory and added to the shared samples by :func:`flush`, once a FLUSH_SECONDS and
before each scrape. A multiprocess inc() takes a lock, checks the pid and writes the mmap:
6 % of a socket worker's time under unicast load, for three or four of them per message.
"""

from __future__ import annotations

import asyncio
import bisect
import os
from typing import Any

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
WEBHOOK_EVENTS = Counter(
    "pmq_webhook_events", "Events the site took (delivered) or PMQ gave up on (dropped).",
    ["result"],
)
WEBHOOK_FAILURES = Counter(
    "pmq_webhook_failures", "Webhook POSTs that failed (no answer in time, or not a 2xx)."
)
WEBHOOK_SECONDS = Histogram(
    "pmq_webhook_delivery_seconds", "From an event happening to the site taking it.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0),
)


FLUSH_SECONDS = 1.0  # how late a buffered count may reach /metrics


class BufferedCounter:
    """A counter (one labelled child) counted here until :func:`flush`."""

    __slots__ = ("_child", "_pending")

    def __init__(self, child: Counter) -> None:
        self._child = child
        self._pending = 0.0

    def inc(self, amount: float = 1) -> None:
        self._pending += amount

    def flush(self) -> None:
        if self._pending:
            self._child.inc(self._pending)
            self._pending = 0.0


class BufferedHistogram:
    """A histogram (one labelled child) whose observations are bucketed here until
    :func:`flush`, which adds each bucket's count and the sum to the shared samples."""

    __slots__ = ("_bounds", "_child", "_counts", "_sum")

    def __init__(self, child: Histogram) -> None:
        self._child = child
        self._bounds: list[float] = list(child._upper_bounds)  # ends with +Inf
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, amount)] += 1  # first bound >= amount
        self._sum += amount

    def flush(self) -> None:
        if not any(self._counts):
            return
        for bucket, count in zip(self._child._buckets, self._counts, strict=True):
            if count:
                bucket.inc(count)
        self._child._sum.inc(self._sum)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0


_buffered: list[BufferedCounter | BufferedHistogram] = []


def buffered(child: Any) -> Any:
    """A buffered stand-in for ``child`` (a Counter or Histogram without labels, or one
    labelled child), with the same inc() or observe(). Histograms fall back to ``child``
    itself if this prometheus-client lays them out otherwise than expected."""
    one: BufferedCounter | BufferedHistogram
    if isinstance(child, Counter):
        one = BufferedCounter(child)
    elif all(hasattr(child, a) for a in ("_upper_bounds", "_buckets", "_sum")):
        one = BufferedHistogram(child)
    else:
        return child
    _buffered.append(one)
    return one


def flush() -> None:
    """Add what the buffered metrics counted to the shared samples."""
    for one in _buffered:
        one.flush()


async def keep_flushed() -> None:
    """Flush every FLUSH_SECONDS (a socket worker's background task); cancel to stop."""
    while True:
        await asyncio.sleep(FLUSH_SECONDS)
        flush()


def render() -> tuple[bytes, str]:
    """The node's metrics in Prometheus text format, and its content type (this process's
    buffered counts flushed first; the other workers' are at most FLUSH_SECONDS late)."""
    flush()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def process_gone(pid: int) -> None:
    """Drop a dead worker's live gauges (the master calls this when it reaps one)."""
    if os.environ.get(ENV):
        multiprocess.mark_process_dead(pid)
