"""What a node refuses to start with, checked by the master before any worker forks; ``pmqctl
check`` runs the same checks and lists every problem at once.

- Secrets: ``auth.jwt_secret``, ``ingest.api_key`` and ``webhooks.secret``, when set, must be
  long enough (MIN_JWT_SECRET, MIN_API_KEY, MIN_JWT_SECRET bytes) and no placeholder
  (PLACEHOLDERS); ``webhooks.secret`` must be set when ``webhooks.url`` is; the passwords in
  ``storage.url``, ``storage.shard_map`` and ``redis.url`` no placeholder either. An ingest
  API on a non-loopback ``ingest.host`` needs ``ingest.api_key``. With
  ``server.require_secrets = true`` both secrets must be set (never generated, never off).
- File modes: the SQLite database, its -wal and -shm, and the generated JWT secret file, where
  they exist, are readable by their owner only.
- Redis's settings: :mod:`pmq.redis.check`.
- Storage (``pmqctl check`` only): the store answers. The start does not wait for it: a
  storage outage must not stop live traffic.

Every problem is one line that starts with the key (or Redis setting) at fault.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import stat
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pmq.config import Config
from pmq.domain.jwtauth import secret_file
from pmq.errors import ConfigError, PMQError
from pmq.redis import check as redischeck
from pmq.store import open_store, sqlite_path

MIN_JWT_SECRET = 32  # bytes: HS256's key should be at least as long as its hash
MIN_API_KEY = 16  # bytes
# Values shipped in examples and typed in a hurry (compared lower-case, letters and digits
# only, so CHANGE_ME, change-me and ChangeMe are one); MARKS are refused inside a value too.
PLACEHOLDERS = frozenset(
    {
        "changeme", "change", "replaceme", "placeholder", "secret", "password", "passwd",
        "pass", "test", "testing", "example", "default", "sample", "dummy", "todo", "fixme",
        "none", "null", "key", "apikey", "jwtsecret", "token", "admin", "root", "pmq",
        "123456", "12345678", "123456789", "qwerty", "letmein",
    }
)  # fmt: skip
MARKS = ("changeme", "replaceme", "placeholder", "yoursecret", "yourkey")
GROUP_OR_OTHER = 0o077  # mode bits a private file must not have


@dataclasses.dataclass(frozen=True)
class Report:
    """What ``pmqctl check`` found: ``problems`` (empty when all is well) and ``checked``,
    one short line per group of checks that ran."""

    problems: list[str]
    checked: list[str]


def require(config: Config) -> None:
    """The start's checks: raise ConfigError listing every problem with the secrets and the
    file modes, else every problem with Redis's settings (Redis is asked only once the
    local checks pass)."""
    faults = secret_problems(config) + file_problems(config)
    if not faults:
        faults = redischeck.inspect(config.redis)[1]
    if faults:
        raise ConfigError(describe(faults))


def survey(config: Config) -> Report:
    """Every check of :func:`require`, plus the store's reachability, all run."""
    settings, redis_faults = redischeck.inspect(config.redis)
    problems = (
        secret_problems(config) + file_problems(config) + redis_faults + storage_problems(config)
    )
    servers = ", ".join(
        f"{s.server}: appendonly {s.appendonly}, {s.maxmemory_policy}" for s in settings
    )
    checked = [
        "secrets",
        f"file modes ({sum(path.exists() for _, path in private_files(config))} private files)",
        f"redis ({servers or 'not read'})",
        f"storage ({config.storage.url.partition('://')[0]})",
    ]
    return Report(problems, checked)


def describe(faults: list[str]) -> str:
    """One problem as it is; several on lines of their own under a count."""
    if len(faults) == 1:
        return faults[0]
    return f"{len(faults)} problems:\n" + "\n".join(f"  {fault}" for fault in faults)


# Secrets ------------------------------------------------------------------------------


