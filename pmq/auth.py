"""Token verification: who is behind a client token.

Two authenticators share one small protocol (:class:`Authenticator`):

- :class:`JwtAuthenticator` checks an HS256 JWT locally (``auth.mode = jwt``). The secret is
  ``auth.jwt_secret`` or, with the embedded SQLite store, a file generated once beside the
  database (:func:`resolve_jwt_secret`), so ``pmqctl token`` mints tokens the node accepts.
- :class:`HttpAuthenticator` asks the site's user centre (``auth.mode = http``) and caches the
  answers in Redis with a jittered TTL; concurrent look-ups of one token are made once in
  the whole cluster (a short Redis lock per token: the holder asks, the others wait for its
  cached answer).

Both answer an :class:`Identity` or raise :class:`AuthError` carrying the HTTP status to
refuse the handshake with: 401 for a bad token, 503 when the user centre cannot answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx
import jwt
from redis.asyncio import Redis

from pmq import metrics
from pmq.config import AuthConfig, Config
from pmq.errors import AuthError, ConfigError
from pmq.keys import Keys
from pmq.locks import Lock
from pmq.protocol import Role

log = logging.getLogger(__name__)

ALGORITHM = "HS256"
SECRET_FILE = "pmq.jwt-secret"
MAX_TOKEN = 4096  # bytes; longer tokens are refused before any work is done
CLOCK_LEEWAY = 30  # seconds of clock skew tolerated between the minting host and this node
_UID = re.compile(r"[0-9]{1,20}")
_ROLES = frozenset(r.value for r in Role)


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated client: ``uid`` a canonical decimal string (> 0), its groups, its role."""

    uid: str
    groups: tuple[str, ...] = ()
    role: Role = Role.USER


class Authenticator(Protocol):
    """Turns a client token into an :class:`Identity` or raises :class:`AuthError`."""

    async def authenticate(self, token: str) -> Identity: ...

    async def close(self) -> None: ...


def make_identity(uid: object, groups: object = None, role: object = None) -> Identity:
    """Check claims from a token or a user-centre answer; ValueError says what is wrong.

    ``uid`` must be an int > 0 or a string of digits naming one; ``groups`` absent or a list
    of strings; ``role`` absent or a :class:`Role` value.
    """
    if isinstance(uid, int) and not isinstance(uid, bool):
        uid = str(uid)
    if not isinstance(uid, str) or not _UID.fullmatch(uid) or int(uid) == 0:
        raise ValueError("uid must be a positive integer")
    if groups is None:
        groups = []
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise ValueError("groups must be a list of strings")
    role = Role.USER.value if role is None else role
    if not isinstance(role, str) or role not in _ROLES:
        raise ValueError(f"unknown role {role!r}")
    return Identity(uid=str(int(uid)), groups=tuple(groups), role=Role(role))


# JWT ------------------------------------------------------------------------------------


