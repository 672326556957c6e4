"""``pmqctl`` and ``pmq``: thin command-line entry points over pmq.workers and pmq.store.

Exit codes (pmq.errors.ExitCode): 0 ok, 1 failure, 3 not running.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import typing
from collections.abc import Callable, Sequence

import orjson
import psutil

from pmq import __version__, configload
from pmq import config as configuration
from pmq import log as logsetup
from pmq.errors import AlreadyRunning, ExitCode, NotRunning, PMQError
from pmq.workers import metricsdir, pidfile
from pmq.workers.channel import request
from pmq.workers.spawn import WITHDRAW_WAIT_SECONDS

Command = Callable[[argparse.Namespace], int]
DAEMON_READY_SECONDS = 60


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return ExitCode.FAILURE
    try:
        return int(args.func(args))
    except NotRunning as exc:
        print(f"pmq is not running: {exc}", file=sys.stderr)
        return ExitCode.NOT_RUNNING
    except PMQError as exc:
        print(f"pmqctl {args.command}: {exc}", file=sys.stderr)
        return ExitCode.FAILURE


def main_pmq(argv: Sequence[str] | None = None) -> int:
    """``pmq [-c PATH]``: run a node in the foreground (same as ``pmqctl start``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return main(["start", *args])


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits 1 (failure), not argparse's 2: pmqctl's exit codes
    are 0, 1 and 3 only."""

    def error(self, message: str) -> typing.NoReturn:
        self.print_usage(sys.stderr)
        self.exit(ExitCode.FAILURE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """pmqctl's parser: each subcommand sets ``func``, the ``cmd_*`` that runs it."""
    parser = Parser(prog="pmqctl", description="Control a PMQ node.")
    parser.add_argument("--version", action="version", version=f"pmq {__version__}")
    sub = parser.add_subparsers(dest="command")
    _add_node_commands(sub)
    _add_data_commands(sub)
    return parser


Subparsers = argparse._SubParsersAction  # argparse names no public type for it


def _command(sub: Subparsers, name: str, func: Command, text: str) -> argparse.ArgumentParser:
    """Subcommand ``name`` running ``func``, with the ``-c/--config`` every one takes."""
    p = sub.add_parser(name, help=text, description=text)
    p.add_argument(
        "-c",
        "--config",
        help="config file (default: $PMQ_CONFIG, "
        "etc/pmq.toml, /etc/pmq/pmq.toml, built-in defaults)",
    )
    p.set_defaults(func=func)
    return p


def _add_node_commands(sub: Subparsers) -> None:
    """The commands that run, stop, reload, restart, report on or check the node."""
    start = _command(sub, "start", cmd_start, "run the node (foreground unless --daemon)")
    start.add_argument("--daemon", action="store_true", help="detach and return once ready")
    start.add_argument("--log-file", help="with --daemon: where the node logs (else discarded)")
    stop = _command(
        sub, "stop", cmd_stop, "graceful stop (SIGTERM), waiting for the master to exit"
    )
    stop.add_argument("--fast", action="store_true", help="fast stop (SIGQUIT)")
    _command(sub, "reload", cmd_reload, "reload handlers and reloadable config in every worker")
    _command(sub, "restart", cmd_restart, "rolling restart: new workers, then the old ones drain")
    status = _command(sub, "status", cmd_status, "workers, pids, uptime, connections, RSS")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument(
        "--cluster",
        action="store_true",
        help="every live node of the cluster, its workers and connections, read from Redis "
        "(needs no master on this machine)",
    )
    _command(
        sub,
        "check",
        cmd_check,
        "run every start-up check (secrets, file modes, Redis's settings, storage) and list "
        "every problem; exit 1 when there is any",
    )


def _add_data_commands(sub: Subparsers) -> None:
    """The commands on the node's data: tokens, the storage schema, dead letters."""
    token = _command(sub, "token", cmd_token, "print a client token (auth.mode = jwt)")
    token.add_argument("uid")
    token.add_argument("--groups", default="", help="comma-separated groups")
    token.add_argument("--role", default="user", choices=["user", "agent"])
    token.add_argument("--ttl", type=int, default=86400, help="seconds the token is valid")
    db = _command(sub, "db", cmd_db, "storage schema")
    db.add_argument("action", choices=["init"], help="init: create or upgrade, idempotent")
    dlq = _command(sub, "dlq", cmd_dlq, "dead letters: storage items the store could never write")
    dlq.add_argument(
        "action",
        choices=["list", "retry", "drop"],
        help="list: each with its error; retry: back to the tail of its queue; drop: delete",
    )
    dlq.add_argument("ids", nargs="*", help="retry/drop: the ids `list` shows")
    dlq.add_argument("--all", action="store_true", help="retry/drop: every dead letter")
    dlq.add_argument("--json", action="store_true", help="list: print JSON")
    dlq.add_argument("--limit", type=int, default=0, help="list: at most N per queue")


def load(args: argparse.Namespace) -> configuration.Config:
    config = configload.load(args.config)
    logsetup.setup(config.log)
    return config


# Commands ---------------------------------------------------------------------------
def cmd_start(args: argparse.Namespace) -> int:
    config = load(args)
    metricsdir.use(config.server.metrics_dir)  # before the imports below load the metrics
    from pmq.workers.boot import prepare
    from pmq.workers.master import serve

    config = prepare(config)
    if args.daemon:
        return daemonize(config, args.log_file)
    return serve(config)


def daemonize(config: configuration.Config, log_file: str | None) -> int:
    """Fork a detached master and return once it reports ready; 1 if a live master already
    owns the pid file or ours ended first (its own reason is in its log)."""
    from pmq.workers.master import serve

    owner = pidfile.live_master(config.server.pid_file)
    if owner is not None:
        raise AlreadyRunning(f"already running: master pid {owner} ({config.server.pid_file})")
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        os.setsid()
        if os.fork():
            os._exit(0)
        os.write(write_end, b"%d\n" % os.getpid())
        os.close(write_end)
        redirect_stdio(log_file)
        os._exit(serve(config))
    os.close(write_end)
    os.waitpid(child, 0)
    with os.fdopen(read_end) as pipe:
        master = int(pipe.readline())
    deadline = time.monotonic() + DAEMON_READY_SECONDS
    while time.monotonic() < deadline:
        if not process_alive(master):
            where = f"; see {log_file}" if log_file else ""
            print(f"pmq master pid {master} exited before it was ready{where}", file=sys.stderr)
            return ExitCode.FAILURE
        try:
            status = request(config.server.control_socket, "status", timeout=2)
        except PMQError:
            status = {}
        if status.get("ready") and status.get("pid") == master:
            print(f"pmq started: master pid {master}")
            return ExitCode.OK
        time.sleep(0.1)
    print(f"pmq did not report ready within {DAEMON_READY_SECONDS}s", file=sys.stderr)
    return ExitCode.FAILURE


def redirect_stdio(log_file: str | None) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    out = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if log_file else null
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)


