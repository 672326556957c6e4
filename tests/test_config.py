"""Pure unit tests of the settings (pmq/config.py, pmq/configload.py): defaults, the shipped
file, overlays, env vars, checks."""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from pathlib import Path

import pytest

from pmq import config
from pmq.config import Config
from pmq.configload import load, shard_ranges
from pmq.errors import ConfigError

SHIPPED = Path(__file__).resolve().parent.parent / "etc" / "pmq.toml"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pmq.toml"
    path.write_text(text)
    return str(path)


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    return load(write(tmp_path, text), environ={} if environ is None else environ)


# Defaults -------------------------------------------------------------------------------


def test_empty_file_gives_every_default(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    cfg = load(path, environ={})
    node = socket.gethostname()
    assert cfg.path == path
    assert cfg.server.node == node
    assert cfg.server.pid_file == f"/tmp/pmq-{node}.pid"
    assert cfg.server.control_socket == f"/tmp/pmq-{node}.sock"
    assert cfg.server.workers == (os.cpu_count() or 1)
    assert cfg.server.host == "0.0.0.0"
    assert cfg.server.port == 9501
    assert cfg.server.task_workers == 2
    assert cfg.server.graceful_timeout == 10.0
    assert cfg.server.worker_timeout == 30.0
    assert (cfg.server.max_frame, cfg.server.rate, cfg.server.max_pending) == (65536, 50, 1048576)
    assert (cfg.ingest.host, cfg.ingest.port, cfg.ingest.api_key) == ("127.0.0.1", 9502, "")
    assert cfg.ingest.max_body == 65536
    assert cfg.redis.url == "redis://127.0.0.1:6379/0"
    assert cfg.redis.prefix == "pmq:"
    assert cfg.storage.url == "sqlite:///var/pmq.db"
    assert cfg.storage.shards == 128
    assert cfg.storage.shard_map == {}
    assert (cfg.auth.mode, cfg.auth.jwt_secret, cfg.auth.url) == ("jwt", "", "")
    assert (cfg.auth.cache_ttl, cfg.auth.cache_jitter) == (3650, 3000)
    assert (cfg.heartbeat.interval, cfg.heartbeat.timeout) == (25.0, 60.0)
    assert cfg.inbox == config.InboxConfig(86400, 60, 1296000)
    assert cfg.broadcast == config.BroadcastConfig(900, 20)
    assert cfg.unread.push_interval == 1.0
    assert cfg.cs == config.CsConfig(5, 1800)
    assert cfg.log == config.LogConfig("info", False)


def test_explicit_node_drives_pid_file_and_socket(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[server]\nnode = "edge-1"\nworkers = 3\n')
    assert cfg.server.node == "edge-1"
    assert cfg.server.pid_file == "/tmp/pmq-edge-1.pid"
    assert cfg.server.control_socket == "/tmp/pmq-edge-1.sock"
    assert cfg.server.workers == 3


def test_explicit_pid_file_drives_socket(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[server]\npid_file = "/run/pmq/master.pid"\n')
    assert cfg.server.pid_file == "/run/pmq/master.pid"
    assert cfg.server.control_socket == "/run/pmq/master.sock"


def test_missing_file_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load(str(tmp_path / "nope.toml"), environ={})


def test_invalid_toml_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_text(tmp_path, "[server\n")


def test_pmq_config_variable_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 9700\n")
    cfg = load(environ={"PMQ_CONFIG": path})
    assert cfg.path == path
    assert cfg.server.port == 9700


# The shipped file -----------------------------------------------------------------------


def test_shipped_file_lists_every_key_with_its_default() -> None:
    with SHIPPED.open("rb") as f:
        raw = tomllib.load(f)
    raw.pop("env")
    assert set(raw) == set(config.SECTIONS)
    for section, cls in config.SECTIONS.items():
        defaults = dataclasses.asdict(cls())
        assert raw[section] == defaults, section


def test_shipped_file_equals_the_defaults(tmp_path: Path) -> None:
    shipped = load(str(SHIPPED), environ={})
    empty = load_text(tmp_path, "")
    assert dataclasses.replace(shipped, path="") == dataclasses.replace(empty, path="")


@pytest.mark.parametrize("env", ["dev", "test", "prod"])
def test_shipped_overlays_load(env: str) -> None:
    cfg = load(str(SHIPPED), environ={"PMQ_ENV": env})
    assert isinstance(cfg, Config)


def test_shipped_dev_and_prod_overlays() -> None:
    dev = load(str(SHIPPED), environ={"PMQ_ENV": "dev"})
    assert dev.log.level == "debug"
    assert (dev.server.workers, dev.server.task_workers) == (1, 1)
    prod = load(str(SHIPPED), environ={"PMQ_ENV": "prod"})
    assert prod.storage.url.startswith("mysql://")
    assert prod.log.json is True
    assert prod.auth.mode == "jwt" and prod.server.require_secrets is True  # no secret ships
    assert prod.redis.require_aof is True  # production refuses a Redis without its AOF
    assert dev.redis.require_aof is False and dev.redis.durability == "none"


# Overlays -------------------------------------------------------------------------------

OVERLAY = """
[server]
port = 9600
rate = 10

[log]
level = "warning"

[env.dev.server]
port = 9601

[env.dev.log]
json = true

[env.dev.cs]
idle_seconds = 60
"""


def test_overlay_merges_only_the_keys_it_names(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, OVERLAY, {"PMQ_ENV": "dev"})
    assert cfg.server.port == 9601  # overlay wins
    assert cfg.server.rate == 10  # top level kept
    assert cfg.server.task_workers == 2  # default kept
    assert cfg.log == config.LogConfig("warning", True)
    assert cfg.cs.idle_seconds == 60  # section only in the overlay
    assert cfg.cs.max_sessions_per_agent == 5


def test_overlay_unused_without_pmq_env(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, OVERLAY)
    assert cfg.server.port == 9600
    assert cfg.log.json is False
    assert cfg.cs.idle_seconds == 1800


def test_inline_overlay_table(tmp_path: Path) -> None:
    text = "[env]\ndev = { server = { port = 9602 } }\n"
    assert load_text(tmp_path, text, {"PMQ_ENV": "dev"}).server.port == 9602


def test_unknown_env_name_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PMQ_ENV=staging"):
        load_text(tmp_path, OVERLAY, {"PMQ_ENV": "staging"})


def test_overlay_not_a_table_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"env\.dev"):
        load_text(tmp_path, "[env]\ndev = 1\n", {"PMQ_ENV": "dev"})


def test_env_not_a_table_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="env: must be a table"):
        load_text(tmp_path, "env = 1\n")


def test_overlay_unknown_key_is_config_error(tmp_path: Path) -> None:
    text = "[env.dev.server]\nprot = 1\n"
    with pytest.raises(ConfigError, match=r"server\.prot"):
        load_text(tmp_path, text, {"PMQ_ENV": "dev"})


# Environment variables ------------------------------------------------------------------


def test_environment_overrides_parsed_by_type(tmp_path: Path) -> None:
    environ = {
        "PMQ_SERVER_PORT": "9601",
        "PMQ_LOG_JSON": "true",
        "PMQ_AUTH_CACHE_TTL": "5",
        "PMQ_HEARTBEAT_INTERVAL": "10",
        "PMQ_SERVER_TASK_WORKERS": "4",
        "PMQ_STORAGE_SHARD_MAP": '{"0": "mysql://a@h:3306/d"}',
    }
    cfg = load_text(tmp_path, "", environ)
    assert cfg.server.port == 9601 and type(cfg.server.port) is int
    assert cfg.log.json is True
    assert cfg.auth.cache_ttl == 5 and type(cfg.auth.cache_ttl) is int
    assert cfg.heartbeat.interval == 10.0 and type(cfg.heartbeat.interval) is float
    assert cfg.server.task_workers == 4
    assert cfg.storage.shard_map == {"0": "mysql://a@h:3306/d"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", True), ("yes", True), ("ON", True), ("0", False), ("no", False), ("off", False)],
)
def test_environment_booleans(tmp_path: Path, text: str, expected: bool) -> None:
    assert load_text(tmp_path, "", {"PMQ_LOG_JSON": text}).log.json is expected


def test_environment_wins_over_file_and_overlay(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, OVERLAY, {"PMQ_ENV": "dev", "PMQ_SERVER_PORT": "9700"})
    assert cfg.server.port == 9700
    assert cfg.server.rate == 10


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PMQ_SERVER_PORT", "high"),
        ("PMQ_SERVER_PORT", "9501.5"),
        ("PMQ_LOG_JSON", "maybe"),
        ("PMQ_HEARTBEAT_TIMEOUT", "soon"),
        ("PMQ_STORAGE_SHARD_MAP", "{not json"),
    ],
)
def test_environment_bad_value_names_the_variable(tmp_path: Path, name: str, value: str) -> None:
    """Both the variable and the key it sets (SPEC 2: the key named)."""
    key = name[4:].lower().replace("_", ".", 1)
    with pytest.raises(ConfigError, match=rf"{name} \({key}\)"):
        load_text(tmp_path, "", {name: value})


