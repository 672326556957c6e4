"""The reconnect storm's short form: 300 clients on a node whose socket workers are all
killed with -9 at once, while the site publishes. Every client must be connected again,
every accepted message delivered, and none handed to the application twice.

It runs ``python -m bench.storm`` for real against a real node; how fast the clients came
back is a bench figure (docs/benchmarks.md), not asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import Node

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_kill9_storm_reconnects_all_and_loses_nothing(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = make_node(heartbeat={"interval": 25, "timeout": 60}).start()
    out = tmp_path / "storm.json"
    command = "-n 300 -p 2 --fault kill9 --publish-rate 100 --before 2 --after 2"
    limits = "--deadline 60 --drain 20"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.storm",
            "--config",
            str(node.config_path),
            "--out",
            str(out),
            *command.split(),
            *limits.split(),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=110,
        env=node.env(),
    )
    assert out.exists(), f"no result (exit {done.returncode}):\n{done.stderr[-4000:]}"
    result = json.loads(out.read_text())
    reconnect, messages = result["reconnect"], result["messages"]
    assert len(result["fault"]["killed_pids"]) == 2
    assert reconnect["reconnects"] >= 300, reconnect  # the kill dropped every client
    assert reconnect["all_back_s"] is not None, reconnect
    assert reconnect["connected_at_end"] == 300, reconnect
    assert messages["accepted"] > 0, messages
    assert messages["lost"] == 0, messages
    assert messages["wrong_recipient"] == 0, messages
    assert messages["duplicates_to_application"] == 0, messages
    assert messages["delivered_not_accepted"] == 0, messages  # no request applied twice
    assert done.returncode == 0, done.stderr[-4000:]
