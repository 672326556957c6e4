"""Unsafe settings refused at start, ``pmqctl check``, and the modes of PMQ's private files.

Every refusal goes through a real ``pmqctl start`` (tests.helpers.Node), which must exit 1
before serving and name the key at fault. ``pmqctl check`` runs the same checks and must list
every problem of a config at once.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pmq.workers import startcheck
from tests.helpers import REDIS_URL, Node, RedisServer, wait_for

SHIPPED = Path(__file__).resolve().parent.parent / "etc" / "pmq.toml"
STRONG_SECRET = "a-long-random-jwt-secret-0123456789-abcdef"
STRONG_KEY = "ingest-api-key-0123456789"


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """The umask most shells have (022), so a file PMQ left to it would be world-readable."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def failed_start(node: Node, **env: str) -> str:
    """Start ``node``, expect it to exit 1 before serving; its output."""
    node.start(wait=False, **env)
    assert node.proc is not None
    proc = node.proc
    wait_for(lambda: proc.poll() is not None or node.status(), 60, "the node to exit or serve")
    assert proc.poll() == 1, node.log()
    return node.log()


def pmqctl(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``pmqctl ARGS`` in ``cwd`` with no PMQ_ variable but ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PMQ_")}
    return subprocess.run(
        [sys.executable, "-m", "pmq.ctl", *args],
        capture_output=True, text=True, cwd=cwd, env={**clean, **env}, timeout=60,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# Refused at start -----------------------------------------------------------------------

REFUSED: list[tuple[str, dict[str, dict[str, Any]], tuple[str, ...]]] = [
    ("short jwt_secret", {"auth": {"jwt_secret": "x7" * 15 + "y"}}, ("auth.jwt_secret", "32")),
    ("CHANGE_ME jwt_secret", {"auth": {"jwt_secret": "CHANGE_ME"}}, ("auth.jwt_secret",)),
    ("any case", {"auth": {"jwt_secret": "Change-Me"}}, ("auth.jwt_secret", "placeholder")),
    ("bare word", {"auth": {"jwt_secret": "PASSWORD"}}, ("auth.jwt_secret", "placeholder")),
    (
        "long placeholder",
        {"auth": {"jwt_secret": "change-me-to-a-long-random-secret-of-yours"}},
        ("auth.jwt_secret", "placeholder"),
    ),
    ("short api_key", {"ingest": {"api_key": "k3y-0123456789a"}}, ("ingest.api_key", "16")),
    ("placeholder api_key", {"ingest": {"api_key": "changeme"}}, ("ingest.api_key",)),
    (
        "public ingest without a key",
        {"ingest": {"host": "0.0.0.0"}},
        ("ingest.api_key", "loopback"),
    ),
    (
        "webhooks.url without a secret",
        {"webhooks": {"url": "http://127.0.0.1:1/hook"}},
        ("webhooks.secret", "must be set"),
    ),
    (
        "short webhooks.secret",
        {"webhooks": {"url": "http://127.0.0.1:1/hook", "secret": "k3y-" + "s" * 20}},
        ("webhooks.secret", "32"),
    ),
    (
        "placeholder webhooks.secret",
        {"webhooks": {"url": "http://127.0.0.1:1/hook", "secret": "CHANGE_ME"}},
        ("webhooks.secret", "placeholder"),
    ),
    (
        "webhooks.url not http(s)",
        {"webhooks": {"url": "ftp://127.0.0.1/hook", "secret": STRONG_SECRET}},
        ("webhooks.url", "http"),
    ),
    (
        "require_secrets without them",
        {"server": {"require_secrets": True}, "auth": {"jwt_secret": ""}},
        ("auth.jwt_secret", "ingest.api_key", "require_secrets"),
    ),
]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("sections", "named"), [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED]
)
def test_an_unsafe_secret_fails_the_start_naming_the_key(
    make_node: Callable[..., Node], sections: dict[str, dict[str, Any]], named: tuple[str, ...]
) -> None:
    output = failed_start(make_node(**sections))
    for word in named:
        assert word in output, output
    assert "CHANGE_ME" not in output and "k3y-" not in output  # secrets are never quoted


@pytest.mark.e2e
def test_an_open_storage_file_fails_the_start(make_node: Callable[..., Node]) -> None:
    node = make_node()
    db = node.tmp / "pmq.db"
    db.touch()
    db.chmod(0o644)
    output = failed_start(node)
    assert "storage.url" in output and str(db) in output and "0644" in output, output


@pytest.mark.e2e
def test_a_public_ingest_with_a_key_and_strong_secrets_start(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(
        server={"require_secrets": True},
        ingest={"host": "0.0.0.0", "api_key": STRONG_KEY},
        auth={"jwt_secret": STRONG_SECRET},
    ).start()
    assert node.status() is not None


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"])
def test_loopback_hosts(host: str) -> None:
    assert startcheck.is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "192.168.0.1", "pmq.internal"])