def test_environment_shard_map_wrong_shape(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"storage\.shard_map"):
        load_text(tmp_path, "", {"PMQ_STORAGE_SHARD_MAP": '{"0": 1}'})


def test_environment_unrelated_variables_ignored(tmp_path: Path) -> None:
    environ = {"PMQ_NOSUCH_X": "1", "PMQ_ENV": "", "PATH": "/bin", "PMQX_SERVER_PORT": "1"}
    cfg = load_text(tmp_path, "", environ)
    assert cfg.server.port == 9501


def test_environment_unknown_key_in_known_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"PMQ_SERVER_NOSUCH.*server\.nosuch"):
        load_text(tmp_path, "", {"PMQ_SERVER_NOSUCH": "1"})


# Unknown names and wrong types in the file ----------------------------------------------


def test_unknown_section_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[sevrer\]: sevrer\.port"):
        load_text(tmp_path, "[sevrer]\nport = 1\n")


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.prot"):
        load_text(tmp_path, "[server]\nprot = 9501\n")


def test_section_not_a_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="server: must be a table"):
        load_text(tmp_path, "server = 1\n")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[server]\nport = "9501"\n', "server.port"),
        ("[server]\nworkers = true\n", "server.workers"),
        ("[server]\nport = 9501.0\n", "server.port"),
        ("[log]\njson = 1\n", "log.json"),
        ("[log]\nlevel = 3\n", "log.level"),
        ("[heartbeat]\ninterval = true\n", "heartbeat.interval"),
        ('[heartbeat]\ninterval = "25"\n', "heartbeat.interval"),
        ("[storage]\nshard_map = 1\n", "storage.shard_map"),
        ('[storage]\nshard_map = { "0" = 1 }\n', "storage.shard_map"),
    ],
)
def test_wrong_type_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_text(tmp_path, text)


