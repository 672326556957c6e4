"""Relayed operations as a socket worker's channel delivers them (pmq.reactor.relay.Relay),
and where a new message goes (pmq.domain.routing.Routes)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from pmq.domain.routing import Routes
from pmq.reactor.relay import Relay
from pmq.redis.keys import Keys
from pmq.wire.relay import Op, UnreadState, decode, encode, encode_message
from tests.helpers import REDIS_URL

FRAME = b'{"type":"push","msg":{"id":"1"}}'


class Recorder:
    """The connection table and unread pusher of a Relay, noting what they are asked to do;
    also this worker's channel in process (pmq.domain.routing.Here)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def send_to_user(self, uid: str, frame: bytes) -> int:
        self.calls.append(("push", uid, frame))
        return 1

    def push_message(self, uid: str, frame: bytes, unread: UnreadState | None) -> int:
        self.calls.append(("message", uid, frame, unread))
        return 1

    def changed(self, uid: str) -> None:
        self.calls.append(("unread", uid))

    def kick_user(self, uid: str, reason: str) -> int:
        return 0

    def __call__(
        self, op: Op, uid: str, payload: bytes, sent: float, state: UnreadState | None
    ) -> int:
        self.calls.append((op, uid, payload, state))
        return 1


def relay() -> tuple[Relay, Recorder]:
    local: Any = Recorder()
    return Relay(local, local), local


def test_a_message_brings_the_unread_state_the_publish_read() -> None:
    r, local = relay()
    payload = encode_message(FRAME, UnreadState([b"comment", b"3"], 1700000000000))
    r.on_message({"data": encode(Op.MESSAGE, "7", payload, 0.0)})
    assert local.calls == [("message", "7", FRAME, (["comment", "3"], 1700000000000))]


def test_an_unknown_op_is_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    r, local = relay()
    r.on_message({"data": b"msg 7 0.000000\n" + FRAME})  # an earlier version's bare message
    assert local.calls == []
    assert "unknown relay op 'msg' for uid 7" in caplog.text


def test_a_malformed_relay_is_dropped() -> None:
    r, local = relay()
    r.on_message({"data": encode(Op.MESSAGE, "7", b"[not json\n" + FRAME, 0.0)})
    r.on_message({"data": b"no header line"})
    assert local.calls == []


class Channels:
    """The Batcher's call(), noting each SPUBLISH (channel, message); one receiver each."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def call(self, *args: Any) -> int:
        command, channel, message = args
        assert command == "SPUBLISH"
        self.published.append((channel, message))
        return 1


def test_a_new_message_goes_only_to_the_workers_holding_the_user() -> None:
    # Four workers are alive; user 7 is on w1 (here) and w3. Relaying to every worker is
    # what made an 8-process server fall to 2,900 msg/s (issue #4): w2 and w4 get nothing.
    local = Recorder()
    channels = Channels()
    keys = Keys("pmqtest:")
    r = Routes(aioredis.Redis.from_url(REDIS_URL), keys, "w1", 25, channels)  # type: ignore[arg-type]
    r.subscribe(local)
    state = UnreadState([b"notice", b"2"], 0)
    conns = {"c1": "w1", "c2": "w3", "c3": "w3"}
    reached = asyncio.run(r.push_messages([("7", conns, FRAME, state), ("8", {}, FRAME, None)]))
    assert reached == 3  # one here, two on w3
    assert local.calls == [(Op.MESSAGE, "7", FRAME, state)]
    assert [channel for channel, _ in channels.published] == [keys.worker_channel("w3")]
    op, uid, _, payload = decode(channels.published[0][1])
    assert (op, uid, payload) == (Op.MESSAGE, "7", encode_message(FRAME, state))


def test_a_worker_that_missed_its_beats_still_gets_its_users_messages() -> None:
    # Redis cut for longer than two beats: when it comes back, the first beat of w1 may see
    # w3 as stale before w3 beat again. A message for w3's user must still go to w3 (a dead
    # worker's channel has no subscriber, so nothing counts as reached there); skipping it
    # left the message unseen by a user who stayed connected (the chaos suite's redis-cut).
    local = Recorder()
    channels = Channels()
    keys = Keys("pmqtest:")
    r = Routes(aioredis.Redis.from_url(REDIS_URL), keys, "w1", 25, channels)  # type: ignore[arg-type]
    r.subscribe(local)
    r.stale_workers = {"w3"}
    reached = asyncio.run(r.push_messages([("7", {"c2": "w3"}, FRAME, None)]))
    assert [channel for channel, _ in channels.published] == [keys.worker_channel("w3")]
    assert reached == 1
