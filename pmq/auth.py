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
refuse the handshake with: 401 for a bad token, 503 when the user centre or Redis cannot
answer. Both honour kicks (:meth:`Authenticator.revoke`, pmq.kicks): a JWT issued before the
user's last kick is refused; the user centre's cached answers for a kicked user are dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import random
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx
import jwt
from redis.asyncio import Redis
from redis.exceptions import RedisError

from pmq import metrics
from pmq.config import AuthConfig, Config
from pmq.errors import AuthError, ConfigError
from pmq.keys import Keys
from pmq.kicks import Kicks, issued_before, now_ms
from pmq.locks import Lease
from pmq.log import Throttled
from pmq.store import sqlite_path
from pmq.wire.client import Role, is_uid

log = logging.getLogger(__name__)
REDIS_DOWN = Throttled(log)

ALGORITHM = "HS256"
SECRET_FILE = "pmq.jwt-secret"
MAX_TOKEN = 4096  # bytes; longer tokens are refused before any work is done
CLOCK_LEEWAY = 30  # seconds of clock skew tolerated between the minting host and this node
_ROLES = frozenset(r.value for r in Role)


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated client: ``uid`` a canonical decimal string (1 to 2^63-1), its
    groups, its role."""

    uid: str
    groups: tuple[str, ...] = ()
    role: Role = Role.USER


class Authenticator(Protocol):
    """Turns a client token into an :class:`Identity` or raises :class:`AuthError`."""

    async def authenticate(self, token: str) -> Identity: ...

    async def revoke(self, uid: str) -> None:
        """After a kick of ``uid``: refuse the tokens it revokes, on every node."""
        ...

    async def close(self) -> None: ...


def make_identity(uid: object, groups: object = None, role: object = None) -> Identity:
    """Check claims from a token or a user-centre answer; ValueError says what is wrong.

    ``uid`` must be an int or a string of digits in 1..2^63-1 (the range storage keeps);
    ``groups`` absent or a list of strings; ``role`` absent or a :class:`Role` value.
    """
    if not is_uid(uid):
        raise ValueError("uid must be an integer from 1 to 2^63-1")
    if groups is None:
        groups = []
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise ValueError("groups must be a list of strings")
    role = Role.USER.value if role is None else role
    if not isinstance(role, str) or role not in _ROLES:
        raise ValueError(f"unknown role {role!r}")
    return Identity(uid=str(int(str(uid))), groups=tuple(groups), role=Role(role))


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


def secret_file(database: Path) -> Path:
    """Where the generated JWT secret is kept: beside the SQLite ``database``."""
    return database.parent / SECRET_FILE


def resolve_jwt_secret(config: Config) -> str:
    """The JWT secret: ``auth.jwt_secret``, else the one kept beside the SQLite database.

    The file (``pmq.jwt-secret``, mode 0600) is created on first use; when several processes
    race, exactly one secret wins and all of them return it. Raises ConfigError when the store
    is not SQLite and no secret is set, or when the file cannot be read or written.
    """
    if config.auth.jwt_secret:
        return config.auth.jwt_secret
    database = sqlite_path(config.storage.url)
    if database is None:
        raise ConfigError("auth.jwt_secret: must be set when storage is not SQLite")
    path = secret_file(database)
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
    """Verifies HS256 JWTs signed with one secret: PyJWT checks the signature, ``exp``,
    ``iat`` (when present) and, when ``auth.issuer`` / ``auth.audience`` are set, ``iss`` and
    ``aud``; then ``sub`` must be a uid, ``exp - iat`` within ``auth.max_token_age`` (when
    set), and the token must not predate the user's last kick (one Redis read through
    ``kicks``; without ``kicks``, as in tools and unit tests, nothing is revoked)."""

    def __init__(
        self, secret: str, config: AuthConfig | None = None, kicks: Kicks | None = None
    ) -> None:
        self._secret = secret
        self._config = config = config or AuthConfig()
        self._kicks = kicks
        require = ["sub", "exp"]
        for claim, wanted in (
            ("iat", config.max_token_age),
            ("iss", config.issuer),
            ("aud", config.audience),
        ):
            if wanted:
                require.append(claim)
        # sub is checked by make_identity: an int sub is accepted too. aud unchecked when
        # no audience is set (PyJWT would refuse any token that has one).
        self._options: Any = {
            "require": require,
            "verify_sub": False,
            "verify_aud": bool(config.audience),
        }

    async def authenticate(self, token: str) -> Identity:
        """The token's identity; AuthError(401) when it is missing, bad, expired, malformed,
        too long-lived or revoked by a kick; AuthError(503) when Redis cannot say."""
        if not token:
            raise AuthError(401, "missing token")
        if len(token) > MAX_TOKEN:
            raise AuthError(401, "token too long")
        claims = self._decode(token)
        try:
            identity = make_identity(claims["sub"], claims.get("groups"), claims.get("role"))
        except ValueError as exc:
            raise AuthError(401, f"bad token claims: {exc}") from None
        self._check_age(claims)
        await self._check_kick(identity.uid, claims)
        return identity

    async def revoke(self, uid: str) -> None:
        """Refuse, on every node, the tokens of ``uid`` issued up to now (pmq.kicks)."""
        if self._kicks is not None:
            await self._kicks.record(uid)

    async def close(self) -> None:
        """Nothing to release."""

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                leeway=CLOCK_LEEWAY,
                issuer=self._config.issuer or None,
                audience=self._config.audience or None,
                options=self._options,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "token expired") from None
        except jwt.InvalidSignatureError:
            raise AuthError(401, "bad token signature") from None
        except jwt.InvalidIssuerError:
            raise AuthError(401, "token issuer not accepted") from None
        except jwt.InvalidAudienceError:
            raise AuthError(401, "token audience not accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(401, f"token has no {exc.claim!r} claim") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(401, f"malformed token: {exc}") from None
        return claims

    def _check_age(self, claims: dict[str, Any]) -> None:
        age = self._config.max_token_age
        if not age:
            return
        issued, expires = _numeric(claims, "iat"), _numeric(claims, "exp")
        if issued is None or expires is None or expires - issued > age:
            raise AuthError(401, f"token lives longer than auth.max_token_age ({age} s)")

    async def _check_kick(self, uid: str, claims: dict[str, Any]) -> None:
        if self._kicks is None:
            return
        try:
            kicked = await self._kicks.last(uid)
        except (RedisError, OSError) as exc:
            REDIS_DOWN.warning("handshake answered 503, cannot read kicks: %s", exc)
            raise AuthError(503, "unavailable, retry") from None
        if kicked is not None and issued_before(_numeric(claims, "iat"), kicked):
            raise AuthError(401, "token revoked by a kick")


def _numeric(claims: dict[str, Any], name: str) -> float | None:
    """Claim ``name`` as a number (None when absent); AuthError(401) for anything else:
    PyJWT's own checks let strings of digits and booleans through."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError(401, f"malformed token: {name} must be a number")
    return float(value)


