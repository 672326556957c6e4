"""The socket workers' buffered metrics: what they count shows, exactly, once flushed."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from pmq import metrics


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
            (sample.name.removeprefix(name), sample.labels.get("le", "")): sample.value
            for family in registry.collect()
            for sample in family.samples
            if sample.name.startswith(name) and not sample.name.endswith("_created")
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
