"""End-to-end: the master and its workers as real processes (docs/protocol.md, "Processes
and control")."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

import pmq
from pmq import ctl
from pmq.redis.keys import Keys
from pmq.workers import base
from tests.helpers import Ingest, MysqlDatabase, Node, toml_value, wait_for, wait_for_async

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def ws_connect(node: Node, uid: str = "1") -> Iterator[ClientConnection]:
    with connect(f"{node.ws_url}?token={node.token(uid)}", open_timeout=5) as ws:
        hello = json.loads(ws.recv(timeout=5))
        assert hello["type"] == "hello" and hello["uid"] == uid
        yield ws


def ping(ws: ClientConnection, request_id: str = "p1") -> dict:
    ws.send(json.dumps({"id": request_id, "action": "ping", "data": {}}))
    while True:
        frame = json.loads(ws.recv(timeout=5))
        if frame.get("type") == "reply":
            return frame


def healthz(node: Node) -> int:
    try:
        with urllib.request.urlopen(f"{node.ingest_url}/healthz", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def gone(pid: int) -> bool:
    """Reaped, not merely a zombie: a killed worker's thread-group leader turns zombie while
    its other threads still exit, and its sockets stay open until the last one has."""
    return not psutil.pid_exists(pid)


def titles(node: Node) -> list[str]:
    return sorted(p.cmdline()[0] for p in node.processes())


def test_start_names_processes_and_serves(make_node):
    node = make_node().start()
    assert titles(node) == sorted(
        [
            f"pmq: master [{node.name}]",
            f"pmq: socket worker #1 [{node.name}]",
            f"pmq: socket worker #2 [{node.name}]",
            f"pmq: task worker #1 [{node.name}]",
        ]
    )
    assert Path(node.pid_file).read_text().strip() == str(node.master_pid())
    with ws_connect(node) as ws:
        reply = ping(ws)
        assert reply["code"] == 200 and reply["id"] == "p1" and reply["data"]["ts"] > 0
    assert healthz(node) == 200


def test_master_never_loads_worker_code(make_node):
    node = make_node().start()
    loaded = node.status()["modules"]
    assert "pmq.workers.master" in loaded
    for forbidden in ("pmq.handlers", "pmq.reactor", "pmq.tasks", "pmq.workers.socket",
                      "pmq.workers.task"):
        assert not [m for m in loaded if m == forbidden or m.startswith(forbidden + ".")]


def test_killed_socket_worker_is_replaced_and_port_keeps_serving(make_node):
    node = make_node().start()
    victim = node.workers("socket")[0]
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for(lambda: gone(victim["pid"]), 5, "the killed worker to die")
    with ws_connect(node) as ws:  # the other worker serves meanwhile
        assert ping(ws)["code"] == 200

    def replaced():
        same_slot = [w for w in node.workers("socket") if w["index"] == victim["index"]]
        return same_slot and same_slot[0]["pid"] != victim["pid"] and same_slot[0]["ready"]

    wait_for(replaced, 10, "the killed worker to be replaced")
    assert node.status()["restarts"] == 1
    for _ in range(6):  # SO_REUSEPORT spreads these over both workers
        with ws_connect(node) as ws:
            assert ping(ws)["code"] == 200


def test_kill_9_master_leaves_no_process(make_node):
    node = make_node().start()
    assert len(node.processes()) == 4
    node.signal(signal.SIGKILL)
    wait_for(lambda: not node.processes(), 3, "every worker to leave after the master died")


def test_sigterm_closes_clients_1001_and_exits_clean(make_node):
    node = make_node().start()
    with ws_connect(node) as ws, pytest.raises(ConnectionClosed) as closed:
        node.signal(signal.SIGTERM)
        ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert node.wait_exit(20) == 0
    assert not Path(node.pid_file).exists()
    assert not node.processes()


def test_hup_keeps_clients_connected(make_node):
    node = make_node().start()
    with ws_connect(node) as ws:
        pids = sorted(w["pid"] for w in node.workers())
        node.signal(signal.SIGHUP)
        result = node.ctl("reload")  # also waits for every worker to answer
        assert result.returncode == 0, result.stderr
        assert ping(ws, "after-hup")["code"] == 200
        assert sorted(w["pid"] for w in node.workers()) == pids


def test_reload_with_broken_handler_keeps_old_code(make_node, tmp_path):
    # Run the node from a copy of the package so the test can break a handler file.
    code = tmp_path / "code"
    shutil.copytree(Path(pmq.__file__).parent, code / "pmq",
                    ignore=shutil.ignore_patterns("__pycache__"))
    node = make_node(inbox={"replay_max": 1})
    node_env = {"PYTHONPATH": str(code)}
    node.start(**node_env)
    site = Ingest(node)
    for n in range(3):
        assert site.publish({"to": 5, "kind": "notice", "body": {"n": n}})[0] == 202
    site.close()
    with ws_connect(node) as ws:
        handler = code / "pmq" / "handlers" / "system.py"
        handler.write_text(handler.read_text() + "\ndef broken(:\n")
        rewrite_config(node, inbox={"replay_max": 1000})  # not applied: the reload fails
        result = subprocess.run(
            [sys.executable, "-m", "pmq.ctl", "reload", "-c", str(node.config_path)],
            capture_output=True, text=True, env=node.env(**node_env), timeout=60,
        )
        assert result.returncode == 1
        assert "SyntaxError" in result.stderr or "invalid syntax" in result.stderr
        assert "system.py" in result.stderr
        assert ping(ws, "still-old")["code"] == 200
    with ws_connect(node) as ws:
        assert ping(ws)["code"] == 200
    assert replayed(node, "5") == ["push", "inbox.more"]


def test_a_reload_of_a_config_file_that_cannot_be_read_fails_and_the_node_serves_on(make_node):
    """A file that is not UTF-8 (caught half-written) fails the reload with exit 1; the
    master used to die of it, taking the node down."""
    node = make_node().start()
    with open(node.config_path, "ab") as f:
        f.write(b"# \xff\n")
    result = node.ctl("reload")
    assert result.returncode == 1
    assert "invalid TOML" in result.stderr
    with ws_connect(node) as ws:
        assert ping(ws)["code"] == 200
    assert node.proc is not None and node.proc.poll() is None


def rewrite_config(node: Node, **sections: dict[str, Any]) -> None:
    for section, values in sections.items():
        node.settings.setdefault(section, {}).update(values)
    node.config_path.write_text("".join(
        f"[{section}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())
        for section, values in node.settings.items()
    ))


def replayed(node: Node, uid: str) -> list[str]:
    """The types of the frames a connect replays: pushes up to three, or an inbox.more."""
    with ws_connect(node, uid) as ws:
        types: list[str] = []
        while types.count("push") < 3 and "inbox.more" not in types:
            types.append(json.loads(ws.recv(timeout=5))["type"])
        return types


def test_reload_reads_the_reloadable_settings_again(make_node):
    """SPEC 1: HUP re-reads the reloadable parts of the config (it used to re-import the
    handlers only): a connect replays inbox.replay_max messages as the file now says, a
    setting that needs a restart is named in the log, a bad file fails the reload and
    leaves the node as it was."""
    node = make_node(inbox={"replay_max": 1})
    node.start()
    site = Ingest(node)
    for n in range(3):
        assert site.publish({"to": 5, "kind": "notice", "body": {"n": n}})[0] == 202
    site.close()
    assert replayed(node, "5") == ["push", "inbox.more"]

    rewrite_config(node, inbox={"replay_max": "many"})
    result = node.ctl("reload")
    assert result.returncode == 1
    assert "inbox.replay_max" in result.stderr
    assert replayed(node, "5") == ["push", "inbox.more"]

    rewrite_config(node, inbox={"replay_max": 1000}, server={"graceful_timeout": 7})
    result = node.ctl("reload")
    assert result.returncode == 0, result.stderr
    assert replayed(node, "5") == ["push", "push", "push"]
    assert "server.graceful_timeout changed; a restart applies it" in node.log()


def test_sd_notify_ready_reloading_stopping(make_node, tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    node = make_node()
    node.start(NOTIFY_SOCKET=path)

    def next_states() -> str:
        return sock.recv(4096).decode()

    assert "READY=1" in next_states()
    node.signal(signal.SIGHUP)
    assert "RELOADING=1" in next_states()
    assert "READY=1" in next_states()
    node.signal(signal.SIGTERM)
    assert "STOPPING=1" in next_states()
    assert node.wait_exit() == 0
    sock.close()


def test_stuck_worker_is_killed_and_replaced(make_node):
    node = make_node(server={"worker_timeout": 2}).start()
    victim = node.workers("task")[0]
    os.kill(victim["pid"], signal.SIGSTOP)  # alive but silent
    wait_for(lambda: gone(victim["pid"]), 10, "the stuck worker to be killed")
    wait_for(lambda: [w for w in node.workers("task") if w["ready"]
                      and w["pid"] != victim["pid"]], 10, "a replacement task worker")


def test_start_refuses_when_already_running(make_node):
    node = make_node().start()
    again = node.ctl("start")
    assert again.returncode == 1
    assert "already running" in again.stderr.lower()
    assert node.status()["pid"] == node.master_pid()


def test_daemon_start_refuses_when_already_running(make_node):
    """SPEC 1: a start whose pid file names a live master exits 1, --daemon too (it used to
    find the running master's control socket ready and report it as started)."""
    node = make_node().start()
    again = node.ctl("start", "--daemon")
    assert again.returncode == 1, again.stdout
    assert "already running" in again.stderr.lower()
    assert node.status()["pid"] == node.master_pid()


def test_daemon_start_fails_as_soon_as_its_master_dies(make_node):
    """A daemon whose master cannot start (its client port is taken) exits 1 once that
    master is gone, instead of polling a control socket for a minute."""
    node = make_node()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", node.port))
        taken.listen()
        started = time.monotonic()
        result = node.ctl("start", "--daemon", timeout=120)
        waited = time.monotonic() - started
    assert result.returncode == 1
    assert "exited before it was ready" in result.stderr
    assert waited < ctl.DAEMON_READY_SECONDS


def test_daemon_start_and_stop(make_node):
    node = make_node()
    started = node.ctl("start", "--daemon", "--log-file", str(node.log_path))
    assert started.returncode == 0, started.stderr + node.log()
    pid = int(started.stdout.split("master pid ")[1])
    assert node.status()["pid"] == pid
    assert node.ctl("stop").returncode == 0
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie",
             10, "the daemon to exit")


