"""Every Redis key and channel PMQ uses, one method each, under one namespace prefix.

Handlers and workers never build a key by hand: they ask a :class:`Keys` made from
``redis.prefix``. Tests give each run its own prefix so runs never collide.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Keys:
    prefix: str = "pmq:"

    # Connection registry -------------------------------------------------------------
    def user_conns(self, uid: str) -> str:
        """HASH conn_id -> worker id: the live connections of one user, on every node."""
        return f"{self.prefix}u:{uid}:conns"

    def worker_conns(self, worker_id: str) -> str:
        """HASH conn_id -> uid: what one socket worker holds, for cleanup after a crash."""
        return f"{self.prefix}w:{worker_id}:conns"

    def workers(self) -> str:
        """ZSET worker id -> last heartbeat (unix ms) of every live socket worker."""
        return f"{self.prefix}workers"

    def worker_channel(self, worker_id: str) -> str:
        """Pub/sub channel one socket worker listens on for frames to its connections."""
        return f"{self.prefix}ch:{worker_id}"

    def nodes(self) -> str:
        """HASH node -> JSON status summary, written by each node's workers."""
        return f"{self.prefix}nodes"

    # Auth ---------------------------------------------------------------------------
    def auth_cache(self, token_digest: str) -> str:
        """STRING: the user centre's answer for one token (JSON), with a jittered TTL."""
        return f"{self.prefix}auth:{token_digest}"
