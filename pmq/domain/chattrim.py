"""The sweep's trim of chat histories: messages older than retention leave Redis.

:class:`ChatTrim` runs one script (pmq/redis/scripts/chat_trim_history.lua) over the sessions'
history index; the task workers' sweep calls it (pmq.tasks.sweep).
"""

from __future__ import annotations

import orjson
import redis.asyncio as aioredis

from pmq.redis import scripts
from pmq.redis.keys import Keys, key_template


class ChatTrim:
    """Takes chat messages older than retention out of the sessions' histories in Redis (the
    sweep's job). A closed session's hash, history and bodies carry a TTL of the retention,
    so the session itself leaves Redis by then."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.templates = orjson.dumps(
            {"history": key_template(keys.cs_history), "bodies": key_template(keys.cs_bodies)}
        )
        self._trim = scripts.register(redis, "chat_trim_history")

    async def older_than(self, cutoff_ms: int, most: int) -> tuple[int, int]:
        """Trim the messages sent before ``cutoff_ms`` (unix ms) from at most ``most``
        sessions, in one script. Returns (sessions looked at, messages removed); fewer
        sessions than ``most``: none has older messages left."""
        sessions, removed = await self._trim(
            keys=[self.keys.cs_history_index()], args=[self.templates, cutoff_ms, most]
        )
        return int(sessions), int(removed)
