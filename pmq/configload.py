"""Loading the settings: the file, its overlays, the environment, types and checks.

Sources, later ones winning: built-in defaults (pmq.config), the TOML file, the
``[env.NAME]`` table picked by ``PMQ_ENV``, then ``PMQ_<SECTION>_<KEY>`` environment
variables. Unknown keys and wrong types raise :class:`ConfigError` naming the key, so a typo
never runs silently; so do values PMQ cannot run with (:func:`check`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import socket
import tomllib
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pmq.config import (
    CLUSTER_BUCKETS,
    CLUSTER_URL,
    DURABILITY,
    EVENT_TYPES,
    MAX_BUCKETS,
    MAX_WEBHOOK_BATCH,
    SECTIONS,
    Config,
)
from pmq.errors import ConfigError

DEFAULT_PATHS = ("etc/pmq.toml", "/etc/pmq/pmq.toml")
RESERVED_ENV = frozenset({"PMQ_ENV", "PMQ_CONFIG"})
ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+")  # scheme://host[:port], as browsers send


def find_path(explicit: str | None = None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The config file to read: the argument, ``$PMQ_CONFIG``, then DEFAULT_PATHS."""
    if explicit:
        return explicit
    env = environ.get("PMQ_CONFIG")
    if env:
        return env
    for candidate in DEFAULT_PATHS:
        if Path(candidate).is_file():
            return candidate
    return None


def load(path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read, merge and check the configuration; raise ConfigError naming the bad key."""
    environ = os.environ if environ is None else environ
    path = find_path(path, environ)
    raw: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        except OSError as exc:  # unreadable: a directory, no permission
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    overlays = raw.pop("env", {})
    if not isinstance(overlays, dict):
        raise ConfigError("env: must be a table of [env.NAME] tables")
    env_name = environ.get("PMQ_ENV", "")
    if env_name:
        if env_name not in overlays:
            raise ConfigError(f"PMQ_ENV={env_name}: no [env.{env_name}] table in {path}")
        if not isinstance(overlays[env_name], dict):
            raise ConfigError(f"env.{env_name}: must be a table of sections")
        raw = _merge(raw, overlays[env_name])
    raw = _merge(raw, _from_environ(environ))
    config = _build(raw, path or "")
    check(config)
    return config


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for section, values in top.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def _from_environ(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """``PMQ_SECTION_KEY=value`` variables, values parsed by the key's declared type."""
    out: dict[str, dict[str, Any]] = {}
    for name, text in environ.items():
        if not name.startswith("PMQ_") or name in RESERVED_ENV:
            continue
        section, _, key = name[4:].lower().partition("_")
        if section not in SECTIONS:
            continue
        types = typing.get_type_hints(SECTIONS[section])
        if key not in types:
            raise ConfigError(f"{name}: unknown key {section}.{key}")
        out.setdefault(section, {})[key] = _parse_env(f"{name} ({section}.{key})", text, types[key])
    return out


def _parse_env(name: str, text: str, kind: Any) -> Any:
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
        return json.loads(text)
    except ValueError:
        raise ConfigError(f"{name}: cannot parse {text!r} as {_type_name(kind)}") from None


def _build(raw: dict[str, Any], path: str) -> Config:
    sections: dict[str, Any] = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            keys = ", ".join(f"{section}.{k}" for k in values) if isinstance(values, dict) else ""
            raise ConfigError(f"unknown section [{section}]" + (f": {keys}" if keys else ""))
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: must be a table")
        cls = SECTIONS[section]
        types = typing.get_type_hints(cls)
        for key, value in values.items():
            if key not in types:
                raise ConfigError(f"unknown key {section}.{key}")
            values[key] = _typed(f"{section}.{key}", value, types[key])
        sections[section] = cls(**values)
    config = Config(**sections, path=path)
    return _resolve(config)


def _typed(name: str, value: Any, kind: Any) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    origin = typing.get_origin(kind)
    if origin is dict:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigError(f"{name}: must be a table of strings")
        return dict(value)
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}: must be a list of strings")
        return list(value)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(
            f"{name}: must be {_type_name(kind)}, got {type(value).__name__} {value!r}"
        )
    return value


def _type_name(kind: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}.get(
        kind, "a table"
    )


