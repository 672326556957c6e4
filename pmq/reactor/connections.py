"""This worker's live WebSocket connections, by conn id and by uid.

Writes never await: a frame is queued on the socket at once (made once, and shared by every
connection it goes to), and a client whose unsent bytes pass ``server.max_pending`` is
closed with 1008, or aborted when even the close frame would not fit, so one slow reader
never stalls the worker.

A connection never gets one message twice: while the inbox replays, live frames are held
back with the id of the message each pushes, and on release those the replay already sent,
or an earlier held frame, are dropped. A live copy may come later still (a broadcast whose
fan-out trailed its store, a relay its publisher had not sent yet, the first push of a
message a repeated publish pushed again), so the ids replayed or released that were made
within LIVE_LAG_SECONDS before the release are kept that long, and their pushes dropped too.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import struct
import time
from array import array
from collections import deque
from collections.abc import Iterable, Iterator

from pmq.domain.auth import Identity
from pmq.domain.ids import first_id_at
from pmq.reactor.websocket import Connection
from pmq.wire.client import CloseCode, message_id_of

log = logging.getLogger(__name__)

MAX_CLOSE_REASON = 123  # bytes of UTF-8 a close frame has room for (125 less the code)
# How late a live copy of a message may come after the message was made (a fan-out waiting
# for a restarted task worker, a publisher between its store and its relay).
LIVE_LAG_SECONDS = 120.0
# Pushes remembered by the table (uid, message id), for the catch-up after a relay gap
# (pmq.reactor.catchup): some seconds of a busy worker's pushes, 3 MiB at most.
RECENT_PUSHES = 32768
# Ids of the messages pushed lately, for a repeated publish (ConnectionTable.push_again), 8
# bytes each: 100 s of a worker pushing 10,000 a second, 8 MiB at most. A site repeats a
# request that got no answer, after its timeout and often more than once; the pairs above
# cover 3 s of such a worker, and a message pushed before them went again, twice on one
# connection.
REPEAT_MEMORY = 1 << 20
REPEAT_BLOCK = 4096  # ids per block of that memory, each with its lowest and highest id
ID = struct.Struct("q")  # as array("q") reads them back


TEXT_FIN = 0x81  # FIN and the text opcode: the first byte of a whole (unfragmented) text frame


def new_conn_id() -> str:
    """A connection id that sorts by opening time: the unix ms in 12 hex digits, then 8
    random ones. The oldest of a user's connections is the least of their ids, on any node
    (clocks kept in step), so the connection bound needs no other record of ages."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(4)}"


def text_frame(payload: bytes) -> bytes:
    """``payload`` as one WebSocket text frame, the bytes a server writes (never masked, so
    the same for every connection, made once for all of them): what a reference serializer
    (websockets' Frame.serialize) makes, which tests/test_frames.py checks."""
    length = len(payload)
    if length < 126:
        return struct.pack("!BB", TEXT_FIN, length) + payload
    if length < 65536:
        return struct.pack("!BBH", TEXT_FIN, 126, length) + payload
    return struct.pack("!BBQ", TEXT_FIN, 127, length) + payload


def close_reason(reason: str) -> str:
    """``reason`` cut to what a close frame holds, MAX_CLOSE_REASON bytes of UTF-8, never
    in the middle of a character."""
    encoded = reason.encode("utf-8", "replace")  # a lone surrogate (from JSON) becomes "?"
    return encoded[:MAX_CLOSE_REASON].decode("utf-8", "ignore")  # drops a cut character


def first_frame_size(frames: bytes) -> int:
    """How many bytes the first of ``frames`` (frames made by text_frame()) takes."""
    length = frames[1] & 0x7F
    if length < 126:
        return 2 + length
    if length == 126:
        return 4 + int(struct.unpack_from("!H", frames, 2)[0])
    return 10 + int(struct.unpack_from("!Q", frames, 2)[0])


