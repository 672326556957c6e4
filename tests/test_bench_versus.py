"""bench.versus's arithmetic and table, from fixed runs (no node, no load)."""

from __future__ import annotations

from typing import Any

from bench.versus import medians, ratios, table


def run(
    contender: str, round_no: int, connects: float, cpu: float, unicast: float, p99: float
) -> dict[str, Any]:
    figures = {
        "connects_per_s": connects,
        "node_cpu_ms_per_connect": cpu,
        "unicast_delivered_per_s": unicast,
        "unicast_p99_ms": p99,
    }
    return {
        "round": round_no,
        "scenario": "connects",
        "contender": contender,
        "figures": figures,
        "faults": {"failed": 0, "dropped": 0},
    }


def result_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {
        "scenarios": ["connects", "unicast"],
        "connections": 10_000,
        "messages": 100_000,
        "rounds": 2,
        "revision": {"pmq": "abc1234", "bench": "abc1234"},
        "started": "2026-12-06 12:00:00 +0000",
        "ended": "12:20:00",
        "load_average": {"before": [0.5, 0.4, 0.3], "after": [1.9, 1.5, 1.0]},
        "runs": runs,
    }
    result["median"] = medians(runs)
    result["ratio"] = ratios(result["median"])
    return result


def test_medians_ratios_and_the_table() -> None:
    runs = [
        run("pmq", 1, 500.0, 2.0, 9000.0, 40.0),
        run("plain", 1, 1000.0, 1.0, 15000.0, 20.0),
        run("plain", 2, 1200.0, 1.0, 12000.0, 30.0),
        run("pmq", 2, 700.0, 3.0, 11000.0, 50.0),
        {"round": 2, "scenario": "connects", "contender": "pmq", "error": "node did not start"},
    ]
    runs[2]["faults"] = {"failed": 3, "dropped": 0}
    result = result_of(runs)
    assert result["median"]["pmq"]["connects_per_s"] == 600.0
    assert result["median"]["plain"]["unicast_p99_ms"] == 25.0
    assert result["ratio"]["connects_per_s"] == 0.545
    assert result["ratio"]["ingest_per_s"] is None
    assert table(result).splitlines() == [
        "| | PMQ | plain relay | PMQ / plain relay |",
        "|---|---:|---:|---:|",
        "| connects/s | 600 | 1,100 | 0.55 |",
        "| node CPU per connect (ms) | 2.50 | 1.00 | 2.50 |",
        "| PSS per idle connection (KiB) | n/a | n/a | n/a |",
        "| unicast delivered msg/s (p99 ms) | 10,000 (45.0) | 13,500 (25.0) | 0.74 (1.80) |",
        "",
        "Medians of 2 round(s), 10,000 connections, 100,000 messages; PMQ at abc1234, "
        "benches at abc1234; 2026-12-06 12:00:00 +0000 to 12:20:00; load average "
        "[0.5, 0.4, 0.3] before, [1.9, 1.5, 1.0] after.",
        "- round 2 connects on plain relay: failed 3",
        "- round 2 connects on PMQ: failed: node did not start",
    ]
