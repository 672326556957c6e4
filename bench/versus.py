"""PMQ against the plain relay in one sitting: the issue's table, re-measured by our benches.

    python -m bench.versus --rounds 2 --connections 10000 --out FILE.json
    python -m bench.versus --only connects,unicast --pmq-checkout /tmp/pmq-before

Two contenders on the same machine, driven by this tree's load generators (each bench a
subprocess that prints its JSON, read back here):

- PMQ: ``bench.run_node`` of ``--pmq-checkout`` (default this checkout): 2 socket workers,
  1 task worker, SQLite, a private Redis without persistence;
- the plain relay: ``bench.plain_relay``, 2 processes on websockets relaying through a
  private redis-server without persistence, no storage.

Scenarios (N = --connections, M = --messages):

- ``connects``: ``bench.connections -n N -p 2 --hold 3 --client raw``: connects/s, node CPU
  per connect, PSS per idle connection (growth after a warm-up, over the connections made);
- ``unicast``: ``bench.unicast -u N -m M -C 64 -p 2 --client raw``: delivered msg/s, p99;
- ``ingest``: ``bench.ingest -m M -C 64``: requests/s to offline users;
- ``broadcast``: ``bench.broadcast -n N -p 2 -k 3 --spacing 2 --probes 0``: the last
  delivery (p100) of each broadcast; a run's figure is the median of its three. No probes:
  the plain relay has no ``ping`` action.

Method. Every scenario of every contender gets a FRESH node, stopped after it: connects
leaves a node that held N connections (and its warm-up); unicast and ingest leave M unacked
messages in PMQ's Redis and its task worker writing them to SQLite well after the load has
stopped, which would take CPU from whatever runs next; and each scenario should find both
contenders in the same state. The machine's speed swings from minute to minute, so the two
contenders are measured back to back per scenario, PMQ first in odd rounds and the plain
relay first in even ones; each figure is the median over the rounds. Runs that fail are
recorded with their error and left out of the medians; losses, duplicates and failed
connects are counted per run (``faults``) and named under the table.

Prints the table (markdown) with the load average and the revision; writes every run's
raw JSON, the figures, the medians and the ratios to --out (default
bench/figures/<today>/versus-<rev>-<HHMM>.json). Every bench runs in its own process group
with a time limit, after which that group is killed; nodes, Redis servers and temporary
directories are stopped and removed on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.ab import HERE, Node, python_in
from bench.common import load_average, log
from bench.run_node import free_port, redis_server
from bench.soak import stop_process

CONTENDERS = ("pmq", "plain")
NAMES = {"pmq": "PMQ", "plain": "plain relay"}
SCENARIOS = ("connects", "unicast", "ingest", "broadcast")


def median_p100(result: dict[str, Any]) -> float | None:
    values = [v for v in result["summary"]["p100_ms"] if v is not None]
    return float(statistics.median(values)) if values else None


# figure -> (scenario, how to read it from that scenario's JSON)
FIGURES: dict[str, tuple[str, Callable[[dict[str, Any]], float | None]]] = {
    "connects_per_s": ("connects", lambda r: r["connect_rate_per_s"]),
    "node_cpu_ms_per_connect": ("connects", lambda r: r["server_cpu_ms_per_connect"]),
    "pss_kib_per_idle_connection": (
        "connects",
        lambda r: r["pss_per_connection_kib"]["after_connect"],
    ),
    "unicast_delivered_per_s": ("unicast", lambda r: r["throughput_delivered_per_s"]),
    "unicast_p99_ms": ("unicast", lambda r: r["latency_publish_to_receive_ms"]["p99"]),
    "ingest_per_s": ("ingest", lambda r: r["requests_per_s"]),
    "broadcast_last_delivery_ms": ("broadcast", median_p100),
}

# scenario -> what went wrong in a run, by name (all should be 0)
FAULTS: dict[str, Callable[[dict[str, Any]], dict[str, int]]] = {
    "connects": lambda r: {"failed": r["failed"], "dropped": r["dropped"]},
    "unicast": lambda r: {
        "not accepted": r["messages"] - r["accepted"],
        "lost": r["lost"],
        "duplicates": r["duplicates"],
        "users offline": r["users_dropped_or_never_online"],
    },
    "ingest": lambda r: {"not accepted": r["messages"] - r["accepted"]},
    "broadcast": lambda r: {
        "connect failed": r["connect_failed"],
        "lost": r["summary"]["lost"],
        "duplicates": r["summary"]["duplicates"],
    },
}

# the table's rows: (label, figure, figure shown in brackets after it)
ROWS: list[tuple[str, str, str | None]] = [
    ("connects/s", "connects_per_s", None),
    ("node CPU per connect (ms)", "node_cpu_ms_per_connect", None),
    ("PSS per idle connection (KiB)", "pss_kib_per_idle_connection", None),
    ("unicast delivered msg/s (p99 ms)", "unicast_delivered_per_s", "unicast_p99_ms"),
    ("ingest to offline users req/s", "ingest_per_s", None),
    ("broadcast to {n}, last delivery (ms)", "broadcast_last_delivery_ms", None),
]


# Running the benches -----------------------------------------------------------------
def scenario_argv(scenario: str, config: str, args: argparse.Namespace) -> list[str]:
    n, m = args.connections, args.messages
    argv = {
        "connects": f"bench.connections -n {n} -p 2 --hold 3 --client raw",
        "unicast": f"bench.unicast -u {n} -m {m} -C 64 -p 2 --client raw --time-limit 180",
        "ingest": f"bench.ingest -m {m} -C 64 --time-limit 180",
        "broadcast": f"bench.broadcast -n {n} -p 2 -k 3 --spacing 2 --settle 1.5 --probes 0",
    }[scenario]
    return [*argv.split(), "--config", config]


def run_bench(argv: list[str], timeout: float) -> dict[str, Any]:
    """Run a bench of this tree in a process group of its own, its progress on our stderr;
    its stdout is one JSON document. After ``timeout`` seconds the whole group is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", *argv],
        cwd=HERE,
        env=python_in(HERE),
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"{argv[0]} still running after {timeout:g} s: killed") from None
    except BaseException:  # interrupted: take the bench's load generators down with us
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited with {proc.returncode}")
    result: dict[str, Any] = json.loads(out)
    return result