def test_int_accepted_for_float(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "[heartbeat]\ninterval = 20\ntimeout = 50\n")
    assert cfg.heartbeat.interval == 20.0 and type(cfg.heartbeat.interval) is float
    assert type(cfg.heartbeat.timeout) is float


# Value checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[server]\nport = 0\n", "server.port"),
        ("[server]\nport = 65536\n", "server.port"),
        ("[ingest]\nport = 0\n", "ingest.port"),
        ("[server]\nworkers = -1\n", "server.workers"),
        ("[server]\ntask_workers = -1\n", "server.task_workers"),
        ("[server]\ngraceful_timeout = 0\n", "server.graceful_timeout"),
        ("[server]\nmax_frame = 10\n", "server.max_frame"),
        ('[server]\nnode = "a b"\n', "server.node"),
        ("[heartbeat]\ninterval = 60\ntimeout = 60\n", "heartbeat.interval"),
        ("[heartbeat]\ninterval = 90\n", "heartbeat.interval"),
        ("[heartbeat]\ninterval = 0\n", "heartbeat.interval"),
        ('[auth]\nmode = "http"\n', "auth.url"),
        ('[auth]\nmode = "oauth"\n', "auth.mode"),
        ('[storage]\nurl = "postgres://h/db"\n', "storage.url"),
        ('[storage]\nurl = "sqlite://var/pmq.db"\n', "storage.url"),
        ("[storage]\nshards = 0\n", "storage.shards"),
        ('[redis]\nurl = "http://127.0.0.1:6379"\n', "redis.url"),
        ('[redis]\ndurability = "fsync"\n', "redis.durability"),
        ("[redis]\ndurability = 1\n", "redis.durability"),
        ("[redis]\nwait_replicas = -1\n", "redis.wait_replicas"),
        ('[redis]\nrequire_aof = "yes"\n', "redis.require_aof"),
        ('[log]\nlevel = "loud"\n', "log.level"),
        ('[webhooks]\nurl = "ftp://site.example/hook"\n', "webhooks.url"),
        ('[webhooks]\nurl = "site.example/hook"\n', "webhooks.url"),
        ('[webhooks]\nevents = ["user.online", "user.away"]\n', "webhooks.events"),
        ("[webhooks]\nbatch = 101\n", "webhooks.batch"),
        ("[webhooks]\nretry_seconds = 0\n", "webhooks.retry_seconds"),
    ],
)
def test_bad_value_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_text(tmp_path, text)