def mint_token(
    secret: str,
    uid: str | int,
    groups: Sequence[str] = (),
    role: str = "user",
    ttl: int = 86400,
) -> str:
    """An HS256 JWT for ``uid`` valid for ``ttl`` seconds, as :class:`JwtAuthenticator` wants."""
    identity = make_identity(uid, list(groups), role)
    now = int(time.time())
    claims = {
        "sub": identity.uid,
        "iat": now,
        "exp": now + ttl,
        "groups": list(identity.groups),
        "role": identity.role.value,
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def sqlite_path(url: str) -> Path:
    """The database file of a ``sqlite:///rel`` (cwd-relative) or ``sqlite:////abs`` URL."""
    return Path(url.removeprefix("sqlite:///").partition("?")[0])


def secret_file(storage_url: str) -> Path:
    """Where the generated JWT secret is kept: beside the SQLite database of ``storage_url``."""
    return sqlite_path(storage_url).parent / SECRET_FILE


def resolve_jwt_secret(config: Config) -> str:
    """The JWT secret: ``auth.jwt_secret``, else the one kept beside the SQLite database.

    The file (``pmq.jwt-secret``, mode 0600) is created on first use; when several processes
    race, exactly one secret wins and all of them return it. Raises ConfigError when the store
    is not SQLite and no secret is set, or when the file cannot be read or written.
    """
    if config.auth.jwt_secret:
        return config.auth.jwt_secret
    if not config.storage.url.startswith("sqlite:///"):
        raise ConfigError("auth.jwt_secret: must be set when storage is not SQLite")
    path = secret_file(config.storage.url)
    try:
        return _read_or_create_secret(path)
    except OSError as exc:
        raise ConfigError(f"auth.jwt_secret: cannot keep the secret in {path}: {exc}") from None


def _read_or_create_secret(path: Path) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write a private temp file, then link it into place: the link is the atomic
        # "create if absent", and a racing reader never sees a half-written secret.
        tmp = path.with_name(f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)
            log.info("generated a JWT secret in %s", path)
        except FileExistsError:
            pass  # another process won the race; use its secret
        finally:
            tmp.unlink(missing_ok=True)
    secret = path.read_text().strip()
    if not secret:
        raise ConfigError(f"auth.jwt_secret: {path} is empty; delete it or set the secret")
    return secret


class JwtAuthenticator:
    """Verifies HS256 JWTs signed with one secret; no I/O."""

    def __init__(self, secret: str) -> None:
        self._secret = secret

    async def authenticate(self, token: str) -> Identity:
        """The token's identity; AuthError(401) when it is missing, bad, expired or malformed."""
        if not token:
            raise AuthError(401, "missing token")
        if len(token) > MAX_TOKEN:
            raise AuthError(401, "token too long")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                leeway=CLOCK_LEEWAY,
                # sub is checked below: an int sub is accepted too.
                options={"require": ["sub", "exp"], "verify_sub": False},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "token expired") from None
        except jwt.InvalidSignatureError:
            raise AuthError(401, "bad token signature") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(401, f"malformed token: {exc}") from None
        try:
            return make_identity(claims["sub"], claims.get("groups"), claims.get("role"))
        except ValueError as exc:
            raise AuthError(401, f"bad token claims: {exc}") from None

    async def close(self) -> None:
        """Nothing to release."""


# User centre ----------------------------------------------------------------------------

_INVALID = {"invalid": True}  # the negative cache entry
LOCK_MARGIN = 1.0  # seconds a look-up's lock outlives the longest user-centre call
POLL_SECONDS = 0.02  # how often a waiting look-up reads the cache


