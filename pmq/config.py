"""Settings: one frozen dataclass per TOML section; :class:`Config` holds them all.

Every key has its built-in default here. pmq.configload reads, merges and checks them once
at start (``load``); every other part of PMQ only reads these values.
"""

from __future__ import annotations

import dataclasses
import typing

CLUSTER_URL = "redis+cluster://"
CLUSTER_BUCKETS = 32  # user buckets ({bN} hash tags) on a Redis Cluster by default
MAX_BUCKETS = 16384  # one per cluster slot at most
DURABILITY = ("none", "aof")  # redis.durability: what a write waits for before its answer
# webhooks.events: every event type PMQ sends to the site (docs/webhooks.md)
EVENT_TYPES = (
    "user.online", "user.offline", "message.acked", "message.read", "message.undelivered",
    "cs.assigned", "cs.closed",
)
MAX_WEBHOOK_BATCH = 100  # events in one POST at most


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 9501
    workers: int = 0  # 0: one per CPU
    task_workers: int = 2
    node: str = ""  # "": the host name
    pid_file: str = ""  # "": /tmp/pmq-NODE.pid
    control_socket: str = ""  # "": the pid file with .sock instead of .pid
    metrics_dir: str = ""  # "": the pid file with .metrics instead of .pid
    graceful_timeout: float = 10.0
    worker_timeout: float = 30.0
    max_frame: int = 65536
    rate: int = 50
    max_pending: int = 1048576
    # a connection over it closes the user's oldest one, cluster-wide, with 4008
    max_connections_per_user: int = 32
    # true: auth.jwt_secret (with auth.mode = "jwt") and ingest.api_key must be set; checked
    # with the other secrets by pmq.workers.startcheck
    require_secrets: bool = False
    # Origins ("https://site.example") whose pages may open a WebSocket; a handshake with
    # another Origin header is refused with 403, one without (native apps) passes. []: any.
    allowed_origins: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    host: str = "127.0.0.1"
    port: int = 9502
    api_key: str = ""
    max_body: int = 65536
    # seconds from a request's first byte until its head and body are in, else 408; also
    # how long a new connection may stay silent before it is closed
    request_timeout: float = 10.0
    # connections one socket worker serves at once; a new one beyond is answered 503
    max_connections: int = 1024


@dataclasses.dataclass(frozen=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "pmq:"
    cluster: bool = False  # also true when url starts with redis+cluster://
    buckets: int = 0  # 0: 1 on a single Redis, CLUSTER_BUCKETS on a cluster
    require_aof: bool = False  # true: a Redis without appendonly fails the start
    durability: str = "none"  # "aof": a write is answered once WAITAOF confirmed its fsync
    wait_replicas: int = 0  # with durability = "aof", replicas that must confirm it too


@dataclasses.dataclass(frozen=True)
class StorageConfig:
    url: str = "sqlite:///var/pmq.db"
    shards: int = 128
    pool_size: int = 8
    shard_map: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class AuthConfig:
    mode: str = "jwt"
    jwt_secret: str = ""  # "": generated once, kept beside the embedded store
    url: str = ""
    timeout: float = 2.0
    cache_ttl: int = 3650
    cache_jitter: int = 3000
    invalid_ttl: int = 60
    issuer: str = ""  # "": not checked; else a JWT's iss must equal it
    audience: str = ""  # "": not checked; else a JWT's aud must name it
    max_token_age: int = 0  # seconds; a JWT with exp - iat over it (or no iat) is refused; 0: off
    revoke_seconds: int = 86400  # a kick refuses the user's older tokens this long; 0: off


@dataclasses.dataclass(frozen=True)
class HeartbeatConfig:
    interval: float = 25.0
    timeout: float = 60.0


@dataclasses.dataclass(frozen=True)
class InboxConfig:
    hot_seconds: int = 86400
    sweep_seconds: int = 60
    retention_seconds: int = 1296000
    # messages a connect replays at most (oldest first); the client pulls the rest
    replay_max: int = 1000


@dataclasses.dataclass(frozen=True)
class BroadcastConfig:
    dedupe_seconds: int = 900
    replay_max: int = 20


@dataclasses.dataclass(frozen=True)
class UnreadConfig:
    push_interval: float = 1.0


@dataclasses.dataclass(frozen=True)
class CsConfig:
    max_sessions_per_agent: int = 5
    idle_seconds: int = 1800
    # new sessions a user may open in any hour; then cs.open answers 429
    max_opens_per_hour: int = 30


@dataclasses.dataclass(frozen=True)
class WebhooksConfig:
    url: str = ""  # "": off; else the site's http(s) URL the events are POSTed to
    secret: str = ""  # HMAC-SHA256 key of X-PMQ-Signature; required when url is set
    events: list[str] = dataclasses.field(default_factory=lambda: list(EVENT_TYPES))
    retry_seconds: int = 86400  # an event still refused this long after it happened is dropped
    offline_grace: float = 5.0  # user.offline only once the user stayed away this long
    undelivered_after: float = 60.0  # message.undelivered for a message unacked this long
    batch: int = MAX_WEBHOOK_BATCH  # events per POST at most
    timeout: float = 10.0  # seconds a POST may take before it counts as failed
    max_backoff: float = 300.0  # seconds between two tries of a failing POST at most


@dataclasses.dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    json: bool = False


@dataclasses.dataclass(frozen=True)
class Config:
    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    ingest: IngestConfig = dataclasses.field(default_factory=IngestConfig)
    redis: RedisConfig = dataclasses.field(default_factory=RedisConfig)
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)
    auth: AuthConfig = dataclasses.field(default_factory=AuthConfig)
    heartbeat: HeartbeatConfig = dataclasses.field(default_factory=HeartbeatConfig)
    inbox: InboxConfig = dataclasses.field(default_factory=InboxConfig)
    broadcast: BroadcastConfig = dataclasses.field(default_factory=BroadcastConfig)
    unread: UnreadConfig = dataclasses.field(default_factory=UnreadConfig)
    cs: CsConfig = dataclasses.field(default_factory=CsConfig)
    webhooks: WebhooksConfig = dataclasses.field(default_factory=WebhooksConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    path: str = ""  # the file it was read from, "" for built-in defaults

    # The settings a HUP (pmqctl reload) applies without restarting workers; a change of
    # any other needs a restart, and the reload says so.
    RELOADABLE: typing.ClassVar[frozenset[str]] = frozenset(
        {
            "log.level", "log.json",
            "inbox.hot_seconds", "inbox.replay_max",
            "broadcast.dedupe_seconds", "broadcast.replay_max",
            "unread.push_interval",
            "cs.max_sessions_per_agent", "cs.idle_seconds", "cs.max_opens_per_hour",
        }
    )  # fmt: skip


SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(Config)[f.name]
    for f in dataclasses.fields(Config)
    if f.name != "path"
}
