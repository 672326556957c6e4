"""The authenticator ``auth.mode`` names: the one place both authenticators are visible."""

from __future__ import annotations

from redis.asyncio import Redis

from pmq.config import Config
from pmq.domain.jwtauth import JwtAuthenticator, resolve_jwt_secret
from pmq.domain.kicks import Kicks
from pmq.domain.usercentre import HttpAuthenticator
from pmq.errors import ConfigError
from pmq.redis.keys import Keys


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
