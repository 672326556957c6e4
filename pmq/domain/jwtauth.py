"""The local authenticator: HS256 JWTs signed with one secret (``auth.mode = jwt``).

:class:`JwtAuthenticator` checks a token without asking anyone but Redis (for kicks);
:func:`mint_token` makes the tokens it accepts. The secret is ``auth.jwt_secret`` or, with
the embedded SQLite store, a file generated once beside the database
(:func:`resolve_jwt_secret`), so ``pmqctl token`` mints tokens the node accepts.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt
from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import InvalidKeyError
from redis.exceptions import RedisError

from pmq.config import AuthConfig, Config
from pmq.domain import hs256
from pmq.domain.auth import CLOCK_LEEWAY, Identity, check_token_shape, make_identity
from pmq.domain.kicks import Kicks, issued_before
from pmq.errors import AuthError, ConfigError
from pmq.log import Throttled
from pmq.store import sqlite_path

log = logging.getLogger(__name__)
REDIS_DOWN = Throttled(log)

ALGORITHM = "HS256"
SECRET_FILE = "pmq.jwt-secret"


def mint_token(
    secret: str,
    uid: str | int,
    groups: Sequence[str] = (),
    role: str = "user",
    ttl: int = 86400,
) -> str:
    """An HS256 JWT for ``uid`` valid for ``ttl`` seconds, as :class:`JwtAuthenticator` wants."""
    identity = make_identity(uid, list(groups), role)
    now = time.time()
    claims = {
        "sub": identity.uid,
        # To the millisecond (a NumericDate may be fractional): a token minted right after a
        # kick, in the kick's own second, is then seen as issued after it and connects.
        "iat": math.floor(now * 1000) / 1000,  # truncated: never a moment not yet come
        "exp": int(now) + ttl,
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
    """Verifies HS256 JWTs signed with one secret: pmq.domain.hs256 checks, as PyJWT would,
    the signature, ``exp``, ``iat`` (when present) and, when ``auth.issuer`` /
    ``auth.audience`` are set, ``iss`` and ``aud``; then ``sub`` must be a uid, ``exp -
    iat`` within ``auth.max_token_age`` (when set), and the token must not predate the
    user's last kick (one Redis read through ``kicks``; without ``kicks``, as in tools and
    unit tests, nothing is revoked)."""

    def __init__(
        self, secret: str, config: AuthConfig | None = None, kicks: Kicks | None = None
    ) -> None:
        self._config = config = config or AuthConfig()
        self._kicks = kicks
        try:
            # PyJWT's refusal of a secret shaped like an asymmetric key or a JWK, once
            # here rather than on every token as jwt.decode did.
            self._key = HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
        except InvalidKeyError as exc:
            raise ConfigError(f"auth.jwt_secret: {exc}") from None
        self._issuer = config.issuer or None
        self._audience = config.audience or None  # None: aud not looked at
        require = ["sub", "exp"]
        for claim, wanted in (
            ("iat", config.max_token_age),
            ("iss", config.issuer),
            ("aud", config.audience),
        ):
            if wanted:
                require.append(claim)
        # sub is checked by make_identity: an int sub is accepted too.
        self._require = tuple(require)

    async def authenticate(self, token: str) -> Identity:
        """The token's identity; AuthError(401) when it is missing, bad, expired, malformed,
        too long-lived or revoked by a kick; AuthError(503) when Redis cannot say."""
        check_token_shape(token)
        claims = self._decode(token)
        try:
            identity = make_identity(claims["sub"], claims.get("groups"), claims.get("role"))
        except ValueError as exc:
            raise AuthError(401, f"bad token claims: {exc}") from None
        self._check_age(claims)
        await self._check_kick(identity.uid, claims)
        return identity

    async def revoke(self, uid: str) -> None:
        """Refuse, on every node, the tokens of ``uid`` issued up to now (pmq.domain.kicks)."""
        if self._kicks is not None:
            await self._kicks.record(uid)

    async def close(self) -> None:
        """Nothing to release."""

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            return hs256.verify(
                token,
                self._key,
                leeway=CLOCK_LEEWAY,
                issuer=self._issuer,
                audience=self._audience,
                require=self._require,
            )
        except hs256.Expired:
            raise AuthError(401, "token expired") from None
        except hs256.BadSignature:
            raise AuthError(401, "bad token signature") from None
        except hs256.IssuerRefused:
            raise AuthError(401, "token issuer not accepted") from None
        except hs256.AudienceRefused:
            raise AuthError(401, "token audience not accepted") from None
        except hs256.MissingClaim as exc:
            raise AuthError(401, f"token has no {exc.claim!r} claim") from None
        except hs256.Refused as exc:
            raise AuthError(401, f"malformed token: {exc}") from None

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
