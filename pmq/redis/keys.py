"""Every Redis key and channel PMQ uses, one method each, under one namespace prefix.

Handlers and workers never build a key by hand: they ask a :class:`Keys` made from
``redis.prefix`` and ``redis.buckets``. Tests give each run its own prefix so runs never
collide.

Hash tags (Redis Cluster, docs/protocol.md "Redis Cluster"): every Lua script and MULTI
touches keys of one slot only, so each key that a script touches together with others
carries a ``{tag}``:

* ``{bN}``, N = uid % buckets: every key of a user (inbox, bodies, unread, connections,
  cold flag, marks, ...) and the shared keys their operations touch atomically with them:
  that bucket's storage queue, inbox index and publish dedupe keys. A multicast is one
  script call per bucket.
* ``{cs}``: the whole customer-service chat (sessions, queue, loads, the per-user chat
  keys) and the chat's own storage queue.
* ``{bc}``: broadcasts (per-group indexes, bodies, dedupe, their queue).

Keys used alone (worker registry, leases, locks, auth cache) carry no tag. On a single
Redis the tags change nothing; there ``redis.buckets`` is 1 by default, so every user key
shares one storage queue and one inbox index as before.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence
from typing import NewType

Tag = NewType("Tag", str)  # a hash tag's content, e.g. "b17": keys named by it share a slot

CHAT_TAG = Tag("cs")  # the hash tag of the chat's keys and its storage queue
BROADCAST_TAG = Tag("bc")  # the hash tag of the broadcast keys


def key_template(make: Callable[[str], str]) -> list[str]:
    """A key family as [before, after] around its argument, for Lua scripts that build the
    keys of many users: the script joins before .. id .. after, and keys.py still owns the
    key's shape."""
    return make("\0").split("\0")


