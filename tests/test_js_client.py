"""The JavaScript client (clients/js) against a real node, with Node's own test runner: the
cases are clients/js/test/*.test.mjs; this test starts the node they talk to (one socket
worker, so a kill -9 takes the connection down for sure) and tells them where it is."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import SECRET, Node

pytestmark = pytest.mark.e2e

CLIENT = Path(__file__).resolve().parent.parent / "clients" / "js"
NODE = shutil.which("node")
TIMEOUT = 100  # seconds for the whole JavaScript suite (each case waits 20 s at most)
if NODE is None:
    pytest.skip("node is not installed (Node.js 20 or later)", allow_module_level=True)


def node_test_command(files: list[Path]) -> list[str]:
    """``node --test FILES``; Node 20 and 21 need a flag for their global WebSocket."""
    assert NODE is not None
    version = subprocess.run([NODE, "--version"], capture_output=True, text=True, check=True)
    major = int(version.stdout.strip().lstrip("v").split(".")[0])
    if major < 20:
        pytest.skip(f"node {version.stdout.strip()} has no WebSocket (Node.js 20 or later)")
    flags = ["--experimental-websocket"] if major < 22 else []
    return [NODE, *flags, "--test", *map(str, files)]


def test_js_client_against_a_node(make_node: Callable[..., Node]) -> None:
    # A replay of at most 20: the 25 messages of the batching case take an inbox.more.
    node = make_node(server={"workers": 1}, inbox={"replay_max": 20}).start()
    status = [sys.executable, "-m", "pmq.ctl", "status", "--json", "-c", str(node.config_path)]
    env = node.env(
        TEST_PMQ_WS_URL=node.ws_url,
        TEST_PMQ_INGEST_URL=node.ingest_url,
        TEST_PMQ_JWT_SECRET=SECRET,
        TEST_PMQ_STATUS=json.dumps(status),
    )
    files = sorted((CLIENT / "test").glob("*.test.mjs"))
    run = subprocess.Popen(
        node_test_command(files), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env, cwd=node.tmp, start_new_session=True,
    )
    try:
        output, _ = run.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)  # the runner and its process per test file
        output, _ = run.communicate()
        pytest.fail(f"node --test did not finish within {TIMEOUT} s:\n{output}")
    assert run.returncode == 0, output