@pytest.mark.parametrize(
    "argv",
    [["bogus"], ["token"], ["token", "42", "--role", "admin"], ["token", "42", "--ttl", "x"],
     ["db"], ["db", "bogus"], ["status", "--bogus"]],
)
def test_a_usage_error_exits_1(argv, capsys):
    """SPEC 1: pmqctl's exit codes are 0, 1 and 3; argparse's own usage error is 2."""
    with pytest.raises(SystemExit) as exited:
        ctl.main(argv)
    assert exited.value.code == 1
    assert "error:" in capsys.readouterr().err


def test_a_stop_that_kills_a_stuck_socket_worker_leaves_no_route_entry(make_node, redis_client):
    """SPEC 1: after graceful_timeout the master kills what is left, and no route entry of
    the stopped node stays in Redis: a killed worker cannot remove its own, so the master
    has them removed (they used to wait for their TTL, or for a peer's sweep)."""
    node = make_node(server={"workers": 1, "graceful_timeout": 2})
    node.start()
    keys = Keys(node.prefix)
    with ws_connect(node, "501"):
        stuck = node.workers("socket")[0]["pid"]
        assert redis_client.exists(keys.user_conns("501"))
        os.kill(stuck, signal.SIGSTOP)
        node.signal(signal.SIGTERM)
        assert node.wait_exit() == 0
    log = node.log()
    assert log.count("killing it") == 1, log  # the socket worker only
    # The task workers' stage has a graceful_timeout of its own: the task worker stops
    # cleanly (it used to be killed with the socket worker, its drain cut).
    assert f"pmq: task worker #1 [{node.name}] stopped" in log, log
    assert not redis_client.exists(keys.user_conns("501"))
    assert not [w for w in redis_client.zrange(keys.workers(), 0, -1)
                if w.startswith(f"{node.name}:")]
    assert not [w for w in redis_client.hkeys(keys.cluster_workers())
                if w.startswith(f"{node.name}:")]
    assert not redis_client.keys(f"{node.prefix}*w:{node.name}*")


