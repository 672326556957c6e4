"""The user-centre authenticator (``auth.mode = http``): the site's user centre says who a
token is, and Redis remembers its answers.

:class:`HttpAuthenticator` caches the answers in Redis with a jittered TTL; concurrent
look-ups of one token are made once in the whole cluster (a short Redis lock per token: the
holder asks, the others wait for its cached answer). Kicks drop a user's cached answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import secrets
import time
from typing import Any

import httpx
from redis.asyncio import Redis
from redis.exceptions import RedisError

from pmq import metrics
from pmq.config import AuthConfig
from pmq.domain.auth import CLOCK_LEEWAY, Identity, check_token_shape, make_identity
from pmq.domain.kicks import Kicks, now_ms
from pmq.errors import AuthError
from pmq.log import Throttled
from pmq.redis.keys import Keys
from pmq.redis.locks import Lease

log = logging.getLogger(__name__)
REDIS_DOWN = Throttled(log)

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
        check_token_shape(token)
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
        """Record the kick of ``uid`` (pmq.domain.kicks), then drop every cached user-centre answer
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