class HttpAuthenticator:
    """Asks the user centre at ``auth.url``, with a Redis cache and a single flight per token:
    in this process (one task per token) and across the cluster (a Redis lock per token).

    Create it inside the worker's event loop (after fork); call :meth:`close` when done.
    Redis errors propagate to the caller; user-centre failures become AuthError(503).
    """

    def __init__(self, redis: Redis, keys: Keys, config: AuthConfig) -> None:
        self._redis = redis
        self._keys = keys
        self._config = config
        self._client = httpx.AsyncClient(timeout=config.timeout)
        self._inflight: dict[str, asyncio.Task[Identity]] = {}
        self._closed = False
        self._lock_ms = int((config.timeout + LOCK_MARGIN) * 1000)

    async def authenticate(self, token: str) -> Identity:
        """The user centre's identity for ``token``, from the cache when it has one.

        Raises AuthError(401) for an invalid token (also cached, for ``auth.invalid_ttl``
        seconds) and AuthError(503, "user centre unavailable") when it cannot answer.
        """
        if not token:
            raise AuthError(401, "missing token")
        if len(token) > MAX_TOKEN:
            raise AuthError(401, "token too long")
        if self._closed:
            raise AuthError(503, "user centre unavailable")
        digest = hashlib.sha256(token.encode()).hexdigest()
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.create_task(self._lookup(token, digest))
            self._inflight[digest] = task
            task.add_done_callback(lambda t: self._finished(digest, t))
        # shield: one waiter being cancelled must not cancel the look-up the others share.
        return await asyncio.shield(task)

    async def close(self) -> None:
        """Close the HTTP pool (idempotent); look-ups still running are cancelled."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._inflight.values()):
            task.cancel()
        await self._client.aclose()

    def _finished(self, digest: str, task: asyncio.Task[Identity]) -> None:
        if self._inflight.get(digest) is task:
            del self._inflight[digest]
        if not task.cancelled():
            task.exception()  # mark it retrieved even if every waiter was cancelled

    async def _lookup(self, token: str, digest: str) -> Identity:
        """The cached answer; else the user centre's, asked once in the cluster at a time.

        Whoever takes the token's lock (held a little longer than a call may last)
        asks and caches the answer; the others read the cache every POLL_SECONDS until it
        is there. A holder that fails (no answer is cached) or dies (its lock expires)
        leaves the lock to the next one. A waiter gives up with 503 once a lock's lifetime
        and one call have passed."""
        key = self._keys.auth_cache(digest)
        lock = Lock(self._keys.auth_lock(digest), secrets.token_hex(8), self._lock_ms)
        deadline = time.monotonic() + self._lock_ms / 1000 + self._config.timeout
        while True:
            identity = await self._cached(key)
            if identity is not None:
                return identity
            if await lock.hold(self._redis):
                try:
                    # The last holder may have cached its answer and let go since our read.
                    return await self._cached(key) or await self._ask_and_cache(token, key)
                finally:
                    await lock.release(self._redis)
            if time.monotonic() >= deadline:
                log.warning("gave up waiting for another look-up of a token at the user centre")
                raise AuthError(503, "user centre unavailable")
            await asyncio.sleep(POLL_SECONDS)

    async def _cached(self, key: str) -> Identity | None:
        """The cached answer (AuthError(401) for a token cached as invalid), or None."""
        cached = await self._redis.get(key)
        if cached is None:
            return None
        try:
            entry = json.loads(cached)
        except ValueError:
            log.warning("ignoring a corrupt auth cache entry %s", key)
            return None
        metrics.AUTH_CACHE.labels("hit").inc()
        return self._from_cache(entry)

    async def _ask_and_cache(self, token: str, key: str) -> Identity:
        metrics.AUTH_CACHE.labels("miss").inc()
        try:
            identity = await self._ask(token)
        except AuthError as exc:
            if exc.status == 401 and self._config.invalid_ttl > 0:
                await self._redis.set(key, json.dumps(_INVALID), ex=self._config.invalid_ttl)
            raise
        ttl = self._config.cache_ttl + random.randint(1, self._config.cache_jitter)
        entry = {"uid": identity.uid, "groups": list(identity.groups), "role": identity.role.value}
        await self._redis.set(key, json.dumps(entry), ex=ttl)
        return identity

    @staticmethod
    def _from_cache(entry: Any) -> Identity:
        if entry == _INVALID:
            raise AuthError(401, "invalid token")
        if not isinstance(entry, dict):
            raise ValueError("not an object")
        return make_identity(entry.get("uid"), entry.get("groups"), entry.get("role"))

    async def _ask(self, token: str) -> Identity:
        """One POST to the user centre, bounded by ``auth.timeout`` in all."""
        try:
            async with asyncio.timeout(self._config.timeout):
                response = await self._client.post(self._config.url, data={"token": token})
        except (httpx.HTTPError, TimeoutError) as exc:
            log.warning("user centre %s failed: %r", self._config.url, exc)
            raise AuthError(503, "user centre unavailable") from None
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict) and (response.is_success or response.status_code >= 500):
            # Garbage from a failing or misrouted user centre is no verdict on the token.
            log.warning(
                "user centre %s answered %d, not JSON", self._config.url, response.status_code
            )
            raise AuthError(503, "user centre unavailable")
        if not response.is_success or not isinstance(answer, dict):
            raise AuthError(401, "invalid token")
        if answer.get("uid") in (None, 0, "", "0"):
            raise AuthError(401, "invalid token")
        try:
            return make_identity(answer["uid"], answer.get("groups"), answer.get("role"))
        except ValueError as exc:
            log.warning("user centre %s answered a bad identity: %s", self._config.url, exc)
            raise AuthError(503, "user centre unavailable") from None


def make_authenticator(
    config: Config, redis: Redis, keys: Keys
) -> JwtAuthenticator | HttpAuthenticator:
    """The authenticator ``auth.mode`` names; ConfigError if it cannot be made."""
    if config.auth.mode == "jwt":
        return JwtAuthenticator(resolve_jwt_secret(config))
    if config.auth.mode == "http":
        return HttpAuthenticator(redis, keys, config.auth)
    raise ConfigError(f"auth.mode: must be 'jwt' or 'http', got {config.auth.mode!r}")