def _resolve(config: Config) -> Config:
    """Fill the defaults that depend on the machine or on other keys."""
    server = config.server
    node = server.node or socket.gethostname()
    pid_file = server.pid_file or f"/tmp/pmq-{node}.pid"
    control = server.control_socket or str(Path(pid_file).with_suffix(".sock"))
    metrics_dir = server.metrics_dir or str(Path(pid_file).with_suffix(".metrics"))
    workers = server.workers or os.cpu_count() or 1
    cluster = config.redis.cluster or config.redis.url.startswith(CLUSTER_URL)
    buckets = config.redis.buckets or (CLUSTER_BUCKETS if cluster else 1)
    return dataclasses.replace(
        config,
        redis=dataclasses.replace(config.redis, cluster=cluster, buckets=buckets),
        server=dataclasses.replace(
            server,
            node=node,
            pid_file=pid_file,
            control_socket=control,
            metrics_dir=metrics_dir,
            workers=workers,
        ),
    )


def shard_ranges(shard_map: Mapping[str, str], shards: int) -> list[tuple[int, int, str]]:
    """``storage.shard_map`` as sorted (first, last, url) ranges of message shards; raises
    ConfigError naming the entry when a range is malformed, out of 0..shards-1, overlaps
    another, or its URL is not mysql://."""
    ranges: list[tuple[int, int, str]] = []
    for name, url in shard_map.items():
        key = f"storage.shard_map.{name!r}"
        first, dash, last = name.strip().partition("-")
        try:
            lo, hi = int(first), int(last if dash else first)
        except ValueError:
            raise ConfigError(f'{key}: want a shard "N" or a range "A-B"') from None
        if not 0 <= lo <= hi < shards:
            raise ConfigError(f"{key}: shards must lie in 0..{shards - 1} (storage.shards)")
        if not url.startswith("mysql://"):
            raise ConfigError(f"{key}: must be a mysql:// URL")
        ranges.append((lo, hi, url))
    ranges.sort()
    for (lo1, hi1, _), (lo2, hi2, _) in itertools.pairwise(ranges):
        if lo2 <= hi1:
            raise ConfigError(f"storage.shard_map: ranges {lo1}-{hi1} and {lo2}-{hi2} overlap")
    return ranges


def check(config: Config) -> None:
    """ConfigError naming the first key whose value PMQ cannot run with (a port out of range,
    a count below its minimum, an unknown mode, a malformed URL, origin or shard map)."""
    for ok, message in itertools.chain(_server_rules(config), _backend_rules(config)):
        if not ok:
            raise ConfigError(message)


def _server_rules(config: Config) -> Iterator[tuple[bool, str]]:
    """(ok, message) for the keys of the servers: [server], [ingest], the client limits."""
    s = config.server
    for key, port in (("server.port", s.port), ("ingest.port", config.ingest.port)):
        yield (0 < port < 65536, f"{key}: must be a port number 1..65535")
    yield (s.workers >= 1, "server.workers: must be at least 1")
    yield (s.task_workers >= 0, "server.task_workers: must not be negative")
    yield (s.graceful_timeout > 0, "server.graceful_timeout: must be positive")
    yield (s.worker_timeout > 0, "server.worker_timeout: must be positive")
    yield (s.max_frame >= 1024, "server.max_frame: must be at least 1024")
    yield (s.rate >= 1, "server.rate: must be at least 1")
    yield (s.max_pending >= 4096, "server.max_pending: must be at least 4096")
    yield (s.max_connections_per_user >= 1, "server.max_connections_per_user: must be at least 1")
    yield (config.inbox.replay_max >= 1, "inbox.replay_max: must be at least 1")
    yield (config.cs.max_opens_per_hour >= 1, "cs.max_opens_per_hour: must be at least 1")
    yield (all(c.isalnum() or c in "-_." for c in s.node), "server.node: letters, digits, -_.")
    yield (config.ingest.max_body >= 256, "ingest.max_body: must be at least 256")
    yield (config.ingest.request_timeout > 0, "ingest.request_timeout: must be positive")
    yield (config.ingest.max_connections >= 1, "ingest.max_connections: must be at least 1")
    for origin in s.allowed_origins:
        yield (
            ORIGIN.fullmatch(origin) is not None,
            f"server.allowed_origins: {origin!r} is not an origin like https://site.example "
            "(scheme and host, optional port, no path or trailing slash)",
        )