def test_leftover_workers_of_a_dead_master_are_stopped(make_node):
    node = make_node().start()
    stuck = node.workers("socket")[0]["pid"]
    os.kill(stuck, signal.SIGSTOP)  # cannot notice its master is gone
    node.signal(signal.SIGKILL)
    node.wait_exit()
    assert psutil.pid_exists(stuck)
    node.start()
    wait_for(lambda: gone(stuck), 5, "the leftover to be stopped")
    assert "leftover" in node.log()
    with ws_connect(node) as ws:
        assert ping(ws)["code"] == 200


def test_usr2_rolling_restart_replaces_every_worker(make_node):
    node = make_node().start()
    before = {w["pid"] for w in node.status()["workers"]}
    result = node.ctl("restart")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: not [w for w in node.status()["workers"] if w["retiring"]], 20,
             "old workers to drain")
    after = {w["pid"] for w in node.status()["workers"]}
    assert len(after) == 3 and not before & after
    with ws_connect(node) as ws:
        assert ping(ws)["code"] == 200


@pytest.mark.parametrize("script", ["pmqctl", "pmq"])
def test_the_checkouts_scripts_run_without_the_virtualenv_activated(script):
    """bin/pmqctl and bin/pmq use the checkout's .venv when run with only the system's
    Python on PATH (they used to fail on a missing library)."""
    root = Path(pmq.__file__).parent.parent
    if not (root / ".venv" / "bin" / "python").exists():
        pytest.skip("this checkout has no .venv")
    result = subprocess.run(
        [str(root / "bin" / script), "--help"], capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/")},
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_pmqctl_status_stop_and_not_running(make_node):
    node = make_node().start()
    status = node.ctl("status")
    assert status.returncode == 0, status.stderr
    for worker in node.status()["workers"]:
        assert str(worker["pid"]) in status.stdout
    as_json = json.loads(node.ctl("status", "--json").stdout)
    assert {w["kind"] for w in as_json["workers"]} == {"socket", "task"}
    assert all(w["rss"] > 0 for w in as_json["workers"])
    assert "queues: store 0, broadcast 0" in status.stdout  # read before the task worker's ready
    stop = node.ctl("stop")
    assert stop.returncode == 0, stop.stderr
    assert node.wait_exit() == 0
    for command in ("status", "stop", "reload"):
        assert node.ctl(command).returncode == 3


def test_bad_config_fails_naming_the_key(make_node):
    node = make_node(server={"wokers": 2})
    result = node.ctl("start")
    assert result.returncode == 1
    assert "server.wokers" in result.stderr


def test_db_init_twice_on_sqlite(make_node):
    node = make_node()
    for _ in range(2):
        result = node.ctl("db", "init")
        assert result.returncode == 0, result.stderr
        assert "schema ready (4 message shards)" in result.stdout
    with sqlite3.connect(node.tmp / "pmq.db") as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert {f"pmq_msg_{n}" for n in range(4)} <= tables
    assert {"pmq_broadcast", "pmq_last_read", "pmq_cs_session", "pmq_cs_message"} <= tables


def test_db_init_twice_on_mariadb(make_node):
    database = MysqlDatabase()  # skips the test when MariaDB does not answer
    database.query(f"DROP DATABASE `{database.name}`")  # db init must create it
    try:
        node = make_node(storage={"url": database.url(), "shards": 4})
        for _ in range(2):
            result = node.ctl("db", "init")
            assert result.returncode == 0, result.stderr
        tables = {row[0] for row in database.query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (database.name,),
        )}
        assert {f"pmq_msg_{n}" for n in range(4)} <= tables
        assert {"pmq_broadcast", "pmq_last_read", "pmq_cs_session", "pmq_cs_message"} <= tables
    finally:
        database.drop()


