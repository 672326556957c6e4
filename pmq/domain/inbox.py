"""The durable inbox and unread counters, on Redis (docs/protocol.md).

Accepting a message is one Lua call: the message enters the user's hot inbox (a ZSET of
ids beside a HASH of bodies), the unread counter moves, a storage operation is queued for
the task workers, and the user's live connections and counters are read back for delivery
(the counters for the badge sent with the push) — atomically, so a message is either
accepted whole or not at all. It stays until ``msg.ack`` names it.

The keys a call touches share the recipients' bucket (pmq.redis.keys): the bucket's storage queue,
inbox index and dedupe key. A multicast to users of several buckets is one call per bucket,
run concurrently; each bucket's part is deduplicated on its own, so a retry after a partial
failure finds the parts that were accepted (and answers their first ids) and accepts the
rest. On a single Redis (one bucket) a publish is one call, as a unicast always is.

Unread counters live beside it (pmq.domain.unread). Messages older than ``inbox.hot_seconds`` are
moved to storage by the sweep (pmq.tasks); replay and ``msg.pull`` read those from storage
first, then the hot ones, in id order, as amended (retracted or edited, pmq.domain.amend).
Storage is read for a user flagged cold, and for every user while their bucket's Redis data
is not known complete (pmq.domain.epochs).

Every read is one page: the ids of the hot inbox come by a ZRANGEBYSCORE with a LIMIT, the
bodies of those alone, and storage's rows with a LIMIT, so no request reads a whole inbox
however many messages wait in it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, NamedTuple, cast

import orjson
import redis.asyncio as aioredis

from pmq.domain.epochs import RedisMarks
from pmq.domain.events import NO_EVENTS, Events
from pmq.domain.ids import IdGenerator, timestamp_ms
from pmq.domain.journal import StoreJournal
from pmq.redis import scripts
from pmq.redis.batching import Batcher
from pmq.redis.keys import Keys
from pmq.redis.locks import delete_if
from pmq.wire import storeops
from pmq.wire.client import Message
from pmq.wire.events import EventType
from pmq.wire.relay import UnreadState

PUBLISH_DEDUPE_SECONDS = 86400


@dataclasses.dataclass(frozen=True, slots=True)
class Accepted:
    """What publish did: the ids (one per recipient, in order), and for each message newly
    accepted (not a repeat) its recipient, wire JSON and the user's live connections."""

    ids: list[str]
    duplicate: bool  # every part was a repeat of its idempotency key: nothing new
    recipients: list[str]  # of the new messages, aligned with encoded and connections
    encoded: list[bytes]  # each new message's wire JSON, to wrap in a push frame
    connections: list[dict[str, str]]  # conn id -> worker id, per new message
    # per new message that counts, to a user online: the user's unread counters as the
    # publish read them; else None
    unread: list[UnreadState | None]
    # per repeated message still unacked: (recipient, wire JSON, live connections), for
    # pmq.domain.messaging to push again where it was not pushed
    repeated: list[tuple[str, bytes, dict[str, str]]] = dataclasses.field(default_factory=list)


class Acked(NamedTuple):
    """What Inbox.ack did: the ids that were hot (removed from Redis), and how many of the
    others it queued for storage to ack (the user may have messages there)."""

    hot: set[int]
    cold: int


@dataclasses.dataclass(frozen=True, slots=True)
class Look:
    """A first look at a user's inbox: the first ``limit`` hot ids above ``after`` in id
    order, the cold flag (set while storage holds messages of the user that left Redis), and
    whether the user's bucket is known complete in Redis (if not, storage may hold any of
    theirs)."""

    after: int
    limit: int
    hot_ids: list[int]
    cold_mark: bytes | None
    complete: bool


ColdReader = Callable[[str, int, int], Awaitable[list[dict[str, Any]]]]


