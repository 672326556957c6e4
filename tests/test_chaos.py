"""The chaos suite's short form, one fault per test: under steady load (100 online users,
100 offline, 200 messages/s, a multicast and a broadcast every few seconds) the fault is
injected once, and afterwards every message answered 2xx reached its user and is stored
exactly once, no connection saw an id twice, no ingest request hung past 5 s or was answered
other than 2xx or 503, and every client was connected again within the bound.

Each test runs ``python -m bench.chaos --short --faults NAME`` for real: its own
redis-server, its own MariaDB database (so it needs the MariaDB of the test setup: it fails,
not skips, without it), proxies it cuts, and a node it kills and restarts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.mysql]

FAULTS = ["socket-worker", "task-worker", "master", "redis-kill", "redis-empty", "mysql-cut",
          "redis-cut"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", FAULTS)
def test_fault_under_load_loses_nothing(fault: str, tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--short", "--faults", fault, "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=280,
    )
    assert out.exists(), f"no result (exit {done.returncode}):\n{done.stderr[-4000:]}"
    row = json.loads(out.read_text())["faults"][0]
    table = done.stderr[-3000:]
    assert row["fault"] == fault
    assert "error" not in row, table
    assert row["accepted"] > 0, table
    tolerated = row["lost_last_second"] if fault in ("redis-kill", "redis-empty") else 0
    assert row["lost"] <= tolerated, table
    assert row["stored_duplicates"] == 0, table
    assert row["dup_same_connection"] == 0, table
    assert row["double_applied"] == 0, table
    assert row["broadcast_misses"] == 0, table
    assert row["ingest"]["hung"] == 0, table
    assert row["ingest"]["other"] == {}, table
    assert row["recover_s"] is not None, table
    assert row["failed"] == [], table
    assert done.returncode == 0, table
