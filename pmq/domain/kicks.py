"""Kicks that revoke: the time of each user's last kick, kept in Redis for a while.

``POST /api/v1/users/{uid}/kick`` records the kick time (unix ms, by the kicking node's
clock) in ``keys.kicked(uid)``, in the user's bucket, with a TTL of ``auth.revoke_seconds``.
Every node reads it at each JWT handshake of that user (one GET, sent with the other Redis
commands of the loop iteration) and refuses a token issued before the kick.

Clock resolution: the kick is kept in whole milliseconds, ``iat`` in seconds, whole or not
(a JWT NumericDate may have a fraction). A token counts as issued after the kick only when
its ``iat`` lies after the whole of the kick's millisecond (:func:`issued_before`). A
whole-second ``iat`` in the kick's own second is refused, whether the token was minted just
before or just after the kick, so no token older than the kick ever passes: a site that
mints a new token right after a kick with a whole-second ``iat`` sees it refused for less
than a second (plus the clock skew between its host and PMQ's); a client that reconnects
with back-off gets in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import redis.asyncio as aioredis

from pmq.redis.batching import Batcher
from pmq.redis.keys import Keys


def now_ms() -> int:
    return int(time.time() * 1000)


def issued_before(iat: float | None, kicked_ms: int) -> bool:
    """Whether a token issued at ``iat`` (unix seconds; None: unknown) may predate a kick at
    ``kicked_ms`` (truncated to the millisecond): True unless ``iat`` lies after the whole
    of the kick's millisecond."""
    return iat is None or iat * 1000 < kicked_ms + 1


class Kicks:
    """Records kicks and reads them back; ``revoke_seconds`` 0 turns both off (a kick then
    only closes the connections open at that moment).

    Reads go through ``batch`` when given (the socket worker's hot-path pipeline), else
    through ``redis``. Redis errors propagate."""

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, revoke_seconds: int, batch: Batcher | None = None
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.revoke_seconds = revoke_seconds
        self.batch = batch

    @property
    def enabled(self) -> bool:
        return self.revoke_seconds > 0

    async def record(self, uid: str) -> int | None:
        """Note a kick of ``uid`` now; its time (unix ms), None when kicks do not revoke.
        A later kick replaces an earlier one and its TTL starts again."""
        if not self.enabled:
            return None
        kicked = now_ms()
        await self.redis.set(self.keys.kicked(uid), kicked, ex=self.revoke_seconds)
        return kicked

    async def last(self, uid: str) -> int | None:
        """The time (unix ms) of the last kick of ``uid`` within ``revoke_seconds``, or None."""
        if not self.enabled:
            return None
        key = self.keys.kicked(uid)
        raw = await (self.batch.call("GET", key) if self.batch else self.redis.get(key))
        return None if raw is None else int(raw)

    def kicked_since_on(
        self, pipe: Any, uid: str, checked_ms: int
    ) -> Callable[[Iterator[Any]], bool]:
        """Queue on ``pipe`` the read of whether ``uid`` was kicked at or after
        ``checked_ms``; the returned reader takes the pipeline's replies in order.

        A connection registers after its handshake checked the kicks. A kick between the
        two would miss it both ways (the check saw no kick, the kick's close did not see
        the connection), so the registration reads the kick time in its own round trip:
        a kick before it is seen here, a kick after it finds the connection registered."""
        if not self.enabled:
            return lambda replies: False
        pipe.get(self.keys.kicked(uid))

        def read(replies: Iterator[Any]) -> bool:
            raw = next(replies)
            return raw is not None and int(raw) >= checked_ms

        return read
