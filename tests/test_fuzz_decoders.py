"""Fuzzing of the decoders that need no node: what anything that can write to Redis may hand a
worker (storage-queue items, relay and broadcast channel messages) and what a client's frame
and its data turn into before any I/O. Each one either decodes or fails the documented way:
a malformed storage item is named in Batch.malformed, a malformed channel message is
dropped with a warning, a bad frame is a ProtocolError and bad data an ActionError (400) or
HttpError (400). Anything else raised is a crash of the worker's loop or a 500."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pmq.errors import ActionError
from pmq.handlers import cs, msg, unread
from pmq.handlers.base import int_field
from pmq.reactor import ingest
from pmq.reactor.connections import ConnectionTable
from pmq.reactor.fanout import Fanout
from pmq.reactor.http import HttpError
from pmq.reactor.relay import Relay
from pmq.tasks.queueops import parse_batch
from pmq.wire.client import (
    MAX_REQUEST_ID,
    Code,
    ProtocolError,
    message_id_of,
    parse_request,
    push_frame,
)
from pmq.wire.relay import Op, UnreadState, encode_broadcast, encode_message
from pmq.wire.relay import encode as encode_relay
from tests.test_fuzz_kit import JSON, SCALARS, budget, json_object_with, tally

# Storage-queue items ---------------------------------------------------------------------

OPS = ["msg", "ack", "last_read", "cs", "cs_session", "broadcast"]
UID = st.integers(1, 2**63 - 1) | st.integers(1, 2**63 - 1).map(str)
KIND = st.from_regex(r"[a-z_]{1,32}", fullmatch=True)
TS = st.integers(0, 2**53)
BODY = JSON
# One valid item of each op, as PMQ's writers make them (pmq.domain: inbox, unread, chat,
# broadcast).
VALID_ITEMS = {
    "msg": st.fixed_dictionaries({"op": st.just("msg"), "msg": st.fixed_dictionaries(
        {"id": UID, "to": UID, "from": UID | st.none(), "kind": KIND, "ts": TS, "body": BODY})}),
    "ack": st.fixed_dictionaries({"op": st.just("ack"), "uid": UID,
                                  "ids": st.lists(UID, max_size=4)}),
    "last_read": st.fixed_dictionaries({"op": st.just("last_read"), "uid": UID, "kind": KIND,
                                        "ts": TS}),
    "cs": st.fixed_dictionaries({"op": st.just("cs"), "session_id": UID,
                                 "msg": st.fixed_dictionaries(
        {"id": UID, "from": UID, "to": UID, "ts": TS, "body": BODY})}),
    "cs_session": st.fixed_dictionaries(
        {"op": st.just("cs_session"), "id": UID, "uid": UID, "opened": UID, "closed": UID,
         "agent": st.just("") | UID, "last_msg_id": st.just("") | UID}),
    "broadcast": st.fixed_dictionaries({"op": st.just("broadcast"),
                                        "group": st.text(min_size=1, max_size=10),
                                        "msg": st.fixed_dictionaries(
        {"id": UID, "kind": KIND, "ts": TS, "body": BODY})}),
}
FIELD = SCALARS | st.lists(SCALARS, max_size=4) | st.dictionaries(st.text(max_size=4), SCALARS)


@st.composite
def storage_item(draw: st.DrawFn) -> tuple[bytes, bool]:
    """(a queue item, whether it is as PMQ writes it): a valid item of some op, often with
    one field (at the top or in its ``msg``) replaced by anything or removed, or cut short,
    or not an item at all."""
    how = draw(st.integers(0, 9))
    if how == 0:
        return draw(st.binary(max_size=200)), False
    if how == 1:
        return orjson.dumps(draw(JSON)), False
    item = draw(st.sampled_from(sorted(VALID_ITEMS)).flatmap(VALID_ITEMS.__getitem__))
    if how < 5:
        return orjson.dumps(item), True
    target = item["msg"] if "msg" in item and draw(st.booleans()) else item
    name = draw(st.sampled_from(sorted(target)))
    if draw(st.booleans()):
        del target[name]
    else:
        target[name] = draw(FIELD)
    raw = orjson.dumps(item)
    if how == 9:
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    return raw, False


@budget(1.0)
@given(st.lists(storage_item(), max_size=6))
@example([(b"\xff\xfe", False), (b'{"op":"ack","uid":"1","ids":[]}', True),
          (b"[" * 2000, False), (b'"op"', False)])
def test_storage_items_are_parsed_or_named_malformed(items: list[tuple[bytes, bool]]) -> None:
    tally("storage ops: parse_batch")
    batch = parse_batch([raw for raw, _ in items])
    parsed = (len(batch.rows) + len(batch.acks) + len(batch.last_reads)
              + len(batch.cs_messages) + len(batch.cs_sessions) + len(batch.broadcasts))
    assert set(batch.malformed) <= set(range(len(items)))
    assert all(reason.startswith("malformed: ") for reason in batch.malformed.values())
    for position, (_, valid) in enumerate(items):
        assert not (valid and position in batch.malformed), batch.malformed[position]
    # An ack with no ids is read and has nothing to do; everything else is one or the other.
    assert parsed + len(batch.malformed) <= len(items)
    for row in batch.rows:
        assert row.id > 0 and row.uid > 0 and isinstance(row.body, str)


# Relay channel (one socket worker's) -------------------------------------------------------


class StrictDelivery:
    """The connection table and unread pusher of a Relay (pmq.reactor.relay), holding
    decoded relays to the types the real ones rely on (pmq.reactor.connections,
    pmq.reactor.unread): what reaches them must be usable as it is."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def send_to_user(self, uid: str, frame: bytes) -> int:
        assert isinstance(uid, str) and isinstance(frame, bytes)
        message_id_of(frame)  # ConnectionTable.send_to_user reads it
        self.calls.append(("push", frame))
        return 0

    def push_again(self, uid: str, frame: bytes) -> int:
        assert isinstance(uid, str) and isinstance(frame, bytes)
        message_id_of(frame)  # ConnectionTable.push_again reads it
        self.calls.append(("again", frame))
        return 0

    def push_message(self, uid: str, frame: bytes, unread: Any) -> int:
        assert isinstance(uid, str) and isinstance(frame, bytes)
        if unread is not None:  # UnreadPusher._badge reads it as encode_message() made it
            assert isinstance(unread, UnreadState) and len(unread.counts) % 2 == 0
            assert isinstance(unread.last_clear, int)
            for value in unread.counts[1::2]:
                int(value)
        message_id_of(frame)
        self.calls.append(("message", frame))
        return 0

    def changed(self, uid: str) -> None:
        assert isinstance(uid, str)

    def kick_user(self, uid: str, reason: str) -> int:
        assert isinstance(uid, str) and isinstance(reason, str)
        return 0

    def evict(self, uid: str, conn_ids: list[str]) -> int:
        assert isinstance(uid, str) and all(isinstance(c, str) for c in conn_ids)
        return 0