def cmd_stop(args: argparse.Namespace) -> int:
    config = load(args)
    pid = pidfile.live_master(config.server.pid_file)
    if pid is None:
        raise NotRunning(f"no live master in {config.server.pid_file}")
    os.kill(pid, signal.SIGQUIT if args.fast else signal.SIGTERM)
    # Two stages of graceful_timeout (socket workers, then task workers), and the removal
    # of what a killed socket worker left in Redis.
    deadline = time.monotonic() + 2 * config.server.graceful_timeout + WITHDRAW_WAIT_SECONDS + 5
    while time.monotonic() < deadline:
        if not process_alive(pid):
            print(f"pmq stopped (master pid {pid})")
            return ExitCode.OK
        time.sleep(0.05)
    print(f"master pid {pid} still running after the graceful timeout", file=sys.stderr)
    return ExitCode.FAILURE


def process_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cmd_reload(args: argparse.Namespace) -> int:
    config = load(args)
    request(config.server.control_socket, "reload", timeout=30)
    print("reloaded")
    return ExitCode.OK


def cmd_restart(args: argparse.Namespace) -> int:
    config = load(args)
    request(config.server.control_socket, "restart", timeout=600)
    print("restarted every worker")
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    config = load(args)
    if args.cluster:
        return cluster_status(config, args.json)
    status = request(config.server.control_socket, "status", timeout=10)
    status.pop("ok", None)
    if args.json:
        print(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_status(status))
    return ExitCode.OK