def _backend_rules(config: Config) -> Iterator[tuple[bool, str]]:
    """(ok, message) for what PMQ talks to: [auth], [storage], [redis], then [heartbeat]
    and [log]."""
    yield (config.auth.mode in ("jwt", "http"), "auth.mode: must be 'jwt' or 'http'")
    yield (
        config.auth.mode != "http" or bool(config.auth.url),
        "auth.url: required when auth.mode = 'http'",
    )
    yield (config.auth.cache_jitter >= 1, "auth.cache_jitter: must be at least 1")
    yield (config.auth.max_token_age >= 0, "auth.max_token_age: must not be negative (0: off)")
    yield (config.auth.revoke_seconds >= 0, "auth.revoke_seconds: must not be negative (0: off)")
    yield (
        config.storage.url.startswith(("sqlite:///", "mysql://")),
        "storage.url: must start with sqlite:/// or mysql://",
    )
    yield (config.storage.shards >= 1, "storage.shards: must be at least 1")
    shard_ranges(config.storage.shard_map, config.storage.shards)
    yield (
        config.redis.url.startswith(("redis://", "rediss://", "unix://", CLUSTER_URL)),
        "redis.url: must be a redis:// URL",
    )
    yield (
        "{" not in config.redis.prefix and "}" not in config.redis.prefix,
        "redis.prefix: must not contain { or } (they would spoil the keys' hash tags)",
    )
    yield (
        1 <= config.redis.buckets <= MAX_BUCKETS,
        f"redis.buckets: must be 1..{MAX_BUCKETS} (0: the default)",
    )
    yield (
        config.redis.durability in DURABILITY,
        "redis.durability: must be 'none' or 'aof'",
    )
    yield (config.redis.wait_replicas >= 0, "redis.wait_replicas: must not be negative")
    yield from _webhook_rules(config)
    hb = config.heartbeat
    yield (0 < hb.interval < hb.timeout, "heartbeat.interval: must be positive and below timeout")
    yield (
        config.log.level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
        "log.level: bad level",
    )


def _webhook_rules(config: Config) -> Iterator[tuple[bool, str]]:
    """(ok, message) for [webhooks] (its secret is checked with the others, at start)."""
    hooks = config.webhooks
    yield (
        not hooks.url
        or (urlsplit(hooks.url).scheme in ("http", "https") and bool(urlsplit(hooks.url).hostname)),
        "webhooks.url: must be an http:// or https:// URL (or empty: off)",
    )
    for name in hooks.events:
        yield (name in EVENT_TYPES, f"webhooks.events: unknown event {name!r}")
    yield (hooks.retry_seconds >= 1, "webhooks.retry_seconds: must be at least 1")
    yield (hooks.offline_grace >= 0, "webhooks.offline_grace: must not be negative")
    yield (hooks.undelivered_after > 0, "webhooks.undelivered_after: must be positive")
    yield (
        1 <= hooks.batch <= MAX_WEBHOOK_BATCH,
        f"webhooks.batch: must be 1..{MAX_WEBHOOK_BATCH}",
    )
    yield (hooks.timeout > 0, "webhooks.timeout: must be positive")
    yield (hooks.max_backoff >= 0.1, "webhooks.max_backoff: must be at least 0.1")


def reloaded(config: Config, environ: Mapping[str, str] | None = None) -> tuple[Config, list[str]]:
    """``config`` with its reloadable settings (Config.RELOADABLE) read again from its file
    and the environment, and the other settings whose change that reading found, which keep
    their running value until a restart. Raises ConfigError as :func:`load` does."""
    fresh = load(config.path or None, environ)
    sections: dict[str, Any] = {}
    needs_restart = []
    for name in SECTIONS:
        running, read = getattr(config, name), getattr(fresh, name)
        changes: dict[str, Any] = {}
        for field in dataclasses.fields(running):
            key = f"{name}.{field.name}"
            value = getattr(read, field.name)
            if value == getattr(running, field.name):
                continue
            if key in Config.RELOADABLE:
                changes[field.name] = value
            elif key != "auth.jwt_secret" or read.jwt_secret:  # unset: the generated one runs
                needs_restart.append(key)
        if changes:
            sections[name] = dataclasses.replace(running, **changes)
    return dataclasses.replace(config, **sections), needs_restart