@contextlib.contextmanager
def plain_relay() -> Iterator[dict[str, Any]]:
    """The plain relay (2 processes) on a redis-server of its own without persistence, both
    stopped and their directory removed on exit; yields the relay's JSON line."""
    directory = Path(tempfile.mkdtemp(prefix="pmq-versus-"))
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    try:
        server = redis_server(port, directory, "--appendonly", "no")
    except RuntimeError:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    relay: subprocess.Popen[bytes] | None = None
    try:
        relay = subprocess.Popen(
            [sys.executable, "-m", "bench.plain_relay", "--workers", "2", "--redis", url],
            cwd=HERE,
            env=python_in(HERE),
            stdout=subprocess.PIPE,
        )
        assert relay.stdout is not None
        line = relay.stdout.readline()  # printed once its processes are forked
        if not line:
            raise RuntimeError("the plain relay did not start")
        yield json.loads(line)
    finally:
        if relay is not None:
            stop_process(relay, 30)
        stop_process(server, 10)
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def fresh_node(contender: str, checkout: Path) -> Iterator[str]:
    """A fresh node of ``contender``; yields its config path."""
    if contender == "pmq":
        with Node(checkout) as node:
            yield node.info["config"]
    else:
        with plain_relay() as info:
            yield info["config"]


def one_run(
    round_no: int, scenario: str, contender: str, args: argparse.Namespace
) -> dict[str, Any]:
    run: dict[str, Any] = {
        "round": round_no,
        "scenario": scenario,
        "contender": contender,
        "at": time.strftime("%H:%M:%S"),
        "load_before": load_average(),
    }
    log(f"round {round_no}: {scenario} on {NAMES[contender]}")
    try:
        with fresh_node(contender, args.pmq_checkout) as config:
            raw = run_bench(scenario_argv(scenario, config, args), args.timeout)
        figures = {k: read(raw) for k, (s, read) in FIGURES.items() if s == scenario}
        faults = FAULTS[scenario](raw)
    except (RuntimeError, OSError, ValueError, TimeoutError, KeyError) as exc:
        log(f"round {round_no}: {scenario} on {NAMES[contender]} failed: {exc!r}")
        return {**run, "error": repr(exc)}
    run.update(figures=figures, faults=faults, raw=raw)
    log(f"  {run['figures']} faults {run['faults']}")
    return run