def test_other_hosts_are_not_loopback(host: str) -> None:
    assert not startcheck.is_loopback(host)


# The shipped [env.prod] ------------------------------------------------------------------


def test_prod_overlay_ships_no_working_secret(tmp_path: Path) -> None:
    shutil.copy(SHIPPED, tmp_path / "pmq.toml")
    run = pmqctl(tmp_path, "start", "-c", "pmq.toml", PMQ_ENV="prod")
    assert run.returncode == 1, run.stderr
    for key in ("auth.jwt_secret", "ingest.api_key", "storage.url"):
        assert key in run.stderr, run.stderr


def test_prod_overlay_passes_once_the_secrets_are_set(tmp_path: Path) -> None:
    """With the secrets, a real storage URL and a Redis with its AOF on (the overlay's
    redis.require_aof), ``pmqctl check`` finds nothing left."""
    shutil.copy(SHIPPED, tmp_path / "pmq.toml")
    home = tmp_path / "redis"
    home.mkdir()
    redis = RedisServer(home, "--appendonly", "yes").start()
    try:
        run = pmqctl(
            tmp_path, "check", "-c", "pmq.toml",
            PMQ_ENV="prod", PMQ_AUTH_JWT_SECRET=STRONG_SECRET, PMQ_INGEST_API_KEY=STRONG_KEY,
            PMQ_STORAGE_URL=f"sqlite:///{tmp_path}/pmq.db", PMQ_REDIS_URL=redis.url,
        )  # fmt: skip
    finally:
        redis.stop()
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("ok: "), run.stdout


# pmqctl check ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_check_lists_every_problem_at_once(make_node: Callable[..., Node], tmp_path: Path) -> None:
    home = tmp_path / "redis"
    home.mkdir()
    evicting = RedisServer(home, "--maxmemory-policy", "allkeys-lru").start()
    try:
        node = make_node(
            auth={"jwt_secret": "too-short"},
            ingest={"host": "0.0.0.0"},
            redis={"url": evicting.url},
        )
        db = node.tmp / "pmq.db"
        db.touch()
        db.chmod(0o640)
        run = node.ctl("check")
    finally:
        evicting.stop()
    assert run.returncode == 1, run.stdout + run.stderr
    problems = run.stdout.splitlines()
    assert [p.split(":")[0] for p in problems] == [
        "auth.jwt_secret", "ingest.api_key", "storage.url", "maxmemory-policy"
    ], run.stdout  # fmt: skip
    assert "4 problem" in run.stderr


def test_check_names_a_store_that_does_not_answer(tmp_path: Path) -> None:
    (tmp_path / "pmq.toml").write_text(
        f'[redis]\nurl = "{REDIS_URL}"\n[storage]\nurl = "mysql://root@127.0.0.1:1/pmq"\n'
    )
    run = pmqctl(tmp_path, "check", "-c", "pmq.toml")
    assert run.returncode == 1, run.stdout + run.stderr
    secret, store = run.stdout.splitlines()
    assert secret.startswith("auth.jwt_secret: must be set when storage is not SQLite"), secret
    assert store.startswith("storage.url: the store does not answer"), store


@pytest.mark.e2e
def test_check_passes_a_running_nodes_config(make_node: Callable[..., Node]) -> None:
    node = make_node().start()
    run = node.ctl("check")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("ok: secrets, file modes"), run.stdout


# File modes -----------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_fresh_node_keeps_its_files_private(make_node: Callable[..., Node]) -> None:
    """The database, its -wal and -shm and the generated JWT secret are created 0600."""
    node = make_node(auth={"jwt_secret": ""}).start()
    files = [node.tmp / name for name in ("pmq.db", "pmq.db-wal", "pmq.db-shm", "pmq.jwt-secret")]
    wait_for(lambda: all(f.exists() for f in files), 10, "the store's files")
    assert {f.name: oct(mode(f)) for f in files} == {f.name: "0o600" for f in files}


def test_the_unit_sets_a_private_umask() -> None:
    unit = (SHIPPED.parent / "systemd" / "pmq.service").read_text()
    assert "\nUMask=0077\n" in unit