@pytest.fixture
def relay() -> Relay:
    delivery: Any = StrictDelivery()
    return Relay(delivery, delivery)


RELAY_OPS = st.sampled_from([*Op, "msg"])  # "msg": an op of an earlier version, unknown now
UNREAD_STATE = st.one_of(
    st.lists(st.sampled_from(["comment", "notice", "1", "-3", "x", "9" * 5000]), max_size=7)
    .map(lambda v: orjson.dumps(v)),
    JSON.map(orjson.dumps),
    st.binary(max_size=30),
)
RELAY = st.one_of(
    st.binary(max_size=120),
    st.builds(
        lambda op, uid, sent, payload: f"{op} {uid} {sent}\n".encode() + payload,
        RELAY_OPS | st.text(max_size=8),
        st.sampled_from(["7", "0", "", "x y"]) | st.text(max_size=6),
        st.sampled_from(["1.5", "nan", "inf", "-1", "x"]) | st.floats().map(str),
        st.binary(max_size=80),
    ),
    st.builds(
        lambda state, frame: encode_relay(Op.MESSAGE, "7", state + b"\n" + frame, 1.0),
        UNREAD_STATE,
        st.binary(max_size=40) | st.just(b'{"type":"push","msg":{"id":"12x"}}'),
    ),
)


@budget(1.0)
@given(RELAY)
@example(encode_relay(Op.KICK, "7", b"\xff", 1.0))
@example(encode_relay(Op.EVICT, "7", b"c1 \xfe", 1.0))
@example(encode_relay(Op.MESSAGE, "7", b'{"a": 1}\n{}', 1.0))
@example(encode_relay(Op.MESSAGE, "7", b'["comment"]\n{}', 1.0))
@example(encode_relay(Op.MESSAGE, "7", b'["comment", "x", "1"]\n{}', 1.0))
@example(encode_relay(Op.MESSAGE, "7", b'["0"]\n{"type":"push","msg":{"id":"', 1.0))
@example(encode_relay(Op.PUSH, "7", b'{"type":"push","msg":{"id":"12x"}}', 1.0))
def test_relay_messages_are_delivered_or_dropped(
    relay: Relay, caplog: pytest.LogCaptureFixture, data: bytes
) -> None:
    """Whatever arrives on a worker's channel is handed on in the shape delivery needs, or
    dropped with a warning: never an exception out of the pub/sub handler (which pmq.redis.pipe
    logs as an ERROR with its traceback)."""
    tally("relay channel: Relay.on_message")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        relay.on_message({"channel": b"ch", "data": data})
    assert all(r.levelno == logging.WARNING for r in caplog.records), caplog.text


