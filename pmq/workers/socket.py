"""The socket worker: WebSocket gateway and ingest HTTP on SO_REUSEPORT listeners.

Everything with a connection or a thread (Redis, the store's thread pool, the event loop)
is created here, after fork. The worker is a few services, started in the order of
:attr:`SocketWorker.start_order` (each step needs those before it):

1. connect: Redis (a BootError when it does not answer), its registry connections, storage;
2. assemble: the domain on Redis, the id generator's lease, the reactor's parts;
3. subscribe: the worker and broadcast channels, read before anyone can connect;
4. first beat: peers see this worker alive before it takes connections;
5. listen: the gateway and ingest ports (a BootError when a port is taken);
6. run loops: the registry keeper, the pushers and the other forever-loops.

It stops in the fixed phases of :attr:`SocketWorker.stop_order`, each bounded (a fast stop,
an orphan's, shortens the deadlines; the worker base bounds the whole):

1. stop accepting: both listeners close;
2. close 1001: every WebSocket is closed "going away" (CLOSE_PHASE_SECONDS), then aborted;
3. stop loops: the loops, the relay and the catch-ups end, so nothing writes our route
   entries back after 4.;
4. remove routes: our entries and our cluster-view entry leave Redis;
5. drain: ingest requests in flight get CLOSE_PHASE_SECONDS to finish;
6. release ids: the id generator's number is let go, now that no request makes ids here;
7. disconnect: subscriptions, Redis connections, the thread pool close.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from pmq import metrics
from pmq.config import Config
from pmq.domain.authmode import make_authenticator
from pmq.domain.broadcast import Broadcasts
from pmq.domain.centre import make_centre
from pmq.domain.chat import Chat
from pmq.domain.cluster import Board
from pmq.domain.events import Events
from pmq.domain.ids import GeneratorLease, IdGenerator
from pmq.domain.inbox import Inbox
from pmq.domain.journal import StoreJournal
from pmq.domain.kicks import Kicks
from pmq.domain.routing import Routes
from pmq.domain.unread import Unread
from pmq.handlers.base import Handler
from pmq.reactor.catchup import CatchUp, LossCatchUp
from pmq.reactor.connect import Connects
from pmq.reactor.connections import ConnectionTable
from pmq.reactor.fanout import Fanout
from pmq.reactor.gateway import Gateway
from pmq.reactor.heartbeat import Heartbeat
from pmq.reactor.httpserver import HttpServer, start_http_server
from pmq.reactor.ingest import build_router
from pmq.reactor.presence import Presence
from pmq.reactor.registration import Registration
from pmq.reactor.registry import RegistryKeeper
from pmq.reactor.relay import Channels, Relay
from pmq.reactor.reload import load_handlers
from pmq.reactor.replay import ConnectReplay
from pmq.reactor.services import Services
from pmq.reactor.stored import StoredReads
from pmq.reactor.unread import UnreadPusher
from pmq.redis import conn as redisconn
from pmq.redis.batching import Batcher
from pmq.redis.durability import confirm_of
from pmq.redis.keys import Keys
from pmq.store import open_store
from pmq.wire.client import CloseCode
from pmq.workers.base import BootError, Worker
from pmq.workers.heap import keep_heap_frozen

log = logging.getLogger(__name__)

CLOSE_PHASE_SECONDS = 3.0  # phases 2 and 5 of a graceful stop
FAST_CLOSE_SECONDS = 0.5  # phase 2 of a fast stop
FAST_DRAIN_SECONDS = 0.2  # phase 5 of a fast stop
REGISTRY_CONNECTIONS = 2  # the registry keeper runs one command at a time

Step = Callable[["SocketWorker"], Awaitable[None]]
StopStep = Callable[["SocketWorker", bool], Awaitable[None]]


class SocketWorker(Worker):
    kind = "socket"
    thread_prefix = "pmq-store"

    def __init__(self, config: Config, index: int, status_fd: int, ppid: int) -> None:
        super().__init__(config, index, status_fd, ppid)
        self.keys = Keys(config.redis.prefix, config.redis.buckets)
        self.table = ConnectionTable()
        self.handlers: dict[str, Handler] = {}
        self.loops: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        for step in self.start_order:
            await step(self)

    async def shutdown(self, fast: bool) -> None:
        """Stop in the phases of stop_order (start() has run: everything exists)."""
        for phase in self.stop_order:
            await phase(self, fast)

    # Start ----------------------------------------------------------------------------
    async def connect(self) -> None:
        config = self.config
        self.redis = redisconn.connect(config.redis)
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            raise BootError(f"redis at {config.redis.url}: {exc}") from exc
        self.confirm = confirm_of(config.redis)  # redis.durability: what a write waits for
        self.batch = Batcher(self.redis, self.confirm)  # one connection for the hot path
        # The registry keeper's own connections: its beat never waits behind requests.
        self.registry_redis = redisconn.connect(config.redis, REGISTRY_CONNECTIONS)
        # light: cold reads and acks now and then need no big SQLite caches per thread
        self.stored = StoredReads(open_store(config.storage, light=True), self.in_thread)

    async def assemble(self) -> None:
        config, redis, keys = self.config, self.redis, self.keys
        events = Events(self.batch, keys, config.webhooks)  # off without webhooks.url
        self.routes = Routes(
            redis, keys, self.id, config.heartbeat.interval, self.batch,
            registry=self.registry_redis, events=events,
        )
        lease = GeneratorLease(self.registry_redis, keys, self.id, self.routes.ttl)
        board = Board(
            self.registry_redis, keys, self.id, config.heartbeat.interval,
            node=config.server.node, index=self.index, pid=self.pid, master=self.ppid,
        )
        # The worker's one id generator: a lost lease renumbers it for every holder.
        ids = IdGenerator(await lease.acquire())
        retention = config.inbox.retention_seconds
        self.journal = StoreJournal(redis, keys, retention, lost=self.redis_lost)
        inbox = Inbox(
            redis, keys, ids, config.inbox.hot_seconds, retention, self.batch, self.journal,
            events,
        )
        broadcasts = Broadcasts(
            redis, keys, ids, config.broadcast.dedupe_seconds, config.broadcast.replay_max,
            retention, self.confirm, self.journal, self.batch,
        )
        unread = Unread(redis, keys, retention)
        self.chat = Chat(
            redis, keys, self.routes, inbox, lambda: self.config.cs, retention,
            archive=self.stored,
        )
        # Read at every handshake (through the hot-path pipeline) and at every registration.
        kicks = Kicks(redis, keys, config.auth.revoke_seconds, self.batch)
        self.services = Services(
            config, redis, keys, self.routes, inbox, unread, broadcasts, self.chat,
            make_authenticator(config, redis, keys, kicks), self.stored,
            make_centre(
                redis, keys, self.routes, broadcasts, self.stored, retention, self.journal,
                events,
            ),
        )
        self.unread_pusher = UnreadPusher(config.unread.push_interval, self.table, unread)
        self.fanout = Fanout(self.table, self.unread_pusher)
        relay = Relay(self.table, self.unread_pusher)
        self.routes.subscribe(relay.deliver)
        catch_up = CatchUp(self.table, inbox, broadcasts, self.fanout, self.stored.stored_since)
        self.loss_catch_up = LossCatchUp(catch_up)
        self.channels = Channels(redis, keys, self.id, relay, self.fanout, catch_up)
        self.presence = Presence(self.chat)
        self.keeper = RegistryKeeper(
            self.routes, board, lease, ids, self.table, config.heartbeat.interval,
            self.channels.missed_since, self.title, self.presence.restored,
        )
        self.assemble_connects(kicks)

    def assemble_connects(self, kicks: Kicks) -> None:
        services = self.services
        registration = Registration(
            self.batch, self.routes, services.inbox, services.broadcasts, kicks,
            lambda: self.config.server.max_connections_per_user,
        )
        self.replay = ConnectReplay(
            services.inbox, services.broadcasts, self.stored.cold_messages,
            lambda: self.config.inbox.replay_max,  # read at each connect: a reload changes it
        )
        connects = Connects(
            registration, self.replay, self.presence, self.unread_pusher,
            lambda: self.config.heartbeat.interval,
        )
        self.handlers = load_handlers()
        self.gateway = Gateway(
            services, self.table, services.authenticator, lambda: self.handlers,
            connects.opened, connects.closed, connects.leaving,
        )

    async def subscribe(self) -> None:
        await self.channels.start(self.supervise)

    async def first_beat(self) -> None:
        await self.routes.beat()

    async def listen(self) -> None:
        config = self.config
        try:
            await self.gateway.start(config.server.host, config.server.port)
            self.ingest: HttpServer = await start_http_server(
                build_router(self.services),
                config.ingest.host,
                config.ingest.port,
                max_body=config.ingest.max_body,
                api_key=config.ingest.api_key,
                request_timeout=config.ingest.request_timeout,
                max_connections=config.ingest.max_connections,
            )
        except OSError as exc:
            raise BootError(f"cannot listen: {exc}") from exc

    async def run_loops(self) -> None:
        heartbeat = self.config.heartbeat
        pings = Heartbeat(self.table, heartbeat.interval, heartbeat.timeout)
        self.loops += [
            # Restarted no later than its next beat would be, so peers never sweep our routes.
            self.supervise("registry", self.keeper.run, cap=self.keeper.every),
            self.supervise("unread", self.unread_pusher.run),
            self.supervise("fanout", self.fanout.run),
            self.supervise("cs-idle", lambda: self.chat.run_idle_closer(self.id)),
            self.supervise("departures", self.routes.remove_departed),
            self.supervise("heap", lambda: keep_heap_frozen(lambda: self.fanout.busy)),
            self.supervise("metrics", metrics.keep_flushed),
            self.supervise("journal", self.journal.watch),
            self.supervise("heartbeat", pings.run),
        ]

    start_order: tuple[Step, ...] = (
        connect, assemble, subscribe, first_beat, listen, run_loops,
    )

    # Stop -----------------------------------------------------------------------------
    async def stop_accepting(self, fast: bool) -> None:
        self.gateway.close()
        self.ingest.close()

    async def close_connections(self, fast: bool) -> None:
        """Close every WebSocket with 1001 and wait for them to go, within the phase's
        deadline; abort those left."""
        count = len(self.table)
        if not count:
            return
        self.gateway.close_all(CloseCode.GOING_AWAY, "server shutting down")
        deadline = time.monotonic() + (FAST_CLOSE_SECONDS if fast else CLOSE_PHASE_SECONDS)
        while len(self.table) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        log.info("%s closed %d connections (%d left)", self.title, count, len(self.table))
        for client in self.table:
            client.ws.abort()

    async def stop_loops(self, fast: bool) -> None:
        for task in self.loops:
            task.cancel()
        await asyncio.gather(*self.loops, return_exceptions=True)
        await self.replay.close()
        await self.loss_catch_up.close()
        await self.channels.stop()

    async def remove_routes(self, fast: bool) -> None:
        await self.keeper.withdraw(self.id)

    async def drain(self, fast: bool) -> None:
        left = await self.ingest.drain(FAST_DRAIN_SECONDS if fast else CLOSE_PHASE_SECONDS)
        if left:
            log.warning("%s: %d ingest requests cut short", self.title, left)

    async def release_ids(self, fast: bool) -> None:
        await self.keeper.release_ids()

    async def disconnect(self, fast: bool) -> None:
        await self.channels.close()
        self.batch.close()
        metrics.flush()
        await self.redis.aclose()
        await self.registry_redis.aclose()
        self.executor.shutdown(wait=False, cancel_futures=True)

    stop_order: tuple[StopStep, ...] = (
        stop_accepting, close_connections, stop_loops, remove_routes, drain, release_ids,
        disconnect,
    )

    # Reload, stats, Redis loss --------------------------------------------------------
    async def reload(self, fresh: Config) -> None:
        handlers = load_handlers()  # raises, keeping the old registry, on any error
        # The parts that keep a reloadable setting of their own; the others read self.config.
        services = self.services
        services.inbox.hot_seconds = fresh.inbox.hot_seconds
        services.broadcasts.dedupe_seconds = fresh.broadcast.dedupe_seconds
        services.broadcasts.replay_max = fresh.broadcast.replay_max
        self.unread_pusher.interval = fresh.unread.push_interval
        self.handlers = handlers
        log.info("%s reloaded %d actions", self.title, len(self.handlers))

    def stats(self) -> dict[str, Any]:
        """Sent with every heartbeat, which starts only once start() has finished."""
        metrics.CONNECTIONS.set(len(self.table))
        return {
            "id": self.id,
            "connections": len(self.table),
            "broadcast_deliveries": self.fanout.delivered,
            "fanout_max_stall_ms": round(self.fanout.max_stall_ms, 2),
            "ingest_in_flight": self.ingest.in_flight,
            "ingest_connections": self.ingest.served,
            "ingest_timed_out": self.ingest.timed_out,  # 408s since start
            "ingest_refused": self.ingest.refused,  # 503s over ingest.max_connections
        }

    def redis_lost(self, whole_at: float) -> None:
        """Redis lost data it held at ``whole_at``; the journal queued it again for storage."""
        self.loss_catch_up.start(whole_at)


def run(config: Config, index: int, status_fd: int, ppid: int) -> int:
    """Entry point called by the master in the forked child."""
    return SocketWorker(config, index, status_fd, ppid).run()