# Figures -----------------------------------------------------------------------------
def medians(runs: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per contender, the median of each figure over its runs that gave one."""
    out: dict[str, dict[str, float | None]] = {}
    for contender in CONTENDERS:
        out[contender] = {}
        for key in FIGURES:
            values = [
                r["figures"][key]
                for r in runs
                if r["contender"] == contender and r.get("figures", {}).get(key) is not None
            ]
            out[contender][key] = round(statistics.median(values), 3) if values else None
    return out


def ratios(median: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in FIGURES:
        pmq, plain = median["pmq"][key], median["plain"][key]
        out[key] = round(pmq / plain, 3) if pmq is not None and plain else None
    return out


def number(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(result: dict[str, Any]) -> str:
    """The issue's table: a row per figure, PMQ, the plain relay and PMQ / plain relay, then
    the conditions and any faults."""
    median, ratio = result["median"], result["ratio"]

    def cell(values: dict[str, float | None], key: str, extra: str | None, fmt: Any) -> str:
        shown = fmt(values[key])
        return f"{shown} ({fmt(values[extra])})" if extra else shown

    def as_ratio(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    lines = ["| | PMQ | plain relay | PMQ / plain relay |", "|---|---:|---:|---:|"]
    connections = f"{result['connections']:,}"
    for label, key, extra in ROWS:
        if FIGURES[key][0] not in result["scenarios"]:
            continue
        lines.append(
            f"| {label.format(n=connections)} "
            f"| {cell(median['pmq'], key, extra, number)} "
            f"| {cell(median['plain'], key, extra, number)} "
            f"| {cell(ratio, key, extra, as_ratio)} |"
        )
    rev = result["revision"]
    load = result["load_average"]
    lines += [
        "",
        f"Medians of {result['rounds']} round(s), {result['connections']:,} connections, "
        f"{result['messages']:,} messages; PMQ at {rev['pmq']}, benches at {rev['bench']}; "
        f"{result['started']} to {result['ended']}; load average {load['before']} before, "
        f"{load['after']} after.",
    ]
    for run in result["runs"]:
        where = f"round {run['round']} {run['scenario']} on {NAMES[run['contender']]}"
        if "error" in run:
            lines.append(f"- {where}: failed: {run['error']}")
        elif any(run["faults"].values()):
            faults = ", ".join(f"{k} {v}" for k, v in run["faults"].items() if v)
            lines.append(f"- {where}: {faults}")
    return "\n".join(lines)


def revision(checkout: Path) -> str:
    """Short commit of ``checkout``, with ``+dirty`` if its pmq/ has uncommitted edits."""

    def git(*argv: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(checkout), *argv], capture_output=True, text=True, timeout=10
        )
        return done.stdout.strip()

    dirty = "+dirty" if git("status", "--short", "--", "pmq") else ""
    return (git("rev-parse", "--short", "HEAD") or "unknown") + dirty


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("-n", "--connections", type=int, default=10_000)
    parser.add_argument(
        "-m", "--messages", type=int, default=100_000, help="for unicast and ingest"
    )
    parser.add_argument(
        "--only", default=",".join(SCENARIOS), help=f"scenarios, of {','.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--pmq-checkout",
        type=Path,
        default=HERE,
        help="the PMQ tree whose node is measured (default: this checkout)",
    )
    parser.add_argument(
        "--timeout", type=float, default=0, help="seconds per bench (default: 300 + N/25)"
    )
    parser.add_argument("--out", type=Path, help="where to write the JSON")
    args = parser.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    args.pmq_checkout = args.pmq_checkout.resolve()
    args.timeout = args.timeout or 300 + args.connections / 25
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    scenarios = [s for s in SCENARIOS if s in args.only]
    result: dict[str, Any] = {
        "bench": "versus",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "revision": {"pmq": revision(args.pmq_checkout), "bench": revision(HERE)},
        "pmq_checkout": str(args.pmq_checkout),
        "rounds": args.rounds,
        "connections": args.connections,
        "messages": args.messages,
        "scenarios": scenarios,
    }
    before = load_average()
    runs: list[dict[str, Any]] = []
    for round_no in range(1, args.rounds + 1):
        order = CONTENDERS if round_no % 2 else CONTENDERS[::-1]
        for scenario in scenarios:
            for contender in order:
                runs.append(one_run(round_no, scenario, contender, args))
    result["ended"] = time.strftime("%H:%M:%S")
    result["load_average"] = {"before": before, "after": load_average()}
    result["median"] = medians(runs)
    result["ratio"] = ratios(result["median"])
    result["runs"] = runs
    result["table"] = table(result)
    out = args.out or (
        HERE
        / "bench"
        / "figures"
        / time.strftime("%Y-%m-%d")
        / f"versus-{result['revision']['pmq']}-{time.strftime('%H%M')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(result["table"], flush=True)
    log(f"JSON written to {out}")


if __name__ == "__main__":
    main()
