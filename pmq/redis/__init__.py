"""Floor 2, the Redis plumbing: every key and TTL (:mod:`~pmq.redis.keys`), the pooled
clients (``conn``), the hot path's RESP connection and pipe (``resp``, ``pipe``), the
per-loop batching and the AOF confirmation (``batching``, ``durability``), the start-time
checks of a Redis server (``check``), leases (``locks``) and every Lua script
(``scripts``). It knows how to talk to Redis, not what PMQ keeps there; it imports only
the floors below (the base modules at pmq/'s root and pmq.wire). Inside this package
``import redis`` still means redis-py: imports are absolute.
"""