class Client:
    """One WebSocket connection of an authenticated user."""

    __slots__ = (
        "checked_ms", "conn_id", "held", "identity", "left", "max_pending", "opened", "rate",
        "replayed", "replayed_until", "sent", "tokens", "updated", "ws",
    )

    def __init__(
        self,
        ws: Connection,
        conn_id: str,
        identity: Identity,
        max_pending: int,
        rate: int,
        checked_ms: int = 0,
    ) -> None:
        self.ws = ws
        self.checked_ms = checked_ms  # when the handshake checked the kicks (unix ms)
        self.conn_id = conn_id
        self.identity = identity
        self.max_pending = max_pending
        self.rate = rate
        self.tokens = float(rate)
        self.updated = time.monotonic()
        # Live frames kept back while the inbox replays, each with the id of the message it
        # pushes (0: none).
        self.held: list[tuple[bytes, int]] | None = None
        self.replayed: set[int] | None = None  # ids replayed whose live copy may still come
        self.replayed_until = 0.0  # time.monotonic() when those are forgotten
        # Once closed: done when its registry entry has left (pmq.reactor.connect).
        self.left: asyncio.Future[None] | None = None
        # The first id made after the connection opened: older messages are its replay's,
        # newer ones come live.
        self.opened = first_id_at(int(time.time() * 1000))
        # While a late replay is due: the ids older than ``opened`` it was sent meanwhile
        # (only those can be held by storage alone).
        self.sent: set[int] | None = None

    @property
    def uid(self) -> str:
        return self.identity.uid

    def hold(self) -> None:
        """Keep live frames back (replay must come first, in id order) and note the ids
        replayed from now on (see :meth:`replay`)."""
        self.held = []
        self.replayed = set()

    def replay(self, payload: bytes, message_id: int) -> bool:
        """Write a replayed message (``payload``, a push of ``message_id``) now, ahead of
        the live frames held back; its live copies will be dropped."""
        if self.replayed is not None:
            self.replayed.add(message_id)
        self.note_sent(message_id)
        return self.write(payload)

    def release(self) -> None:
        """Send the frames kept back since hold(), in the order they came, without the
        pushes of messages the replay sent; go on dropping live copies of the messages
        replayed or held that were made in the last LIVE_LAG_SECONDS, for that long (a
        message pushed again by a repeated publish while held may still have its first
        publisher's push coming)."""
        held, self.held = self.held or [], None
        had, self.replayed = self.replayed or set(), None  # grows with the held pushes sent
        for _, message_id in held:
            self.note_sent(message_id)
        for frame, message_id in held:
            if message_id in had:  # replayed, or held twice (a repeat, then its first push)
                frame = frame[first_frame_size(frame) :]  # a badge sent with it still goes
            elif message_id:
                had.add(message_id)
            if frame:
                self.write_frame(frame)
        floor = first_id_at(int((time.time() - LIVE_LAG_SECONDS) * 1000))
        recent = {message_id for message_id in had if message_id >= floor}
        if recent:
            self.replayed = recent
            self.replayed_until = time.monotonic() + LIVE_LAG_SECONDS

    def note_sent(self, message_id: int) -> None:
        """While a late replay is due, note that this connection was sent ``message_id``."""
        if self.sent is not None and 0 < message_id < self.opened:
            self.sent.add(message_id)

    def push_again(self, payload: bytes, message_id: int) -> bool:
        """A message a repeated publish found unacked: written unless this connection
        replayed or caught up on it; while its replay runs, held like a live push (the
        release drops it if replayed). True: the connection has it."""
        if self.held is not None:
            return self.send_frame(text_frame(payload), message_id)
        if self.replayed is not None and self._replayed(message_id):
            return True
        return self.push_missed(payload, message_id)

    def send(self, payload: bytes) -> bool:
        """Queue one live frame (kept back during a replay); see write()."""
        return self.send_frame(text_frame(payload))

    def write(self, payload: bytes) -> bool:
        """Queue one text frame without waiting; False when the client is gone or dropped."""
        return self.write_frame(text_frame(payload))

    def push_missed(self, payload: bytes, message_id: int) -> bool:
        """Write a message this connection missed live (a relay gap) now; a live copy that
        still comes within LIVE_LAG_SECONDS is dropped, as for one replayed."""
        if self.replayed is None:
            self.replayed = set()
        self.replayed.add(message_id)
        self.replayed_until = time.monotonic() + LIVE_LAG_SECONDS
        self.note_sent(message_id)
        return self.write(payload)

    def send_frame(self, frame: bytes, message_id: int = 0) -> bool:
        """send() of frames made by text_frame(), so a fan-out makes them once for all;
        ``message_id``: the message the first one pushes (0: none). A push of a message
        this connection replayed is left out (True: the connection has it)."""
        self.note_sent(message_id)
        if self.replayed is not None and self._replayed(message_id):
            frame = frame[first_frame_size(frame) :]  # a badge sent with it still goes
            if not frame:
                return True
            message_id = 0
        if self.held is not None:
            self.held.append((frame, message_id))
            return True
        return self.write_frame(frame)

    def _replayed(self, message_id: int) -> bool:
        if self.held is None and time.monotonic() > self.replayed_until:
            self.replayed = None  # any live copy has come by now
            return False
        return self.replayed is not None and message_id in self.replayed

    def write_frame(self, frame: bytes) -> bool:
        # Written past picows's transport: a server's data frames need no per-connection
        # state (PMQ never fragments), so one frame's bytes serve every connection.
        if not self.ws.open:
            return False
        pending = self.ws.write(frame)
        if pending > self.max_pending:
            self.drop_slow(pending)
            return False
        return True

    def drop_slow(self, pending: int) -> None:
        log.warning(
            "closing slow client conn=%s uid=%s: %d bytes unsent", self.conn_id, self.uid, pending
        )
        if pending > 2 * self.max_pending:
            self.ws.abort()  # not even a close frame would reach it in time
        else:
            self.close(CloseCode.POLICY_VIOLATION, "send buffer full")

    def close(self, code: int, reason: str = "") -> None:
        """Start a closing handshake (idempotent); a reason longer than a close frame holds
        is cut (close_reason()). The TCP connection ends when the peer answers, or after
        CLOSE_SECONDS (pmq.reactor.websocket): it never stays open."""
        self.ws.close(code, close_reason(reason))

    def allow_request(self) -> bool:
        """Token bucket of ``server.rate`` requests per second, burst of the same size."""
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class RecentPushes:
    """The last RECENT_PUSHES pushes of messages to local connections, as (uid, id), and
    the ids of about the last REPEAT_MEMORY."""

    def __init__(self) -> None:
        self.ring: deque[tuple[str, int]] = deque(maxlen=RECENT_PUSHES)
        self.count = 0  # pushes ever added, so an index knows which are new
        # The ids packed 8 bytes each, in turn: grown to REPEAT_MEMORY, then overwritten
        # from the start; a look searches the bytes in C. Pushes follow their messages'
        # making, so the lowest and highest id of each block written narrow a look to the
        # block being written and a block or two more.
        self.ids = bytearray()
        self.lowest: list[int] = []
        self.highest: list[int] = []

    def add(self, uid: str, message_id: int) -> None:
        self.ring.append((uid, message_id))
        at = self.count % REPEAT_MEMORY * ID.size
        if at == len(self.ids):
            self.ids += ID.pack(message_id)
        else:
            ID.pack_into(self.ids, at, message_id)
        self.count += 1
        if not self.count % REPEAT_BLOCK:
            self._bound((self.count - 1) % REPEAT_MEMORY // REPEAT_BLOCK)

    def _bound(self, block: int) -> None:
        """Note the lowest and highest id of ``block``, just written."""
        width = REPEAT_BLOCK * ID.size
        ids = array("q", self.ids[block * width : (block + 1) * width])
        if block == len(self.lowest):
            self.lowest.append(min(ids))
            self.highest.append(max(ids))
        else:
            self.lowest[block], self.highest[block] = min(ids), max(ids)

    def __contains__(self, message_id: int) -> bool:
        """``message_id`` was pushed here lately (for the rare repeated publish)."""
        writing = self.count % REPEAT_MEMORY // REPEAT_BLOCK
        blocks = [writing] + [
            block
            for block, (low, high) in enumerate(zip(self.lowest, self.highest, strict=True))
            if low <= message_id <= high and block != writing
        ]
        packed = ID.pack(message_id)
        width = REPEAT_BLOCK * ID.size
        for block in blocks:
            end = (block + 1) * width
            at = self.ids.find(packed, block * width, end)
            while at >= 0 and at % ID.size:  # found across two ids: look on
                at = self.ids.find(packed, at + 1, end)
            if at >= 0:
                return True
        return False

    def since(self, floor: int) -> PushIndex:
        """The pushes of ids from ``floor`` on by uid, those added later included."""
        return PushIndex(self, floor)


class PushIndex:
    """RecentPushes from one id on, by uid; brought up to date at each look."""

    def __init__(self, recent: RecentPushes, floor: int) -> None:
        self.recent = recent
        self.floor = floor
        self.by_uid: dict[str, set[int]] = {}
        self.seen = recent.count - len(recent.ring)

    def of(self, uid: str) -> set[int]:
        new = self.recent.count - self.seen
        for pushed_uid, message_id in itertools.islice(reversed(self.recent.ring), new):
            if message_id >= self.floor:
                self.by_uid.setdefault(pushed_uid, set()).add(message_id)
        self.seen = self.recent.count
        return self.by_uid.get(uid, set())


class ConnectionTable:
    def __init__(self) -> None:
        self.by_conn: dict[str, Client] = {}
        self.by_uid: dict[str, dict[str, Client]] = {}
        self.recent = RecentPushes()

    def __len__(self) -> int:
        return len(self.by_conn)

    def __iter__(self) -> Iterator[Client]:
        return iter(list(self.by_conn.values()))

    def add(self, client: Client) -> None:
        self.by_conn[client.conn_id] = client
        self.by_uid.setdefault(client.uid, {})[client.conn_id] = client

    def remove(self, client: Client) -> None:
        self.by_conn.pop(client.conn_id, None)
        mine = self.by_uid.get(client.uid)
        if mine is not None:
            mine.pop(client.conn_id, None)
            if not mine:
                del self.by_uid[client.uid]

    def of_user(self, uid: str) -> list[Client]:
        return list(self.by_uid.get(uid, {}).values())

    def any_of_user(self, uid: str) -> Client | None:
        """One connection of ``uid`` here (for what all of them share: uid, groups), or None."""
        mine = self.by_uid.get(uid)
        return next(iter(mine.values())) if mine else None

    def uids(self) -> list[str]:
        return list(self.by_uid)

    def send_to_user(self, uid: str, payload: bytes) -> int:
        """Send ``payload`` to every local connection of ``uid`` (its frame made once);
        returns how many took it."""
        return self.send_frame_to_user(uid, text_frame(payload), message_id_of(payload))

    def send_frame_to_user(self, uid: str, frame: bytes, message_id: int = 0) -> int:
        """send_to_user() of bytes already framed (text_frame(), or several together; the
        first pushes ``message_id``, or 0)."""
        mine = self.by_uid.get(uid)
        if mine is None:
            return 0
        if message_id:
            self.recent.add(uid, message_id)
        if len(mine) == 1:  # the common case, without a generator per frame
            return int(next(iter(mine.values())).send_frame(frame, message_id))
        return sum(client.send_frame(frame, message_id) for client in list(mine.values()))

    def push_again(self, uid: str, payload: bytes) -> int:
        """Push a message a repeated publish found unacked (its first push may have gone
        with its publisher) to the local connections of ``uid`` that have not had it: none
        if it was pushed here lately, else those that did not replay it. Its live push
        that still comes is dropped (Client.push_missed). Returns how many took it."""
        mine = self.by_uid.get(uid)
        message_id = message_id_of(payload)
        if mine is None or message_id in self.recent:  # an id is one user's message
            return 0
        self.recent.add(uid, message_id)
        return sum(client.push_again(payload, message_id) for client in list(mine.values()))

    def kick_user(self, uid: str, reason: str) -> int:
        clients = self.of_user(uid)
        for client in clients:
            client.close(CloseCode.KICKED, reason)
        return len(clients)

    def evict(self, uid: str, conn_ids: Iterable[str]) -> int:
        """Close those of ``conn_ids`` that are connections of ``uid`` here with 4008 "too
        many connections" (the user opened more than server.max_connections_per_user);
        returns how many were here."""
        mine = self.by_uid.get(uid, {})
        clients = [mine[conn_id] for conn_id in conn_ids if conn_id in mine]
        for client in clients:
            client.close(CloseCode.TOO_MANY_CONNECTIONS, "too many connections")
        return len(clients)