@dataclasses.dataclass(frozen=True)
class Keys:
    prefix: str = "pmq:"
    buckets: int = 1  # redis.buckets: how many {bN} tags the users are spread over

    # Hash tags ----------------------------------------------------------------------
    def bucket(self, uid: str) -> int:
        """The user's bucket: uid % buckets (a non-numeric id by its CRC-32)."""
        number = int(uid) if uid.isdigit() else zlib.crc32(uid.encode())
        return number % self.buckets

    def by_bucket(self, uids: Sequence[str]) -> dict[int, list[int]]:
        """Positions in ``uids`` grouped by bucket, in order: a script names the keys of one
        bucket only."""
        if self.buckets == 1:
            return {0: list(range(len(uids)))}
        found: dict[int, list[int]] = {}
        for i, uid in enumerate(uids):
            found.setdefault(self.bucket(uid), []).append(i)
        return found

    def bucket_tag(self, bucket: int) -> Tag:
        return Tag(f"b{bucket}")

    def user_tag(self, uid: str) -> Tag:
        """The tag of the user's bucket: store_queue(user_tag(uid)) takes their operations."""
        return self.bucket_tag(self.bucket(uid))

    def store_tags(self) -> list[Tag]:
        """The tag of every storage queue: each bucket's, the chat's and the broadcasts'."""
        return [*(self.bucket_tag(n) for n in range(self.buckets)), CHAT_TAG, BROADCAST_TAG]

    def _user(self, uid: str) -> str:
        return f"{self.prefix}{{b{self.bucket(uid)}}}:u:{uid}"

    # Connection registry -------------------------------------------------------------
    def user_conns(self, uid: str) -> str:
        """HASH conn_id -> worker id: the live connections of one user, on every node."""
        return f"{self._user(uid)}:conns"

    def worker_conns(self, worker_id: str) -> str:
        """HASH conn_id -> uid: what one socket worker holds, for cleanup after a crash."""
        return f"{self.prefix}w:{worker_id}:conns"

    def workers(self) -> str:
        """ZSET worker id -> last heartbeat (unix ms) of every live socket worker."""
        return f"{self.prefix}workers"

    def worker_channel(self, worker_id: str) -> str:
        """Sharded pub/sub channel (SSUBSCRIBE) one socket worker listens on for frames to
        its connections."""
        return f"{self.prefix}ch:{worker_id}"

    def cluster_workers(self) -> str:
        """HASH socket worker id -> JSON {node, host, pid, connections, updated ms, ...}: the
        cluster view (pmq.domain.cluster), one field per worker so a node's workers never
        collide."""
        return f"{self.prefix}cluster:workers"

    def id_lease(self, generator: int) -> str:
        """STRING worker id: who holds message-id generator number ``generator``."""
        return f"{self.prefix}idgen:{generator}"

    # Inbox and unread ---------------------------------------------------------------
    def inbox(self, uid: str) -> str:
        """ZSET message id -> unix ms: the user's unacked messages still in Redis (hot)."""
        return f"{self._user(uid)}:inbox"

    def inbox_bodies(self, uid: str) -> str:
        """HASH message id -> message JSON, beside inbox(uid)."""
        return f"{self._user(uid)}:bodies"

    def inbox_index(self, bucket: int = 0) -> str:
        """ZSET uid -> unix ms of the oldest hot message, per bucket: what the sweep reads."""
        return f"{self.prefix}{{b{bucket}}}:inbox-index"

    def cold(self, uid: str) -> str:
        """STRING: set while storage holds unacked messages of uid that left Redis."""
        return f"{self._user(uid)}:cold"

    def redis_mark(self, bucket: int = 0) -> str:
        """HASH ``epoch``, ``gen`` (and ``recovering`` while a recovery runs, ``journal:<token>``
        while a socket worker's journal waits for it): the bucket's Redis mark
        (pmq.domain.epochs). Without ``epoch`` the bucket's Redis data is not known complete
        and storage is read for every user of the bucket."""
        return f"{self.prefix}{{b{bucket}}}:redis-mark"

    def unread(self, uid: str) -> str:
        """HASH kind -> unread count of one user."""
        return f"{self._user(uid)}:unread"

    def publish_dedupe(self, key: str, bucket: int = 0) -> str:
        """STRING ids JSON: the ids a publish with this idempotency key gave the recipients
        of one bucket (each bucket's part of a multicast is deduplicated on its own)."""
        return f"{self.prefix}{{b{bucket}}}:dedupe:msg:{key}"

    def last_read(self, uid: str) -> str:
        """HASH kind -> unix ms of the user's last unread.clear (system unread counts after it)."""
        return f"{self._user(uid)}:last-read"

    def publish_keys(self, uid: str) -> tuple[str, str, str, str, str]:
        """inbox, inbox_bodies, unread, user_conns and last_read of ``uid``, made at once:
        a publish names all five for every recipient."""
        user = self._user(uid)
        return (
            f"{user}:inbox",
            f"{user}:bodies",
            f"{user}:unread",
            f"{user}:conns",
            f"{user}:last-read",
        )

    def owners(self, bucket: int = 0) -> str:
        """HASH message id -> uid of the bucket's messages accepted and not yet stored: a
        retraction or edit finds the user of a message storage does not hold yet."""
        return f"{self.prefix}{{b{bucket}}}:owners"

    def acked_unstored(self, uid: str) -> str:
        """HASH message id -> message JSON: the user's messages acked before the storage
        writer stored them, so the notification centre's feed still lists them meanwhile;
        the writer removes each once its row is there."""
        return f"{self._user(uid)}:acked"

    def acks_queued(self, uid: str) -> str:
        """SET of the user's message ids acked while storage held them (not in Redis): their
        ack waits in the storage queue, and msg.pull and replays leave them out meanwhile;
        the writer removes each once storage has it."""
        return f"{self._user(uid)}:acking"

    def reads(self, uid: str) -> str:
        """HASH of the user's read marks: kind -> the id up to which every item of that kind
        is read ("*": every kind), and ``loaded`` once taken from storage (pmq.domain.reads)."""
        return f"{self._user(uid)}:reads"

    def read_ids(self, uid: str) -> str:
        """ZSET item id -> unix ms: items the user read one by one, above the marks."""
        return f"{self._user(uid)}:read-ids"

    def amends(self, uid: str) -> str:
        """HASH message id -> "" (retracted) or the message JSON with its new body (edited):
        what storage reads of the user are corrected by until the writer has it."""
        return f"{self._user(uid)}:amends"

    def user_groups(self, uid: str) -> str:
        """STRING JSON list: the groups of the user's last token, for counting broadcasts."""
        return f"{self._user(uid)}:groups"

    # Broadcasts ---------------------------------------------------------------------
    def broadcasts(self, group: str) -> str:
        """ZSET broadcast id -> unix ms: the broadcasts to one group, within retention."""
        return f"{self.prefix}{{bc}}:group:{group}"

    def broadcast_index(self) -> str:
        """ZSET broadcast id -> unix ms of every broadcast, for retention trimming."""
        return f"{self.prefix}{{bc}}:index"

    def broadcast_bodies(self) -> str:
        """HASH broadcast id -> message JSON."""
        return f"{self.prefix}{{bc}}:bodies"

    def broadcast_dedupe(self, key: str) -> str:
        """STRING broadcast id: one broadcast per key per broadcast.dedupe_seconds."""
        return f"{self.prefix}{{bc}}:dedupe:{key}"

    def broadcast_revoked(self) -> str:
        """ZSET broadcast id -> unix ms of the broadcasts retracted, within retention."""
        return f"{self.prefix}{{bc}}:revoked"

    def broadcast_mark(self, uid: str) -> str:
        """STRING: the newest broadcast id the user acked; replay starts above it."""
        return f"{self._user(uid)}:bc-mark"

    def broadcast_queue(self) -> str:
        """LIST of broadcasts waiting for a task worker to store and fan out."""
        return f"{self.prefix}{{bc}}:q:broadcast"

    def broadcast_taken(self, owner: str) -> str:
        """LIST of broadcasts one task worker took and has not fanned out yet."""
        return f"{self.prefix}{{bc}}:q:broadcast:taken:{owner}"

    def broadcast_owners(self) -> str:
        """ZSET owner -> lease expiry (unix ms, Redis's clock) of every task worker that may
        hold a broadcast_taken(owner) list (pmq.tasks.owners)."""
        return f"{self.prefix}{{bc}}:q:broadcast:owners"

    def broadcast_channel(self) -> str:
        """Sharded pub/sub channel every socket worker listens on for broadcast frames."""
        return f"{self.prefix}ch:broadcast"

    # Storage queue ------------------------------------------------------------------
    def store_queue(self, tag: str = "b0") -> str:
        """LIST of storage operations (JSON) waiting for a task worker, one per tag of
        store_tags(): a bucket's (its users' messages, acks, last-read times), the chat's or
        the broadcasts'."""
        return f"{self.prefix}{{{tag}}}:q:store"

    def store_taken(self, owner: str, tag: str = "b0") -> str:
        """LIST of operations one task worker took from store_queue(tag), not written yet."""
        return f"{self.prefix}{{{tag}}}:q:store:taken:{owner}"

    def store_owners(self, tag: str = "b0") -> str:
        """ZSET owner -> lease expiry (unix ms, Redis's clock) of every storage writer that
        may hold a store_taken(owner, tag) list: the registry orphaned lists are found by."""
        return f"{self.prefix}{{{tag}}}:q:store:owners"

    def store_dead(self, tag: str = "b0") -> str:
        """LIST of dead letters (pmq.tasks.deadletter): items of store_queue(tag) that the
        store refused or that were not storage operations at all."""
        return f"{self.prefix}{{{tag}}}:q:store:dead"

    # Events to the site (webhooks) -------------------------------------------------
    def hook_outbox(self, bucket: int = 0) -> str:
        """LIST of encoded events (pmq.wire.events) waiting for the site, oldest first, per
        bucket: a user's events queue in order in their bucket's outbox."""
        return f"{self.prefix}{{b{bucket}}}:hooks:outbox"

    def hook_lease(self, bucket: int = 0) -> str:
        """STRING owner, with a TTL: the one task worker sending the bucket's outbox."""
        return f"{self.prefix}{{b{bucket}}}:hooks:lease"

    def hook_chat_outbox(self) -> str:
        """LIST of the chat's events (cs.assigned, cs.closed), queued by the chat's scripts
        in the chat's slot, sent like a bucket's outbox (their users' buckets are elsewhere)."""
        return f"{self.prefix}{{{CHAT_TAG}}}:hooks:outbox"

    def hook_chat_lease(self) -> str:
        """STRING owner, with a TTL: the one task worker sending the chat's outbox."""
        return f"{self.prefix}{{{CHAT_TAG}}}:hooks:lease"

    def hook_online(self, bucket: int = 0) -> str:
        """HASH uid -> 1: the bucket's users the site was told are online (user.online sent,
        user.offline not yet)."""
        return f"{self.prefix}{{b{bucket}}}:hooks:online"

    def hook_leaving(self, bucket: int = 0) -> str:
        """ZSET uid -> unix ms: users of the bucket whose last connection closed, and when
        their user.offline is due (cancelled when they come back first)."""
        return f"{self.prefix}{{b{bucket}}}:hooks:leaving"

    def hook_undelivered(self, bucket: int = 0) -> str:
        """ZSET "uid id kind" -> unix ms: the bucket's unicast messages and when their
        message.undelivered is due, unless acked by then."""
        return f"{self.prefix}{{b{bucket}}}:hooks:undelivered"

    def recovery_lock(self) -> str:
        """STRING owner, with a TTL: the one task worker recovering from a Redis data loss."""
        return f"{self.prefix}lock:recovery"

    def sweep_lock(self) -> str:
        """STRING owner, with a TTL: the one task worker of the cluster that sweeps inboxes."""
        return f"{self.prefix}lock:sweep"

    # Auth ---------------------------------------------------------------------------
    def auth_cache(self, token_digest: str) -> str:
        """STRING: the user centre's answer for one token (JSON), with a jittered TTL."""
        return f"{self.prefix}auth:{token_digest}"

    def auth_lock(self, token_digest: str) -> str:
        """STRING holder, with a short TTL: the one look-up of this token at the user centre
        in flight in the whole cluster (pmq.domain.usercentre); the others wait for auth_cache()."""
        return f"{self.prefix}lock:auth:{token_digest}"

    def auth_tokens(self, uid: str) -> str:
        """SET of token digests whose user-centre answer named ``uid`` (auth_cache keys a kick
        of the user drops), with the longest TTL an answer is cached for."""
        return f"{self._user(uid)}:auth-tokens"

    def kicked(self, uid: str) -> str:
        """STRING unix ms of the user's last kick, with a TTL of auth.revoke_seconds: tokens
        issued before it are refused (pmq.domain.kicks)."""
        return f"{self._user(uid)}:kicked"

    # Customer-service chat (pmq.domain.chat) -----------------------------------------------
    def cs_online(self) -> str:
        """SET of agent uids with at least one live connection (checked again on use)."""
        return f"{self.prefix}{{cs}}:online"

    def cs_load(self) -> str:
        """HASH agent uid -> number of open sessions assigned to the agent."""
        return f"{self.prefix}{{cs}}:load"

    def cs_queue(self) -> str:
        """LIST of session ids waiting for an agent, oldest first."""
        return f"{self.prefix}{{cs}}:queue"

    def cs_active(self) -> str:
        """ZSET session id -> unix ms of its last activity, for every open session (idle close)."""
        return f"{self.prefix}{{cs}}:active"

    def cs_session(self, session_id: str) -> str:
        """HASH of one session: user, agent, status, opened, active, last message, ..."""
        return f"{self.prefix}{{cs}}:s:{session_id}"

    def cs_history(self, session_id: str) -> str:
        """ZSET message id -> unix ms: the session's newest messages, beside cs_bodies."""
        return f"{self.prefix}{{cs}}:s:{session_id}:history"

    def cs_bodies(self, session_id: str) -> str:
        """HASH message id -> message JSON, beside cs_history(session_id)."""
        return f"{self.prefix}{{cs}}:s:{session_id}:bodies"

    def cs_history_index(self) -> str:
        """ZSET session id -> unix ms of the oldest message in its cs_history: what the
        sweep reads to trim messages past retention (pmq.tasks.sweep)."""
        return f"{self.prefix}{{cs}}:history-index"

    def cs_user_session(self, uid: str) -> str:
        """STRING session id: the user's one open or queued session."""
        return f"{self.prefix}{{cs}}:u:{uid}:current"

    def cs_user_sessions(self, uid: str) -> str:
        """ZSET session id -> unix ms opened: every session of the user (history by peer)."""
        return f"{self.prefix}{{cs}}:u:{uid}:sessions"

    def cs_last_agent(self, uid: str) -> str:
        """STRING agent uid: the agent of the user's last closed session (sticky assignment)."""
        return f"{self.prefix}{{cs}}:u:{uid}:last-agent"

    def cs_agent_sessions(self, uid: str) -> str:
        """ZSET session id -> unix ms assigned: the open sessions of one agent."""
        return f"{self.prefix}{{cs}}:u:{uid}:assigned"

    def cs_idle_lock(self) -> str:
        """STRING owner, with a TTL: the one socket worker of the cluster closing idle sessions."""
        return f"{self.prefix}lock:cs-idle"