def cluster_status(config: configuration.Config, as_json: bool) -> int:
    """``status --cluster``: 0 when Redis answered (even with no live node), else 1."""
    from redis.exceptions import RedisError

    from pmq.domain import cluster

    try:
        view = cluster.snapshot(config)
    except (RedisError, OSError) as exc:
        print(f"pmqctl status --cluster: redis does not answer: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    if as_json:
        print(orjson.dumps(view, option=orjson.OPT_INDENT_2).decode())
    else:
        print(cluster.format_snapshot(view))
    return ExitCode.OK


def format_status(status: dict[str, object]) -> str:
    lines = [
        f"node {status['node']}: master pid {status['pid']}, up {duration(status['uptime'])}, "
        f"rss {megabytes(status['rss'])}, {'ready' if status['ready'] else 'starting'}, "
        f"{status['restarts']} worker restarts",
        f"{'KIND':<8}{'#':>3}{'PID':>9}{'UPTIME':>10}{'RSS':>10}{'CONNS':>8}  STATE",
    ]
    workers = status.get("workers") or []
    assert isinstance(workers, list)
    for w in workers:
        state = "retiring" if w["retiring"] else ("ready" if w["ready"] else "starting")
        conns = w.get("connections", "-") if w["kind"] == "socket" else "-"
        lines.append(
            f"{w['kind']:<8}{w['index']:>3}{w['pid']:>9}{duration(w['uptime']):>10}"
            f"{megabytes(w['rss']):>10}{conns!s:>8}  {state}"
        )
    queues = next((w["queues"] for w in workers if w.get("queues")), None)
    if queues:
        lines.append("queues: " + ", ".join(f"{name} {depth}" for name, depth in queues.items()))
    hooks = [w["webhooks"] for w in workers if w.get("webhooks")]
    if hooks:
        totals = {k: sum(h[k] for h in hooks) for k in ("delivered", "failed", "dropped")}
        lines.append(
            f"webhooks: {totals['delivered']} events delivered, {totals['failed']} POSTs "
            f"failed, {totals['dropped']} events dropped"
        )
    return "\n".join(lines)


def duration(seconds: object) -> str:
    s = int(float(str(seconds)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def megabytes(value: object) -> str:
    return f"{int(str(value)) / 2**20:.1f}M"


def cmd_check(args: argparse.Namespace) -> int:
    from pmq.workers import startcheck

    report = startcheck.survey(load(args))
    for problem in report.problems:
        print(problem)
    if report.problems:
        print(f"pmqctl check: {len(report.problems)} problem(s)", file=sys.stderr)
        return ExitCode.FAILURE
    print("ok: " + ", ".join(report.checked))
    return ExitCode.OK


def cmd_token(args: argparse.Namespace) -> int:
    from pmq.domain.jwtauth import mint_token, resolve_jwt_secret

    config = load(args)
    groups = [g for g in args.groups.split(",") if g]
    try:
        token = mint_token(resolve_jwt_secret(config), args.uid, groups, args.role, args.ttl)
    except ValueError as exc:  # a uid out of range, an unknown role
        print(f"pmqctl token: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    print(token)
    return ExitCode.OK


def cmd_db(args: argparse.Namespace) -> int:
    from pmq.store import open_store

    config = load(args)
    store = open_store(config.storage)
    try:
        store.init_schema()
    finally:
        store.close()
    print(f"schema ready ({config.storage.shards} message shards)")
    return ExitCode.OK


def cmd_dlq(args: argparse.Namespace) -> int:
    """0 when done; 1 when Redis does not answer, or an id names no dead letter (then
    nothing is retried or dropped), or retry/drop names neither ids nor --all."""
    from redis.exceptions import RedisError

    from pmq.domain.cluster import connect_sync
    from pmq.redis.keys import Keys
    from pmq.tasks import deadletter

    config = load(args)
    if args.action != "list" and not (args.ids or args.all):
        print(f"pmqctl dlq {args.action}: name ids, or --all", file=sys.stderr)
        return ExitCode.FAILURE
    keys = Keys(config.redis.prefix, config.redis.buckets)
    try:
        client = connect_sync(config.redis)
        try:
            letters = deadletter.read(client, keys, args.limit if args.action == "list" else 0)
            if args.action == "list":
                if args.json:
                    print(orjson.dumps([x.view() for x in letters]).decode())
                else:
                    print(deadletter.format_letters(letters) or "no dead letters")
                return ExitCode.OK
            chosen, missing = (letters, []) if args.all else deadletter.select(letters, args.ids)
            if missing:
                print(f"pmqctl dlq: no dead letter {', '.join(missing)}", file=sys.stderr)
                return ExitCode.FAILURE
            act = deadletter.retry if args.action == "retry" else deadletter.drop
            print(f"{args.action}: {act(client, keys, chosen)} of {len(chosen)} dead letters")
            return ExitCode.OK
        finally:
            client.close()
    except (RedisError, OSError) as exc:
        print(f"pmqctl dlq: redis does not answer: {exc}", file=sys.stderr)
        return ExitCode.FAILURE


if __name__ == "__main__":
    sys.exit(main())