def test_good_values_pass_checks(tmp_path: Path) -> None:
    text = """
[auth]
mode = "http"
url = "http://127.0.0.1/check"

[storage]
url = "mysql://u:p@db:3306/pmq"

[redis]
url = "unix:///run/redis.sock"

[log]
level = "WARNING"
"""
    cfg = load_text(tmp_path, text)
    assert cfg.auth.url == "http://127.0.0.1/check"
    assert cfg.storage.url == "mysql://u:p@db:3306/pmq"


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.port = 1  # type: ignore[misc]


# storage.shard_map ------------------------------------------------------------------------


def test_shard_map_ranges_load(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        '[storage]\nshards = 128\n[storage.shard_map]\n"0-63" = "mysql://u@a/db1"\n'
        '"64-126" = "mysql://u@b/db2"\n"127" = "mysql://u@b/db2"\n',
    )
    assert shard_ranges(cfg.storage.shard_map, 128) == [
        (0, 63, "mysql://u@a/db1"),
        (64, 126, "mysql://u@b/db2"),
        (127, 127, "mysql://u@b/db2"),
    ]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ('"0-8" = "mysql://u@a/db"', r"shard_map\.'0-8'.*0\.\.7"),
        ('"3-1" = "mysql://u@a/db"', r"shard_map\.'3-1'.*0\.\.7"),
        ('"x" = "mysql://u@a/db"', r"shard_map\.'x'.*range"),
        ('"0-3" = "sqlite:///x.db"', r"shard_map\.'0-3'.*mysql://"),
        ('"0-3" = "mysql://u@a/db"\n"3-5" = "mysql://u@b/db"', "0-3 and 3-5 overlap"),
    ],
)
def test_shard_map_bad_entries_name_the_key(tmp_path: Path, entries: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_text(tmp_path, f"[storage]\nshards = 8\n[storage.shard_map]\n{entries}\n")


# redis: a cluster and its buckets -------------------------------------------------------


def test_cluster_url_implies_cluster_and_buckets(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[redis]\nurl = "redis+cluster://10.0.0.1:7000"\n')
    assert cfg.redis.cluster is True and cfg.redis.buckets == config.CLUSTER_BUCKETS
    single = load_text(tmp_path, "")
    assert single.redis.cluster is False and single.redis.buckets == 1
    explicit = load_text(tmp_path, "[redis]\ncluster = true\nbuckets = 64\n")
    assert explicit.redis.buckets == 64


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[redis]\nprefix = "pmq:{x}:"\n', r"redis\.prefix"),
        ("[redis]\nbuckets = 20000\n", r"redis\.buckets"),
        ("[redis]\nbuckets = -1\n", r"redis\.buckets"),
    ],
)
def test_bad_redis_layout_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_text(tmp_path, text)