def test_relay_messages_as_sent_are_delivered(relay: Relay) -> None:
    """The other side of the property: what PMQ itself sends is not dropped."""
    delivery = relay.table
    assert isinstance(delivery, StrictDelivery)
    frame = push_frame(b'{"id":"42","kind":"comment"}')
    payload = encode_message(frame, UnreadState([b"comment", b"3"], 1700000000000))
    relay.on_message({"channel": b"ch", "data": encode_relay(Op.MESSAGE, "7", payload, 1.0)})
    relay.on_message({"channel": b"ch", "data": encode_relay(Op.PUSH, "7", frame, 1.0)})
    assert delivery.calls == [("message", frame), ("push", frame)]


# Broadcast channel (every socket worker's) -----------------------------------------------

BROADCAST = st.one_of(
    st.binary(max_size=120),
    st.builds(
        lambda group, frame: group + b"\n" + frame,
        st.sampled_from([b"all", b"author", b"\xff", b""]) | st.binary(max_size=8),
        st.one_of(
            st.binary(max_size=60),
            st.builds(
                lambda digits: b'{"type":"push","msg":{"id":"' + digits,
                st.sampled_from([b"", b"1", b"12\"", b"x\"", b"9" * 5000 + b'"']),
            ),
        ),
    ),
)


@budget(1.0)
@given(BROADCAST)
@example(b'all\n{"type":"push","msg":{"id":"123')
def test_broadcast_messages_are_queued_readable_or_dropped(data: bytes) -> None:
    tally("broadcast channel: Fanout.on_message")
    fanout = Fanout(ConnectionTable(), unread=None)  # type: ignore[arg-type]
    fanout.on_message({"channel": b"ch", "data": data})
    while not fanout.queue.empty():  # deliver() reads the id of what was queued
        group, frame = fanout.queue.get_nowait()
        assert isinstance(group, str)
        message_id_of(frame)


def test_broadcast_as_published_is_queued() -> None:
    fanout = Fanout(ConnectionTable(), unread=None)  # type: ignore[arg-type]
    frame = push_frame(b'{"id":"42","kind":"system"}')
    fanout.on_message({"channel": b"ch", "data": encode_broadcast("all", frame)})
    assert fanout.queue.get_nowait() == ("all", frame)


# Client frames and their data, before any I/O -------------------------------------------

ACTION_NAMES = ["ping", "msg.ack", "msg.pull", "unread.get", "unread.clear", "cs.open",
                "cs.send", "cs.close", "cs.history", "cs.sessions"]
ENVELOPE = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=70) | SCALARS,
        "action": st.sampled_from(ACTION_NAMES) | st.text(max_size=70) | SCALARS,
        "data": JSON,
    },
)
FRAME = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200),
    JSON.map(orjson.dumps),
    ENVELOPE.map(orjson.dumps),
)


@budget(1.0)
@given(FRAME)
@example(b'{"id": 1e400}')
@example('{"action": "ping", "id": ' + "9" * 30 + "}")
def test_client_frames_parse_or_say_what_is_wrong(frame: str | bytes) -> None:
    tally("client envelope: parse_request")
    try:
        request = parse_request(frame)
    except ProtocolError as exc:
        assert exc.code == Code.BAD_REQUEST and exc.msg
        assert exc.request_id is None or isinstance(exc.request_id, str)
        return
    assert isinstance(request.action, str) and request.action
    assert isinstance(request.data, dict)
    assert request.id is None or len(request.id) <= MAX_REQUEST_ID


# Every check a handler makes on its data before it touches Redis.
DATA_CHECKS = [
    msg.message_ids,
    unread.kinds_field,
    cs.session_field,
    cs.content_field,
    lambda data: cs.image_field(data.get("image")),
    lambda data: int_field(data, "after", 0, 0, msg.MAX_ID),
    lambda data: int_field(data, "limit", 50, 1, 200),
]
DATA = json_object_with(["ids", "kinds", "session_id", "text", "image", "after", "limit",
                         "before", "peer", "url", "width", "height"])


@budget(1.0)
@given(st.sampled_from(range(len(DATA_CHECKS))), DATA)
@example(5, {"after": "1" * 5000})  # int() refuses 4300+ digits: was a 500
@example(6, {"limit": "0" * 4301})
@example(4, {"image": {"url": "http://[::1"}})
def test_action_data_is_accepted_or_refused_with_400(check: int, data: dict[str, Any]) -> None:
    tally("client actions: data checks")
    try:
        DATA_CHECKS[check](data)
    except ActionError as exc:
        assert exc.code == Code.BAD_REQUEST and exc.msg


INGEST_CHECKS = [
    ingest.message_fields,
    ingest.broadcast_fields,
    lambda body: ingest.check_uid(body.get("to")),
]
INGEST_BODY = json_object_with(["to", "kind", "from", "body", "id", "group"])


@budget(1.0)
@given(st.sampled_from(range(len(INGEST_CHECKS))), INGEST_BODY)
@example(0, {"to": ["1" * 5000], "kind": "comment", "body": {}})
def test_ingest_fields_are_accepted_or_refused_with_400(check: int, body: dict[str, Any]) -> None:
    tally("ingest: field checks")
    try:
        INGEST_CHECKS[check](body)
    except HttpError as exc:
        assert exc.status == 400 and exc.msg
