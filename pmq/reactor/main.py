"""The socket worker: WebSocket gateway and ingest HTTP on SO_REUSEPORT listeners.

Everything with a connection or a thread (Redis, the store's thread pool, the event loop)
is created here, after fork. Shutdown runs in the fixed phases of SPEC 1, each bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from redis.exceptions import RedisError

from pmq import metrics, redisconn
from pmq.auth import Authenticator, make_authenticator
from pmq.batching import Batcher
from pmq.broadcast import Broadcasts
from pmq.chat import Chat
from pmq.cluster import Board
from pmq.config import Config
from pmq.durability import confirm_of
from pmq.handlers.base import Handler
from pmq.ids import GeneratorLease, IdGenerator
from pmq.inbox import Inbox
from pmq.journal import StoreJournal
from pmq.keys import Keys
from pmq.kicks import Kicks
from pmq.reactor.catchup import CatchUp, LossCatchUp
from pmq.reactor.connections import Client, ConnectionTable
from pmq.reactor.fanout import Fanout
from pmq.reactor.gateway import Gateway
from pmq.reactor.heartbeat import Heartbeat
from pmq.reactor.http import HttpServer, start_http_server
from pmq.reactor.ingest import build_router
from pmq.reactor.relay import Channels, Relay
from pmq.reactor.reload import load_handlers
from pmq.reactor.replay import LOOK as REPLAY_LOOK
from pmq.reactor.replay import LateReplays, replay
from pmq.reactor.unread import UnreadPusher
from pmq.routing import Routes, oldest_beyond
from pmq.store import Store, open_store
from pmq.unread import Unread
from pmq.wire.client import CloseCode, Kind, Role, encode_hello, stored_message
from pmq.workers.base import BootError, Worker
from pmq.workers.heap import keep_heap_frozen

log = logging.getLogger(__name__)

CLOSE_PHASE_SECONDS = 3.0
REGISTRY_CONNECTIONS = 2  # keep_registry runs one command at a time


class SocketWorker(Worker):
    kind = "socket"
    thread_prefix = "pmq-store"

    def __init__(self, config: Config, index: int, status_fd: int, ppid: int) -> None:
        super().__init__(config, index, status_fd, ppid)
        self.keys = Keys(config.redis.prefix, config.redis.buckets)
        self.table = ConnectionTable()
        self.handlers: dict[str, Handler] = {}
        self.background: list[asyncio.Task[Any]] = []
        self.beat_every = max(0.5, min(5.0, config.heartbeat.interval / 3))
        self.last_beat = time.time()  # the last beat that found our route entries
        self.last_refresh = time.time()  # the last refresh of our users' entries' TTL

    # Services offered to handlers and routes (pmq.handlers.base.App) ------------------
    async def start(self) -> None:
        config = self.config
        self.redis = redisconn.connect(config.redis)
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            raise BootError(f"redis at {config.redis.url}: {exc}") from exc
        # light: cold reads and acks now and then need no big SQLite caches per thread
        self.store: Store = open_store(config.storage, light=True)
        confirm = confirm_of(config.redis)  # redis.durability: what a write waits for
        self.batch = Batcher(self.redis, confirm)  # one connection for the hot path
        # keep_registry's own connections: its beat never waits behind requests for the pool.
        self.registry_redis = redisconn.connect(config.redis, REGISTRY_CONNECTIONS)
        self.routes = Routes(
            self.redis, self.keys, self.id, config.heartbeat.interval, self.batch,
            registry=self.registry_redis,
        )
        self.lease = GeneratorLease(self.registry_redis, self.keys, self.id, self.routes.ttl)
        self.board = Board(
            self.registry_redis, self.keys, self.id, config.heartbeat.interval,
            node=config.server.node, index=self.index, pid=self.pid, master=self.ppid,
        )
        # The worker's one id generator: a lost lease renumbers it for every holder.
        self.ids = IdGenerator(await self.lease.acquire())
        self.journal = StoreJournal(
            self.redis, self.keys, config.inbox.retention_seconds, lost=self.redis_lost
        )
        self.inbox = Inbox(
            self.redis,
            self.keys,
            self.ids,
            config.inbox.hot_seconds,
            config.inbox.retention_seconds,
            self.batch,
            self.journal,
        )
        self.broadcasts = Broadcasts(
            self.redis,
            self.keys,
            self.ids,
            config.broadcast.dedupe_seconds,
            config.broadcast.replay_max,
            config.inbox.retention_seconds,
            confirm,
            self.journal,
        )
        self.unread = Unread(self.redis, self.keys, config.inbox.retention_seconds)
        self.chat = Chat(
            self.redis,
            self.keys,
            self.routes,
            self.inbox,
            lambda: self.config.cs,
            config.inbox.retention_seconds,
            archive=self,
        )
        self.late_replays = LateReplays(
            self.inbox, self.cold_messages, lambda: self.config.inbox.replay_max
        )
        self.unread_pusher = UnreadPusher(config.unread.push_interval, self.table, self.unread)
        self.fanout = Fanout(self.table, self.unread_pusher)
        relay = Relay(self.table, self.unread_pusher)
        self.routes.subscribe(relay.deliver)
        # Read at every handshake (through the hot-path pipeline) and at every registration.
        self.kicks = Kicks(self.redis, self.keys, config.auth.revoke_seconds, self.batch)
        self.authenticator: Authenticator = make_authenticator(
            config, self.redis, self.keys, self.kicks
        )
        self.handlers = load_handlers()
        catch_up = CatchUp(
            self.table, self.inbox, self.broadcasts, self.fanout, self.stored_since
        )
        self.loss_catch_up = LossCatchUp(catch_up)
        self.channels = Channels(self.redis, self.keys, self.id, relay, self.fanout, catch_up)
        await self.channels.start(self.supervise)
        await self.routes.beat()
        self.gateway = Gateway(
            self,
            self.table,
            self.authenticator,
            lambda: self.handlers,
            self.on_open,
            self.on_close,
        )
        try:
            await self.gateway.start(config.server.host, config.server.port)
            self.ingest: HttpServer = await start_http_server(
                build_router(self),
                config.ingest.host,
                config.ingest.port,
                max_body=config.ingest.max_body,
                api_key=config.ingest.api_key,
                request_timeout=config.ingest.request_timeout,
                max_connections=config.ingest.max_connections,
            )
        except OSError as exc:
            raise BootError(f"cannot listen: {exc}") from exc
        heartbeat = Heartbeat(self.table, config.heartbeat.interval, config.heartbeat.timeout)
        self.background += [
            # Restarted no later than its next beat would be, so peers never sweep our routes.
            self.supervise("registry", self.keep_registry, cap=self.beat_every),
            self.supervise("unread", self.unread_pusher.run),
            self.supervise("fanout", self.fanout.run),
            self.supervise("cs-idle", lambda: self.chat.run_idle_closer(self.id)),
            self.supervise("departures", self.routes.remove_departed),
            self.supervise("heap", lambda: keep_heap_frozen(lambda: self.fanout.busy)),
            self.supervise("metrics", metrics.keep_flushed),
            self.supervise("journal", self.journal.watch),
            self.supervise("heartbeat", heartbeat.run),
        ]

    def redis_lost(self, whole_at: float) -> None:
        """Redis lost data it held at ``whole_at``; the journal queued it again for storage."""
        self.loss_catch_up.start(whole_at)

    async def cold_messages(self, uid: str, after: int, limit: int) -> list[dict[str, Any]]:
        rows = await self.in_thread(self.store.unacked, int(uid), after, limit)
        return [stored_message(r.id, r.kind, r.from_uid, r.uid, r.body, r.ts) for r in rows]

    async def stored_since(
        self, uids: Sequence[str], after: int
    ) -> dict[str, list[dict[str, Any]]]:
        """Each user's unacked messages in storage above ``after`` (one read for all)."""
        numbered = [int(uid) for uid in uids if uid.isdigit()]  # storage's users are numbers
        found: dict[str, list[dict[str, Any]]] = {}
        for r in await self.in_thread(self.store.unacked_of, numbered, after):
            found.setdefault(str(r.uid), []).append(
                stored_message(r.id, r.kind, r.from_uid, r.uid, r.body, r.ts)
            )
        return found

    # pmq.chat.Archive: chat history that is no longer (or never was) in Redis ----------
    async def cs_session(self, session_id: int) -> dict[str, Any] | None:
        row = await self.in_thread(self.store.cs_session, session_id)
        if row is None:
            return None
        return {"user": str(row.uid), "agent": None if row.agent is None else str(row.agent)}

    async def cs_messages(self, session_id: int, before: int, limit: int) -> list[dict[str, Any]]:
        rows = await self.in_thread(self.store.cs_messages, session_id, before, limit)
        cs = Kind.CS.value
        return [stored_message(r.id, cs, r.from_uid, r.to_uid, r.body, r.ts) for r in rows]

    # Connections ----------------------------------------------------------------------
    async def on_open(self, client: Client) -> None:
        """Register, close the user's oldest connections past server.max_connections_per_user
        (cluster-wide: the registry holds them all), say hello, replay the inbox in id order
        (its oldest inbox.replay_max), then let live frames through. What only storage holds
        comes later if storage does not answer (pmq.reactor.replay)."""
        client.hold()
        uid, groups = client.uid, client.identity.groups
        pipe = self.redis.pipeline(transaction=False)  # one round trip: register, then read
        registered = self.routes.register_on(pipe, uid, client.conn_id, groups)
        counted = self.routes.connections_on(pipe, uid)
        looked = self.inbox.look_on(pipe, uid, limit=REPLAY_LOOK)
        replayable = self.broadcasts.replay_on(pipe, uid, groups)
        kicked = self.kicks.kicked_since_on(pipe, uid, client.checked_ms)
        replies = iter(await pipe.execute())
        registered(replies)
        connections = counted(replies)
        look = looked(replies)
        broadcast_ids = replayable(replies)
        if kicked(replies):  # between its handshake's check and now (Kicks.kicked_since_on)
            client.close(CloseCode.KICKED, "kicked")
            return
        most = self.config.server.max_connections_per_user
        await self.routes.evict(uid, oldest_beyond(connections, most, client.conn_id))
        await self.unread_pusher.watch(groups)  # a round trip only for a group new here
        client.write(encode_hello(client.conn_id, uid, self.config.heartbeat.interval))
        broadcasts = deque(await self.broadcasts.bodies(broadcast_ids) if broadcast_ids else ())
        complete = await replay(
            client, self.inbox, self.cold_messages, look, broadcasts, self.config.inbox.replay_max
        )
        client.release()
        if not complete:  # storage did not answer: what it holds comes when it does
            self.late_replays.start(client)
        if client.identity.role is Role.AGENT:
            await self.chat.agent_online(client.uid)  # may hand it queued sessions

    async def on_close(self, client: Client) -> None:
        self.late_replays.stop(client)
        if client.identity.role is Role.AGENT:  # its online check reads the registry
            await self.routes.unregister(client.uid, client.conn_id)
            await self.chat.agent_offline(client.uid)
        else:
            self.routes.leave(client.uid, client.conn_id)

    async def keep_registry(self) -> None:
        """Beat, refresh our entries' TTL (3 x interval) once an interval, keep our
        cluster-view entry; sweep workers that stopped beating (their routes and their
        cluster-view entries). Our route entries found missing at a beat (Redis lost
        them) or at a refresh (they expired) are written again at once. An error ends the
        run; the supervisor starts it again (with a refresh and a sweep at once) no later
        than the next beat was due."""
        interval = self.config.heartbeat.interval
        next_sweep = next_refresh = time.monotonic()
        while True:
            beat_at = time.time()
            if not await self.routes.beat() and len(self.table):
                # Redis lost our entries: without them no unicast reaches our users, and
                # what was published since the last beat that found them saw them offline.
                held = [(c.uid, c.conn_id, c.identity.groups) for c in self.table]
                await self.routes.restore(held)
                log.warning("%s wrote its %d route entries again", self.title, len(held))
                self.channels.missed_since(self.last_beat)
            self.last_beat = beat_at
            if time.monotonic() >= next_refresh:
                next_refresh = time.monotonic() + interval
                refresh_at = time.time()
                expired = await self.routes.refresh(self.table.uids())
                if expired:
                    # Their TTL ran out while Redis was away (a cut longer than it): until
                    # written again, publishes see these users offline.
                    held = [(c.uid, c.conn_id, c.identity.groups) for c in self.table]
                    await self.routes.restore([h for h in held if h[0] in expired])
                    log.warning(
                        "%s wrote %d users' expired route entries again", self.title, len(expired)
                    )
                    self.channels.missed_since(self.last_refresh)
                self.last_refresh = refresh_at
            await self.board.report(len(self.table))
            if not await self.lease.renew():
                log.warning("%s lost its id generator lease; taking a new one", self.title)
                self.ids.renumber(await self.lease.acquire())
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + interval / 2
                await self.routes.sweep_dead_workers()
                await self.board.sweep()
            await asyncio.sleep(self.beat_every)

    # Reload, stats, shutdown ------------------------------------------------------------
    async def reload(self) -> None:
        self.handlers = load_handlers()  # raises, keeping the old registry, on any error
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

    async def shutdown(self, fast: bool) -> None:
        """The phases of SPEC 1, each bounded (start() has run: everything exists)."""
        self.gateway.close()  # 1. stop accepting
        self.ingest.close()
        await self.close_clients(0.5 if fast else CLOSE_PHASE_SECONDS)  # 2. close 1001
        for task in self.background:  # 3. nothing may write our entries back after 4.
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.late_replays.close()
        await self.loss_catch_up.close()
        await self.channels.stop()
        with contextlib.suppress(RedisError, OSError):  # 4. remove routes
            removed = await self.routes.forget(self.id)
            log.info("%s removed %d route entries", self.title, removed)
            await self.lease.release()
            await self.board.withdraw()
        left = await self.ingest.drain(0.2 if fast else CLOSE_PHASE_SECONDS)  # 5. drain
        if left:
            log.warning("%s: %d ingest requests cut short", self.title, left)
        await self.channels.close()
        self.batch.close()
        metrics.flush()
        await self.redis.aclose()
        await self.registry_redis.aclose()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def close_clients(self, timeout: float) -> None:
        if not len(self.table):
            return
        count = len(self.table)
        self.gateway.close_all(CloseCode.GOING_AWAY, "server shutting down")
        deadline = time.monotonic() + timeout
        while len(self.table) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        log.info("%s closed %d connections (%d left)", self.title, count, len(self.table))
        for client in self.table:
            client.ws.transport.abort()


def run(config: Config, index: int, status_fd: int, ppid: int) -> int:
    """Entry point called by the master in the forked child."""
    return SocketWorker(config, index, status_fd, ppid).run()
