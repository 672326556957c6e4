"""Two checkouts of PMQ side by side in one sitting: fresh nodes in turn, the same load.

    python -m bench.ab BEFORE_DIR AFTER_DIR [--pairs 3] [-u 5000] [-m 50000] [--out FILE]

This machine's speed swings by up to 2x within an hour, so a change is judged only against
the code before it, measured in the same minutes. For each pair (order A, B then B, A, and
so on), each checkout runs its own ``bench.hotpath`` (the internals it drives differ between
checkouts), then a fresh node of that checkout (its own ``bench.run_node``: 2 socket
workers, 1 task worker, SQLite, a private Redis) is loaded by this tree's ``bench.unicast``
and ``bench.ingest``, so both see the same load generator. Prints one JSON document: every
run, and per checkout the median (and range) of each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import emit

HERE = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def python_in(checkout: Path) -> dict[str, str]:
    """The environment that makes ``python -m pmq...`` and ``-m bench...`` import ``checkout``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PMQ_")}
    env["PYTHONPATH"] = str(checkout)
    return env


def run_json(argv: list[str], checkout: Path, timeout: float) -> dict[str, Any]:
    """Run a bench module of ``checkout`` to its end; its stdout is one JSON document."""
    done = subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=checkout,
        env=python_in(checkout),
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed in {checkout}: {done.stderr.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


class Node:
    """A fresh node of ``checkout`` (its bench.run_node), stopped on exit."""

    def __init__(self, checkout: Path) -> None:
        self.checkout = checkout
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    def __enter__(self) -> Node:
        argv = ["bench.run_node", "--workers", "2", "--task-workers", "1"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *argv, "--private-redis", str(free_port())],
            cwd=self.checkout,
            env=python_in(self.checkout),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # run_node prints one line once the node is ready
        if not line:
            raise RuntimeError(f"the node of {self.checkout} did not start")
        self.info = json.loads(line)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def one_run(checkout: Path, args: argparse.Namespace) -> dict[str, Any]:
    hotpath = run_json(["bench.hotpath"], checkout, 600)
    with Node(checkout) as node:
        config = node.info["config"]
        unicast = run_json(
            ["bench.unicast", "--config", config, "-u", str(args.users),
             "-m", str(args.messages), "-C", "64", "-p", "2", "--client", "raw"],
            HERE, 900,
        )
        ingest = run_json(
            ["bench.ingest", "--config", config, "-m", str(args.messages), "-C", "64"],
            HERE, 900,
        )
    return {
        "checkout": str(checkout),
        "at": time.strftime("%H:%M:%S"),
        "load_before": os.getloadavg()[0],
        "hotpath_request_us": hotpath["request_cpu_us"],
        "hotpath_relay_us": hotpath["relay_cpu_us"],
        "unicast_delivered_per_s": unicast["throughput_delivered_per_s"],
        "unicast_node_cpu_ms_per_msg": unicast["server_cpu_ms_per_message"],
        "unicast_p99_ms": unicast["latency_publish_to_receive_ms"]["p99"],
        "unicast_lost": unicast["lost"],
        "unicast_duplicates": unicast["duplicates"],
        "ingest_per_s": ingest["requests_per_s"],
        "ingest_node_cpu_ms_per_req": ingest["server_cpu_ms_per_request"],
        "ingest_p99_ms": ingest["latency_ms"]["p99"],
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    figures = [k for k, v in runs[0].items() if isinstance(v, int | float) and k != "load_before"]
    return {
        key: {
            "median": round(statistics.median(r[key] for r in runs), 3),
            "range": [min(r[key] for r in runs), max(r[key] for r in runs)],
        }
        for key in figures
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", type=Path, help="checkout A (the code before the change)")
    parser.add_argument("after", type=Path, help="checkout B")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("-u", "--users", type=int, default=5_000)
    parser.add_argument("-m", "--messages", type=int, default=50_000)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    checkouts = [args.before.resolve(), args.after.resolve()]
    runs: list[dict[str, Any]] = []
    for pair in range(args.pairs):
        for checkout in checkouts if pair % 2 == 0 else checkouts[::-1]:
            runs.append(one_run(checkout, args))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    result = {
        "bench": "ab",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "runs": runs,
        "summary": {
            str(c): summary([r for r in runs if r["checkout"] == str(c)]) for c in checkouts
        },
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    emit(result)


if __name__ == "__main__":
    main()