def test_a_worker_sends_its_stats_when_they_change_not_only_each_heartbeat(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pmqctl status shows what the master heard last: a change (a connection opened) is
    sent at the next look (STATS_POLL_SECONDS), not only with the once-a-second heartbeat;
    stats that did not change from those sent before the ready wait for it."""
    monkeypatch.setattr(base, "HEARTBEAT_SECONDS", 3600.0)
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)

    class Fake:
        status_fd = write_fd
        connections = 0

        def stats(self) -> dict[str, int]:
            return {"connections": self.connections}

    def events() -> list[dict[str, Any]]:
        try:
            data = os.read(read_fd, 65536)
        except BlockingIOError:
            return []
        return [json.loads(line) for line in data.splitlines()]

    async def scenario() -> list[list[dict[str, Any]]]:
        fake = Fake()
        seen = []
        beat = asyncio.create_task(
            base.Worker._heartbeat(fake, {"connections": 0})  # type: ignore[arg-type]
        )
        try:
            for _ in range(5):  # unchanged since the ready: nothing within five looks
                await asyncio.sleep(base.STATS_POLL_SECONDS)
            seen.append(events())
            fake.connections = 1
            await wait_for_async(lambda: bool(seen.append(events()) or seen[-1]), 5, "a change")
        finally:
            beat.cancel()
        return [batch for batch in seen if batch]

    try:
        sent = asyncio.run(scenario())
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert sent == [[{"event": "heartbeat", "connections": 1}]]
