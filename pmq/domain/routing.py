"""The connection registry in Redis and delivery of frames to a user wherever they are.

Every socket worker keeps, in Redis: ``user_conns(uid)`` (conn id -> worker id) for each of
its users, ``worker_conns(wid)`` (conn id -> uid) and its heartbeat in ``workers``. Keys carry
a TTL of 3 x ``heartbeat.interval`` that the worker's heartbeat refreshes, so the entries of a
worker that died without cleaning up expire by themselves; survivors also sweep dead workers'
entries, and readers skip entries whose worker stopped beating.

:meth:`Routes.deliver` gets a frame to every connection of a user: other workers get it
through their sharded pub/sub channel, one SPUBLISH per worker (on a Redis Cluster it goes
to the one shard owning the channel), and this worker's connections through its own
channel in process (:data:`Here`), as values, with nothing encoded. What a relay op does to
the sockets is the reactor's (pmq.reactor.relay): nothing here calls up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import orjson
import redis.asyncio as aioredis

from pmq.domain.events import NO_EVENTS, Events
from pmq.redis import scripts
from pmq.redis.batching import Batcher
from pmq.redis.keys import Keys
from pmq.wire import relay
from pmq.wire.relay import Op, UnreadState

log = logging.getLogger(__name__)
# Bound once for the publish's path: Op.X, looked up on the enum class, costs about 100 ns.
PUSH, MESSAGE = Op.PUSH, Op.MESSAGE

GROUPS_TTL = 30 * 86400
DEPARTURE_BATCH = 1000  # closed connections removed from the registry per round trip
MAX_DEPARTURES = 200_000  # queued while Redis is away; older ones are left to their TTL

# This worker's own channel, in process: (op, uid, payload, sent, state) -> connections
# reached. The payload is what the op says (pmq.wire.relay.Op), except that Op.MESSAGE comes
# apart: the payload is the push frame, ``state`` the unread state the publish read (None
# for every other op). The worker's relay consumer subscribes to it (Routes.subscribe).
Here = Callable[[Op, str, bytes, float, UnreadState | None], int]


def nobody_here(op: Op, uid: str, payload: bytes, sent: float, state: UnreadState | None) -> int:
    """The channel of a worker that holds no connections (tools, tests): reaches nobody."""
    return 0


def oldest_beyond(conns: dict[str, str], most: int, keep: str) -> dict[str, str]:
    """The oldest of ``conns`` (conn id -> worker id) past the newest ``most``, never
    ``keep``: the connections a user's new one (``keep``) closes. Conn ids sort by opening
    time (pmq.reactor.connections.new_conn_id). Two connects at once each close the oldest
    beyond the bound they saw, so together they leave ``most`` open."""
    over = len(conns) - most
    if over <= 0:
        return {}
    oldest = sorted(conn for conn in conns if conn != keep)[:over]
    return {conn: conns[conn] for conn in oldest}


def skip(replies: int) -> Callable[[Iterator[Any]], None]:
    """A reader for commands queued on a shared pipeline whose replies nobody needs."""

    def read(found: Iterator[Any]) -> None:
        for _ in range(replies):
            next(found)

    return read


class Routes:
    """One socket worker's view of the registry. Create after fork, one per worker."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        worker_id: str,
        heartbeat_interval: float,
        batch: Batcher | None = None,
        registry: aioredis.Redis | None = None,
        events: Events = NO_EVENTS,
    ) -> None:
        self.redis = redis
        self.events = events  # user.offline scheduled as connections leave the registry
        # The heartbeat's own client (beat, restore, refresh, sweep): under load a burst of
        # requests can hold every pooled connection of ``redis`` for seconds, and a beat
        # that waits behind them gets this worker swept as dead by its peers.
        self.registry = registry or redis
        self.keys = keys
        self.worker_id = worker_id
        self.ttl = max(3, int(3 * heartbeat_interval))
        self.stale_ms = int(2 * heartbeat_interval * 1000)
        self.here: Here = nobody_here
        # Workers that stopped beating: their entries are skipped until a sweep removes them.
        # (Not a set of live ones: a worker that just started must be reachable at once.)
        self.stale_workers: set[str] = set()
        self._forget = scripts.register(redis, "routing_forget_conns")
        self._refresh = scripts.register(redis, "routing_refresh")
        self.departures: list[tuple[str, str]] = []  # (uid, conn id) closed, not yet removed
        self.departed = asyncio.Event()
        self.emptied: asyncio.Future[None] | None = None  # done once those are all removed
        self.batch = batch or Batcher(redis)  # relays, sent with the worker's publishes

    def subscribe(self, here: Here) -> None:
        """Hand what this worker publishes for its own connections to ``here``."""
        self.here = here

    # Registry writes ----------------------------------------------------------------
    async def register(self, uid: str, conn_id: str, groups: Sequence[str] = ()) -> None:
        """Add a connection; also remember the user's groups (for counting broadcasts)."""
        pipe = self.redis.pipeline(transaction=False)
        self.register_on(pipe, uid, conn_id, groups)
        await pipe.execute()

    def register_on(
        self, pipe: Any, uid: str, conn_id: str, groups: Sequence[str] = ()
    ) -> Callable[[Iterator[Any]], None]:
        """register() queued on the caller's ``pipe``; what it returns takes its replies
        off an iterator over the pipeline's."""
        pipe.set(self.keys.user_groups(uid), orjson.dumps(list(groups)), ex=GROUPS_TTL)
        pipe.hset(self.keys.user_conns(uid), conn_id, self.worker_id)
        pipe.expire(self.keys.user_conns(uid), self.ttl)
        pipe.hset(self.keys.worker_conns(self.worker_id), conn_id, uid)
        pipe.expire(self.keys.worker_conns(self.worker_id), self.ttl)
        return skip(5)

    def connections_on(self, pipe: Any, uid: str) -> Callable[[Iterator[Any]], dict[str, str]]:
        """connections() queued on the caller's ``pipe`` (after register_on(): the new
        connection among them); what it returns takes its reply off the replies."""
        pipe.hgetall(self.keys.user_conns(uid))

        def read(replies: Iterator[Any]) -> dict[str, str]:
            return self._live(next(replies))

        return read

    async def evict(self, uid: str, conns: dict[str, str]) -> int:
        """Close ``conns`` (conn id -> worker id) of ``uid`` with 4008, wherever they are;
        returns how many were reached."""
        if not conns:
            return 0
        return await self._close(Op.EVICT, uid, conns, " ".join(conns).encode())

    async def _close(self, op: Op, uid: str, conns: dict[str, str], payload: bytes) -> int:
        """Close ``conns`` of ``uid`` wherever they are (``op``: a kick or an eviction).
        Their entries leave the registry at once, not when each closing handshake ends: the
        next connect counts without them, and a reader sees the user without them."""
        if conns:
            await self.redis.hdel(self.keys.user_conns(uid), *conns)
        return await self.send([(op, uid, conns, payload)])

    async def unregister(self, uid: str, conn_id: str) -> None:
        """Remove a closed connection now (leave() queues it instead)."""
        pipe = self.redis.pipeline(transaction=False)
        self._remove_on(pipe, [(uid, conn_id)])
        await pipe.execute()
        await self.events.left([uid])

    def _remove_on(self, pipe: Any, departed: Sequence[tuple[str, str]]) -> None:
        for uid, conn_id in departed:
            pipe.hdel(self.keys.user_conns(uid), conn_id)
        pipe.hdel(self.keys.worker_conns(self.worker_id), *(conn for _, conn in departed))

    def leave(self, uid: str, conn_id: str) -> asyncio.Future[None]:
        """Queue a closed connection's removal; remove_departed() writes them in batches, so
        a mass disconnect costs a few round trips, not one per connection competing for
        the pool (which ran dry at 12,500 closes at once). The future is done once the
        queue has been written out with this one in it (never while Redis is away)."""
        if len(self.departures) >= MAX_DEPARTURES:
            del self.departures[0]
        self.departures.append((uid, conn_id))
        self.departed.set()
        if self.emptied is None:
            self.emptied = asyncio.get_running_loop().create_future()
        return self.emptied

    async def remove_departed(self) -> None:
        """Run for the worker's life: remove queued departures, DEPARTURE_BATCH a round
        trip. A batch whose removal fails goes back to the head of the queue before the
        error is raised, so the next run (the supervisor starts one) tries it first."""
        while True:
            while self.departures:
                batch = self.departures[:DEPARTURE_BATCH]
                del self.departures[:DEPARTURE_BATCH]
                pipe = self.redis.pipeline(transaction=False)
                self._remove_on(pipe, batch)
                try:
                    await pipe.execute()
                    await self.events.left(uid for uid, _ in batch)
                except BaseException:
                    self.departures[:0] = batch
                    raise
            if self.emptied is not None:
                self.emptied.set_result(None)
                self.emptied = None
            await self.departed.wait()
            self.departed.clear()

    async def beat(self) -> bool:
        """Mark this worker alive (one round trip, whatever it holds). False when Redis
        holds no connection entries of this worker: a worker that has connections must
        write them again (restore()), for Redis lost them (emptied, or restored from an
        old snapshot) or its peers swept it as dead."""
        now_ms = int(time.time() * 1000)
        pipe = self.registry.pipeline(transaction=False)
        pipe.zadd(self.keys.workers(), {self.worker_id: now_ms})
        pipe.expire(self.keys.worker_conns(self.worker_id), self.ttl)
        pipe.zrangebyscore(self.keys.workers(), "-inf", now_ms - self.stale_ms)
        _, held, stale = await pipe.execute()
        self.stale_workers = {w.decode() for w in stale} - {self.worker_id}
        return bool(held)

    async def restore(
        self, conns: Sequence[tuple[str, str, Sequence[str]]], chunk: int = 1000
    ) -> None:
        """Write the entries of ``conns`` (uid, conn id, groups) again, as a connect does:
        ``chunk`` connections per round trip; then the users' presence for the site."""
        for start in range(0, len(conns), chunk):
            pipe = self.registry.pipeline(transaction=False)
            for uid, conn_id, groups in conns[start : start + chunk]:
                self.register_on(pipe, uid, conn_id, groups)
            await pipe.execute()
        await self.events.online_again(uid for uid, _, _ in conns)

    async def refresh(self, uids: Sequence[str], chunk: int = 5000) -> set[str]:
        """Push back the TTL of our users' entries: one Lua call per ``chunk`` users of a
        bucket (a script stays in one slot), since a command per user would cost the loop
        more than the rest of an idle worker. Returns the users whose entries were gone:
        they expired while Redis was out of reach for longer than their TTL (the beat keeps
        our own list alive more often, so beat() still finds it)."""
        missing: set[str] = set()
        for indexes in self.keys.by_bucket(uids).values():
            bucket_uids = [uids[i] for i in indexes]
            for start in range(0, len(bucket_uids), chunk):
                part = bucket_uids[start : start + chunk]
                keys = [self.keys.user_conns(uid) for uid in part]
                gone = await self._refresh(keys=keys, args=[self.ttl], client=self.registry)
                missing.update(part[int(i) - 1] for i in gone)
        return missing

    async def sweep_dead_workers(self) -> int:
        """Forget the entries of workers that stopped beating; returns how many went."""
        cutoff = int(time.time() * 1000) - self.stale_ms
        dead = cast(
            list[bytes], await self.registry.zrangebyscore(self.keys.workers(), "-inf", cutoff)
        )
        forgotten = 0
        for raw in dead:
            worker_id = raw.decode()
            forgotten += await self.forget(worker_id)
            log.warning("forgot %s: no heartbeat for %.0fs", worker_id, self.stale_ms / 1000)
        return forgotten

    async def forget(self, worker_id: str, chunk: int = 5000) -> int:
        """Remove every entry of ``worker_id`` (ours at stop, or a dead one's): its
        connections from their users' entries, one Lua call per ``chunk`` users of a
        bucket, then its own list and heartbeat. Each step is idempotent and the list goes
        last, so a forget cut short is finished by the next one."""
        worker_key = self.keys.worker_conns(worker_id)
        entries = cast(dict[bytes, bytes], await self.registry.hgetall(worker_key))
        conn_of: dict[str, list[str]] = {}
        for conn, uid in entries.items():
            conn_of.setdefault(uid.decode(), []).append(conn.decode())
        users = list(conn_of)
        for indexes in self.keys.by_bucket(users).values():
            pairs = [(users[i], conn) for i in indexes for conn in conn_of[users[i]]]
            for start in range(0, len(pairs), chunk):
                part = pairs[start : start + chunk]
                await self._forget(
                    keys=[self.keys.user_conns(uid) for uid, _ in part],
                    args=[worker_id, *(conn for _, conn in part)],
                    client=self.registry,
                )
        pipe = self.registry.pipeline(transaction=False)
        pipe.delete(worker_key)
        pipe.zrem(self.keys.workers(), worker_id)
        await pipe.execute()
        return len(entries)

    # Reads and delivery -------------------------------------------------------------
    async def groups(self, uid: str) -> list[str]:
        """The groups of the user's last connection ([] when unknown)."""
        raw = await self.redis.get(self.keys.user_groups(uid))
        return list(orjson.loads(raw)) if raw else []

    async def connections(self, uid: str) -> dict[str, str]:
        """conn id -> worker id for every live connection of ``uid``."""
        entries = cast(dict[bytes, bytes], await self.redis.hgetall(self.keys.user_conns(uid)))
        return self._live(entries)

    async def online(self, uids: Sequence[str]) -> dict[str, int]:
        """uid -> live connections, cluster-wide, for those of ``uids`` that are online: one
        round trip (a pipeline of reads)."""
        pipe = self.redis.pipeline(transaction=False)
        for uid in uids:
            pipe.hgetall(self.keys.user_conns(uid))
        found = await pipe.execute()
        counts = (len(self._live(entries)) for entries in found)
        return {uid: n for uid, n in zip(uids, counts, strict=True) if n}

    def _live(self, entries: dict[bytes, bytes]) -> dict[str, str]:
        """A user's registry entries without those of workers that stopped beating."""
        return {
            conn.decode(): wid
            for conn, raw in entries.items()
            if (wid := raw.decode()) not in self.stale_workers
        }

    async def deliver(self, uid: str, frame: bytes, op: Op = Op.PUSH) -> int:
        """Push ``frame`` to every connection of ``uid``; returns how many it went to."""
        return await self.send([(op, uid, await self.connections(uid), frame)])

    async def kick(self, uid: str, reason: str) -> int:
        """Close every connection of ``uid`` on every node (close code 4001): when the kick
        answers, the user reads offline."""
        return await self._close(Op.KICK, uid, await self.connections(uid), reason.encode())

    async def notify_unread(self, uid: str) -> None:
        """Tell every worker holding ``uid`` that the counters changed."""
        await self.send([(Op.UNREAD, uid, await self.connections(uid), b"")])

    async def send(self, items: Sequence[tuple[Op, str, dict[str, str], bytes]]) -> int:
        """Apply (op, uid, connections, payload) items: ours at once, others' through one
        SPUBLISH per worker and item, sent with the others of this loop iteration (one
        pipeline, pmq.redis.batching). Returns connections reached."""
        reached = 0
        sent = time.time()
        remote: list[tuple[str, bytes, int]] = []
        for op, uid, conns, payload in items:
            for wid, count in self._workers(conns).items():
                if wid == self.worker_id:
                    reached += self.here(op, uid, payload, sent, None)
                else:
                    remote.append((wid, relay.encode(op, uid, payload, sent), count))
        if remote:
            reached += await self._relay(remote)
        return reached

    async def push_messages(
        self, pushes: Sequence[tuple[str, dict[str, str], bytes, UnreadState | None]]
    ) -> int:
        """send() for new messages: (uid, connections, push frame, the user's unread state as
        the publish read it, or None when the message counts nothing). Ours get the frame,
        and the badge from that state, without encoding it for a relay; other workers get
        Op.MESSAGE (Op.PUSH when nothing counts). Returns connections reached."""
        reached = 0
        sent = time.time()
        remote: list[tuple[str, bytes, int]] = []
        for uid, conns, frame, state in pushes:
            for wid, count in self._workers(conns).items():
                if wid == self.worker_id:
                    op = PUSH if state is None else MESSAGE
                    reached += self.here(op, uid, frame, sent, state)
                elif state is None:
                    remote.append((wid, relay.encode(PUSH, uid, frame, sent), count))
                else:
                    payload = relay.encode_message(frame, state)
                    remote.append((wid, relay.encode(MESSAGE, uid, payload, sent), count))
        if remote:
            reached += await self._relay(remote)
        return reached

    async def push_again(self, pushes: Sequence[tuple[str, dict[str, str], bytes]]) -> int:
        """send() of Op.AGAIN: (uid, connections, push frame) of repeated messages."""
        return await self.send([(Op.AGAIN, uid, conns, frame) for uid, conns, frame in pushes])

    def _workers(self, conns: dict[str, str]) -> dict[str, int]:
        """worker id -> how many of ``conns`` it holds. Workers that missed their beats are
        kept: after a Redis outage longer than two beats every worker looks stale until it
        beats again, and a dead one's channel has no subscriber (nothing counts reached)."""
        per_worker: dict[str, int] = {}
        for wid in conns.values():
            per_worker[wid] = per_worker.get(wid, 0) + 1
        return per_worker

    async def _relay(self, remote: list[tuple[str, bytes, int]]) -> int:
        """SPUBLISH each (worker, relay message, its connections); connections reached."""
        calls = [
            self.batch.call("SPUBLISH", self.keys.worker_channel(wid), message)
            for wid, message, _ in remote
        ]
        # a unicast relays at most once: no gather (a task per call) for one
        receivers = [await calls[0]] if len(calls) == 1 else await asyncio.gather(*calls)
        return sum(count for (_, _, count), n in zip(remote, receivers, strict=True) if n)