def is_placeholder(value: str) -> bool:
    """True for a known placeholder, a value holding a MARK, or one character repeated."""
    folded = re.sub(r"[^a-z0-9]", "", value.lower())
    return folded in PLACEHOLDERS or any(m in folded for m in MARKS) or len(set(value)) < 2


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def secret_problems(config: Config) -> list[str]:
    """What is wrong with the secrets (see the module docstring)."""
    auth, ingest = config.auth, config.ingest
    required = " (server.require_secrets = true)"
    found = weak("auth.jwt_secret", auth.jwt_secret, MIN_JWT_SECRET)
    found += weak("ingest.api_key", ingest.api_key, MIN_API_KEY)
    found += weak("webhooks.secret", config.webhooks.secret, MIN_JWT_SECRET)
    if config.webhooks.url and not config.webhooks.secret:
        found.append("webhooks.secret: must be set when webhooks.url is (the events are signed)")
    if auth.mode == "jwt" and not auth.jwt_secret:
        if config.server.require_secrets:
            found.append(f"auth.jwt_secret: must be set{required}")
        elif sqlite_path(config.storage.url) is None:
            found.append(
                "auth.jwt_secret: must be set when storage is not SQLite (a generated "
                "secret is kept beside the SQLite database)"
            )
    if not ingest.api_key:
        if config.server.require_secrets:
            found.append(f"ingest.api_key: must be set{required}")
        elif not is_loopback(ingest.host):
            found.append(
                f"ingest.api_key: must be set when ingest.host ({ingest.host!r}) is not a "
                "loopback address: whoever reaches the port could push to every user"
            )
    urls = {"storage.url": config.storage.url, "redis.url": config.redis.url}
    for shards, url in config.storage.shard_map.items():
        urls[f"storage.shard_map.{shards!r}"] = url
    for key, url in urls.items():
        password = urlsplit(url).password
        if password and is_placeholder(unquote(password)):
            found.append(f"{key}: its password is a placeholder; set the real one")
    return found


def weak(key: str, value: str, minimum: int) -> list[str]:
    """Why a set secret is too weak to use (never quoting it); [] when unset or fine."""
    if not value:
        return []
    if is_placeholder(value):
        return [f"{key}: is a placeholder, not a secret; set a long random value"]
    if len(value.encode()) < minimum:
        return [f"{key}: must be at least {minimum} bytes (a long random value)"]
    return []


# File modes ---------------------------------------------------------------------------


def private_files(config: Config) -> list[tuple[str, Path]]:
    """(key, path) of each file that must stay readable by its owner only, existing or not."""
    db = sqlite_path(config.storage.url)
    if db is None:
        return []
    files = [("storage.url", db.with_name(db.name + suffix)) for suffix in ("", "-wal", "-shm")]
    if config.auth.mode == "jwt" and not config.auth.jwt_secret:
        files.append(("auth.jwt_secret", secret_file(db)))
    return files


def file_problems(config: Config) -> list[str]:
    """Each private file that exists and is open to its group or others."""
    found = []
    for key, path in private_files(config):
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue  # PMQ creates it 0600
        except OSError as exc:
            found.append(f"{key}: cannot read the mode of {path}: {exc}")
            continue
        if mode & GROUP_OR_OTHER:
            found.append(
                f"{key}: {path} has mode {mode:04o}, readable beyond its owner; chmod 600 {path}"
            )
    return found


# Storage (pmqctl check only) ----------------------------------------------------------


def storage_problems(config: Config) -> list[str]:
    """Whether the store answers. A SQLite file not made yet is not created here (pmqctl may
    run as another user than the node): its directory must be writable instead."""
    db = sqlite_path(config.storage.url)
    if db is not None and not db.exists():
        place = db.parent
        while not place.exists():
            place = place.parent
        if os.access(place, os.W_OK | os.X_OK):
            return []
        return [f"storage.url: cannot create {db}: {place} is not writable"]
    try:
        store = open_store(config.storage)
        try:
            store.ping()
        finally:
            store.close()
    except PMQError as exc:
        return [f"storage.url: the store does not answer: {exc}"]
    return []