class Inbox:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        ids: IdGenerator,
        hot_seconds: int,
        retention_seconds: int,
        batch: Batcher | None = None,
        journal: StoreJournal | None = None,
        events: Events = NO_EVENTS,
    ) -> None:
        self.redis = redis
        self.events = events  # message.undelivered timers and message.acked
        self.journal = journal  # a socket worker's, so an emptied Redis loses no 202
        self.keys = keys
        self.ids = ids
        self.hot_seconds = hot_seconds
        self.ttl = retention_seconds
        self._publish = scripts.register(redis, "inbox_publish")
        self._bucket_keys_made: dict[int, tuple[str, str, str, str]] = {}
        self._plain_head = ("0", PUBLISH_DEDUPE_SECONDS, self.ttl, b"")  # ARGV: no dedupe key
        self.batch = batch or Batcher(redis)
        self._ack = scripts.register(redis, "inbox_ack")
        self.marks = RedisMarks(redis, keys)

    def publish(
        self,
        recipients: Sequence[str],
        kind: str,
        sender: str | None,
        body: Any,
        dedupe_key: str | None = None,
    ) -> Awaitable[Accepted]:
        """Accept one message per recipient; a repeated ``dedupe_key`` returns the first ids.
        The ids are taken at the call; awaiting the result accepts the messages."""
        now = int(time.time() * 1000)
        messages = [Message(self.ids.next(), kind, sender, to, body, now) for to in recipients]
        return self._accept(messages, list(recipients), dedupe_key)

    def accept(
        self, messages: Sequence[Message], dedupe_key: str | None = None
    ) -> Awaitable[Accepted]:
        """:meth:`publish` for messages the caller made (each with its id and its ``to``)."""
        return self._accept(messages, [cast(str, m.to) for m in messages], dedupe_key)

    # publish() and accept() hand back this coroutine rather than await it in one of their
    # own: a coroutine layer is a measurable part of an ingest request's CPU (bench.hotpath).
    async def _accept(
        self, messages: Sequence[Message], recipients: list[str], dedupe_key: str | None
    ) -> Accepted:
        """Accept ``messages``, ``recipients`` their ``to`` in the same order."""
        ids = [str(m.id) for m in messages]
        parts = self.keys.by_bucket(recipients)  # bucket -> positions of its messages
        if len(parts) == 1:  # a unicast, or any publish on a single Redis: one call
            [bucket] = parts
            previous, encoded, conns, states = await self._publish_part(
                bucket, messages, recipients, dedupe_key
            )
            if previous is not None:  # accepted before: its first ids
                ids[: len(previous)] = previous[: len(ids)]
                return Accepted(ids, True, [], [], [], [], _repeated(messages, encoded, conns))
            return Accepted(ids, False, recipients, encoded, conns, states)
        results = await asyncio.gather(
            *(
                self._publish_part(
                    bucket,
                    [messages[i] for i in indexes],
                    [recipients[i] for i in indexes],
                    dedupe_key,
                )
                for bucket, indexes in parts.items()
            )
        )
        duplicate = True
        new_recipients: list[str] = []
        encoded = []
        connections: list[dict[str, str]] = []
        unread: list[UnreadState | None] = []
        repeated: list[tuple[str, bytes, dict[str, str]]] = []
        for indexes, (previous, wires, conns, states) in zip(
            parts.values(), results, strict=True
        ):
            if previous is not None:  # this part was accepted before: its first ids
                for i, first in zip(indexes, previous, strict=False):
                    ids[i] = first
                repeated += _repeated([messages[i] for i in indexes], wires, conns)
                continue
            duplicate = False
            new_recipients += [recipients[i] for i in indexes]
            encoded += wires
            connections += conns
            unread += states
        return Accepted(ids, duplicate, new_recipients, encoded, connections, unread, repeated)

    async def _publish_part(
        self,
        bucket: int,
        messages: Sequence[Message],
        recipients: Sequence[str],
        dedupe_key: str | None,
    ) -> tuple[list[str] | None, list[bytes], list[dict[str, str]], list[UnreadState | None]]:
        """One inbox_publish call for messages to users of one bucket, ``recipients`` their
        ``to`` in the same order: (the first ids when the key was seen before, else None;
        the wire JSONs; the connections per message; the unread state per message, None
        when it counts nothing)."""
        head_keys = self._bucket_keys(bucket)
        keys: list[Any] = []
        args: list[Any] = []
        encoded = []
        ops = []
        for m, to in zip(messages, recipients, strict=True):
            wire = m.encode()
            encoded.append(wire)
            op = storeops.encode_message(wire)
            ops.append(op)
            keys += self.keys.publish_keys(to)
            args += [
                m.id,
                # Scored by the id's own time, not m.ts: ids made over several milliseconds
                # (a large multicast, another worker) must never score below an older id's
                # time, or hot()'s range from timestamp_ms(after) would skip them.
                timestamp_ms(m.id),
                to,
                wire,
                m.kind if m.counts_unread else "",
                op,
            ]
        # Sent with the other publishes of this loop iteration: one round trip for all.
        timers = self.events.timers(
            bucket, [(to, m.id, m.kind) for m, to in zip(messages, recipients, strict=True)]
        )
        if dedupe_key:  # alone: the script looks the key up first
            dedupe = [self.keys.publish_dedupe(dedupe_key, bucket), *head_keys[1:]]
            first_ids = orjson.dumps([str(m.id) for m in messages])
            result = await self.batch.script(
                self._publish,
                dedupe + keys,
                ["1", PUBLISH_DEDUPE_SECONDS, self.ttl, first_ids, *args],
            )
        else:  # one call with the other publishes of this loop iteration
            result = await self.batch.script_merged(
                self._publish, (head_keys, self._plain_head), keys, args, len(messages), 2
            )
        if timers is not None:  # set before the 202; a repeat's finds no message when due
            await timers
        if result[0] == 0:  # a repeat: the first messages' wires ('' once acked), connections
            first = [str(i) for i in orjson.loads(result[1])]
            return first, list(result[2::2]), [_pairs(flat) for flat in result[3::2]], []
        if self.journal is not None:
            for m, op in zip(messages, ops, strict=True):
                self.journal.note(bucket, head_keys[1], m.to, op)
        conns = [_pairs(flat) for flat in result[1::2]]
        states = [UnreadState.of_reply(flat) if flat else None for flat in result[2::2]]
        return None, encoded, conns, states

    def _bucket_keys(self, bucket: int) -> tuple[str, str, str, str]:
        """The bucket's keys a publish names first, made once: dedupe (unused without a
        key, but in the bucket's slot), storage queue, inbox index, owners."""
        found = self._bucket_keys_made.get(bucket)
        if found is None:
            found = self._bucket_keys_made[bucket] = (
                self.keys.publish_dedupe("", bucket),
                self.keys.store_queue(self.keys.bucket_tag(bucket)),
                self.keys.inbox_index(bucket),
                self.keys.owners(bucket),
            )
        return found

    async def ack(self, uid: str, ids: Sequence[int]) -> Acked:
        """Remove ``ids`` from the user's hot inbox; their stored rows are acked through the
        storage queue, and so are the other ids' while storage may hold unacked messages of
        the user (flagged cold, or the bucket not known complete). One script, no storage
        call: after Redis lost data most users are cold, and a storage write per ack from
        the socket worker held every ack of theirs (and their connections' reads) for
        seconds. The same script queues message.acked when the site takes it."""
        if not ids:
            return Acked(set(), 0)
        queue = self.keys.store_queue(self.keys.user_tag(uid))
        mark = self.keys.redis_mark(self.keys.bucket(uid))
        keys = [
            self.keys.inbox(uid), self.keys.inbox_bodies(uid), queue, self.keys.cold(uid), mark,
            self.keys.owners(self.keys.bucket(uid)), self.keys.acked_unstored(uid),
            self.keys.acks_queued(uid),
        ]
        args: list[Any] = [storeops.encode_ack(uid, ids), self.ttl]
        outbox = self.keys.hook_outbox(self.keys.bucket(uid))
        hook_keys, hook_args = self.events.queued_by(EventType.ACKED, outbox)  # in the same step
        # The lean connection, as a publish: through redis-py an ack cost the socket worker
        # six times the CPU (docs/benchmarks.md, "Tenth sitting"). Not waiting for a WAITAOF:
        # an ack Redis lost comes again with the next replay.
        removed, cold = await self.batch.script(
            self._ack, keys + hook_keys, args + hook_args, confirmed=False
        )
        return Acked({int(i) for i in removed}, int(cold))

    def look_on(
        self, pipe: Any, uid: str, after: int = 0, limit: int = 200
    ) -> Callable[[Iterator[Any]], Look]:
        """Queue a first look at the inbox (the first ``limit`` hot ids above ``after``, then
        the cold flag and the bucket's completeness) on the caller's ``pipe``; call what it
        returns with an iterator over the replies.

        Ids are scored by their millisecond, so ``after``'s own millisecond is read whole
        (the ids of one user in one millisecond: a few) and the later ones with a LIMIT."""
        key = self.keys.inbox(uid)
        if after:
            at = timestamp_ms(after)
            pipe.zrangebyscore(key, at, at)
            pipe.zrangebyscore(key, f"({at}", "+inf", start=0, num=limit)
        else:
            pipe.zrangebyscore(key, "-inf", "+inf", start=0, num=limit)
        pipe.get(self.keys.cold(uid))
        self.marks.complete_on(pipe, uid)

        def read(replies: Iterator[Any]) -> Look:
            found = [*next(replies), *next(replies)] if after else next(replies)
            ids = sorted(i for i in map(int, found) if i > after)[:limit]
            return Look(after, limit, ids, next(replies), bool(next(replies)))

        return read

    async def look(self, uid: str, after: int = 0, limit: int = 200) -> Look:
        pipe = self.redis.pipeline(transaction=False)
        read = self.look_on(pipe, uid, after, limit)
        return read(iter(await pipe.execute()))

    async def pending(
        self,
        uid: str,
        cold: ColdReader | None,
        after: int = 0,
        limit: int = 200,
        look: Look | None = None,
    ) -> list[dict[str, Any]]:
        """Unacked messages in id order: storage's older ones first, then Redis's. With
        ``cold`` None, Redis's only (storage is down: the caller reads it later).

        ``look`` is what look_on() read for this ``after`` and at least this ``limit`` on a
        pipeline of the caller's (a connect reads it with the registry write, in one round
        trip)."""
        if look is None:
            look = await self.look(uid, after, limit)
        assert look.after == after and look.limit >= limit
        # Hot ids first, then the flag: the sweep flags the user cold in the same step that
        # removes a message from Redis, so one it moves meanwhile is found through the flag.
        mark = look.cold_mark
        hot: list[dict[str, Any]] = []
        wanted = look.hot_ids[:limit]
        if wanted:
            bodies = await self.redis.hmget(self.keys.inbox_bodies(uid), [str(i) for i in wanted])
            hot = [orjson.loads(b) for b in bodies if b is not None]
            if len(hot) < len(wanted) and mark is None:  # moved since the look? read the flag
                mark = cast(bytes | None, await self.redis.get(self.keys.cold(uid)))
        found: list[dict[str, Any]] = []
        if cold is not None and (mark is not None or not look.complete):
            found = await self.amended(uid, await self._stored_unacked(uid, cold, after, limit))
            if not found and not after and mark is not None:  # storage holds none: drop
                # the flag, unless a sweep set it again since (its mark is new every sweep)
                await delete_if(self.redis, self.keys.cold(uid), mark)

        seen = {m["id"] for m in found}
        for message in hot:
            if message["id"] not in seen:
                found.append(message)
        found.sort(key=lambda m: int(m["id"]))
        return found[:limit]

    async def _stored_unacked(
        self, uid: str, cold: ColdReader, after: int, limit: int
    ) -> list[dict[str, Any]]:
        """The first ``limit`` messages storage holds unacked above ``after``, without those
        whose ack still waits in the storage queue (Keys.acks_queued): read on past them."""
        found: list[dict[str, Any]] = []
        while True:
            page = await cold(uid, after, limit)
            if not page:
                return found
            ids = [str(m["id"]) for m in page]
            queued = await self.redis.smismember(self.keys.acks_queued(uid), ids)
            found += [m for m, acked in zip(page, queued, strict=True) if not acked]
            if len(page) < limit or len(found) >= limit:
                return found[:limit]
            after = int(ids[-1])

    async def amended(self, uid: str, stored: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``stored`` (messages storage holds for ``uid``) as the user sees them now: without
        those retracted, edited ones with their new body (pmq.domain.amend), whether or not
        the storage writer has had those changes yet."""
        if not stored:
            return stored
        raw = await self.redis.hmget(self.keys.amends(uid), [m["id"] for m in stored])
        return [
            m if amend is None else orjson.loads(amend)
            for m, amend in zip(stored, cast(list[bytes | None], raw), strict=True)
            if amend != b""
        ]


def _pairs(flat: list[bytes]) -> dict[str, str]:
    return {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}


def _repeated(
    messages: Sequence[Message], wires: list[bytes], conns: list[dict[str, str]]
) -> list[tuple[str, bytes, dict[str, str]]]:
    """A repeat's (recipient, wire JSON, connections) of the first messages still unacked
    (a wire of b'' was acked: it went to its user)."""
    return [
        (cast(str, m.to), wire, live)
        for m, wire, live in zip(messages, wires, conns, strict=False)
        if wire and live
    ]