# User centre ----------------------------------------------------------------------------

_INVALID = {"invalid": True}  # the negative cache entry
LOCK_MARGIN = 1.0  # seconds a look-up's lock outlives the longest user-centre call
POLL_SECONDS = 0.02  # how often a waiting look-up reads the cache
INVALID_STATUSES = (401, 403)  # the user centre's statuses that say "invalid token"
CENTRE_DOWN = Throttled(log)


class HttpAuthenticator:
    """Asks the user centre at ``auth.url``, with a Redis cache and a single flight per token:
    in this process (one task per token) and across the cluster (a Redis lock per token).

    Only 401, 403 and a uid of 0 mean an invalid token (cached for ``auth.invalid_ttl``);
    any other answer is no verdict on the token: AuthError(503), nothing cached.

    Kicks: the cache is keyed by token, so each good answer also files its token's digest
    under its user (``keys.auth_tokens``), and :meth:`revoke` deletes the entries filed
    there. That costs a set member per cached token and a round trip per look-up the user
    centre answered, none per cache hit; a per-user generation checked on each hit would
    cost a read at every handshake instead. An answer in flight when the kick comes (asked
    before it, cached after the kick's sweep) is caught by the look-up itself: after filing
    its token it reads the kick time, and drops its entry when the kick may be later than
    its question (the clocks of two nodes, within CLOCK_LEEWAY, are compared).

    Create it inside the worker's event loop (after fork); call :meth:`close` when done.
    """

    def __init__(
        self, redis: Redis, keys: Keys, config: AuthConfig, kicks: Kicks | None = None
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._config = config
        self._kicks = kicks or Kicks(redis, keys, config.revoke_seconds)
        # An index lives as long as the longest-lived entry it names.
        self._index_ttl = config.cache_ttl + config.cache_jitter
        self._client = httpx.AsyncClient(timeout=config.timeout)
        self._inflight: dict[str, asyncio.Task[Identity]] = {}
        self._closed = False
        self._lock_ms = int((config.timeout + LOCK_MARGIN) * 1000)

    async def authenticate(self, token: str) -> Identity:
        """The user centre's identity for ``token``, from the cache when it has one.

        Raises AuthError(401) for an invalid token (also cached, for ``auth.invalid_ttl``
        seconds) and AuthError(503) when the user centre or Redis cannot answer.
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
        try:
            # shield: one waiter being cancelled must not cancel the look-up the others share.
            return await asyncio.shield(task)
        except (RedisError, OSError) as exc:
            REDIS_DOWN.warning("handshake answered 503, redis unavailable: %s", exc)
            raise AuthError(503, "unavailable, retry") from None

    async def revoke(self, uid: str) -> None:
        """Record the kick of ``uid`` (pmq.kicks), then drop every cached user-centre answer
        for that user, so each of the user's tokens is asked about again. Redis errors
        propagate."""
        await self._kicks.record(uid)
        index = self._keys.auth_tokens(uid)
        digests = await self._redis.smembers(index)
        pipe = self._redis.pipeline(transaction=False)  # keys of many slots on a cluster
        for digest in digests:
            text = digest.decode() if isinstance(digest, bytes) else digest
            pipe.delete(self._keys.auth_cache(text))
        pipe.delete(index)
        await pipe.execute()

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
        lock = Lease(self._keys.auth_lock(digest), secrets.token_hex(8), self._lock_ms)
        deadline = time.monotonic() + self._lock_ms / 1000 + self._config.timeout
        while True:
            identity = await self._cached(key)
            if identity is not None:
                return identity
            if await lock.hold(self._redis):
                try:
                    # The last holder may have cached its answer and let go since our read.
                    return await self._cached(key) or await self._ask_and_cache(token, digest)
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

    async def _ask_and_cache(self, token: str, digest: str) -> Identity:
        metrics.AUTH_CACHE.labels("miss").inc()
        key = self._keys.auth_cache(digest)
        asked = now_ms()
        try:
            identity = await self._ask(token)
        except AuthError as exc:
            if exc.status == 401 and self._config.invalid_ttl > 0:
                await self._redis.set(key, json.dumps(_INVALID), ex=self._config.invalid_ttl)
            raise
        ttl = self._config.cache_ttl + random.randint(1, self._config.cache_jitter)
        entry = {"uid": identity.uid, "groups": list(identity.groups), "role": identity.role.value}
        await self._redis.set(key, json.dumps(entry), ex=ttl)
        if await self._kicked_since(identity.uid, digest, asked):
            await self._redis.delete(key)
        return identity

    async def _kicked_since(self, uid: str, digest: str, asked: int) -> bool:
        """File a cached token under its user, then whether a kick may have come since
        ``asked`` (unix ms): filed first, so a kick either finds the entry or is seen here."""
        pipe = self._redis.pipeline(transaction=False)  # one slot: the user's bucket
        pipe.sadd(self._keys.auth_tokens(uid), digest)
        pipe.expire(self._keys.auth_tokens(uid), self._index_ttl)
        pipe.get(self._keys.kicked(uid))
        kicked = (await pipe.execute())[2]
        return kicked is not None and int(kicked) >= asked - CLOCK_LEEWAY * 1000

    @staticmethod
    def _from_cache(entry: Any) -> Identity:
        if entry == _INVALID:
            raise AuthError(401, "invalid token")
        if not isinstance(entry, dict):
            raise ValueError("not an object")
        return make_identity(entry.get("uid"), entry.get("groups"), entry.get("role"))

    async def _ask(self, token: str) -> Identity:
        """One POST to the user centre, bounded by ``auth.timeout`` in all. Its verdicts: 401
        or 403, or a 2xx JSON object with uid 0, is an invalid token (AuthError(401)); a 2xx
        JSON identity is the answer; anything else (429 and other statuses, a timeout, a body
        that is not a good identity) is AuthError(503), for the client to retry."""
        try:
            async with asyncio.timeout(self._config.timeout):
                response = await self._client.post(self._config.url, data={"token": token})
        except (httpx.HTTPError, TimeoutError) as exc:
            raise self._unavailable("failed: %r", exc) from None
        if response.status_code in INVALID_STATUSES:
            raise AuthError(401, "invalid token")
        if not response.is_success:
            raise self._unavailable("answered %d", response.status_code)
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise self._unavailable("answered %d, not a JSON object", response.status_code)
        uid = answer.get("uid")
        if uid == "0" or (type(uid) is int and uid == 0):
            raise AuthError(401, "invalid token")
        try:
            return make_identity(uid, answer.get("groups"), answer.get("role"))
        except ValueError as exc:
            raise self._unavailable("answered a bad identity: %s", exc) from None

    def _unavailable(self, what: str, *args: object) -> AuthError:
        """Log the user centre's failure (throttled); the AuthError(503) to raise."""
        CENTRE_DOWN.warning("user centre %s " + what, self._config.url, *args)
        return AuthError(503, "user centre unavailable")


def make_authenticator(
    config: Config, redis: Redis, keys: Keys, kicks: Kicks | None = None
) -> JwtAuthenticator | HttpAuthenticator:
    """The authenticator ``auth.mode`` names, reading and recording kicks with ``kicks``
    (by default its own, on ``redis``); ConfigError if it cannot be made."""
    kicks = kicks or Kicks(redis, keys, config.auth.revoke_seconds)
    if config.auth.mode == "jwt":
        return JwtAuthenticator(resolve_jwt_secret(config), config.auth, kicks)
    if config.auth.mode == "http":
        return HttpAuthenticator(redis, keys, config.auth, kicks)
    raise ConfigError(f"auth.mode: must be 'jwt' or 'http', got {config.auth.mode!r}")
