"""Pure unit tests of pmq/wire/relay.py: relay messages in as bytes, values out, and back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pmq.wire.client import MAX_ID, Message
from pmq.wire.relay import (
    Op,
    UnknownOp,
    UnreadState,
    decode,
    decode_broadcast,
    decode_broadcast_item,
    decode_message,
    encode,
    encode_broadcast,
    encode_broadcast_item,
    encode_message,
)

FRAME = b'{"type":"push","msg":{"id":"1"}}'
UIDS = st.integers(1, 2**63 - 1).map(str)
KINDS = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=32)
COUNTS = st.lists(
    st.tuples(KINDS, st.integers(-(10**6), 10**9)), max_size=6
).map(lambda pairs: [v for kind, n in pairs for v in (kind.encode(), str(n).encode())])
STATES = st.builds(UnreadState, COUNTS, st.integers(0, 2**53))


def test_the_bytes_of_a_relay_message() -> None:
    assert encode(Op.MESSAGE, "7", b"x", 1.5) == b"message 7 1.500000\nx"
    assert encode(Op.KICK, "42", b"reason", 0.0) == b"kick 42 0.000000\nreason"
    state = UnreadState([b"comment", b"3"], 1700000000000)
    assert encode_message(FRAME, state) == b'["comment","3","1700000000000"]\n' + FRAME


@given(st.sampled_from(Op), UIDS, st.floats(0, 2e9), st.binary(max_size=200))
def test_a_relay_message_round_trips(op: Op, uid: str, sent: float, payload: bytes) -> None:
    got_op, got_uid, got_sent, got_payload = decode(encode(op, uid, payload, sent))
    assert (got_op, got_uid, got_payload) == (op, uid, payload)
    assert got_op is op
    assert got_sent == pytest.approx(sent, abs=1e-6)


@given(STATES, st.binary(max_size=100))
def test_a_message_payload_round_trips(state: UnreadState, frame: bytes) -> None:
    got_frame, got = decode_message(encode_message(frame, state))
    assert got_frame == frame
    assert got == UnreadState([v.decode() for v in state.counts], state.last_clear)
    assert encode_message(frame, got) == encode_message(frame, state)  # relayed again: same


def test_a_script_reply_is_the_pairs_then_the_last_clear() -> None:
    assert UnreadState.of_reply([b"notice", b"2", b"0"]) == ([b"notice", b"2"], 0)
    assert UnreadState.of_reply([b"17"]) == UnreadState([], 17)


def test_an_unknown_op_names_itself() -> None:
    with pytest.raises(UnknownOp) as info:
        decode(b"msg 7 1.0\n" + FRAME)  # an earlier version's bare message
    assert (info.value.op, info.value.uid) == ("msg", "7")


@pytest.mark.parametrize(
    "message",
    [b"no header line", b"push 7\nx", b"push 7 1.0 extra\nx", b"push 7 x\n", b"\xff 7 1\n"],
)
def test_a_malformed_header_is_a_value_error(message: bytes) -> None:
    with pytest.raises(ValueError):
        decode(message)


@pytest.mark.parametrize(
    "payload",
    [
        b"[not json\n" + FRAME,
        b'{"a": 1}\n' + FRAME,
        b'["comment"]\n' + FRAME,  # a pair cut short
        b'["comment", "x", "1"]\n' + FRAME,  # a count that is no number
        b'["comment", "1", "x"]\n' + FRAME,  # a last clear that is no number
        b'["comment", 1, "2"]\n' + FRAME,  # not strings
    ],
)
def test_a_malformed_state_is_a_value_error(payload: bytes) -> None:
    with pytest.raises(ValueError):
        decode_message(payload)


GROUPS = st.text(min_size=1).filter(lambda g: "\n" not in g)


@given(GROUPS, st.integers(1, MAX_ID), st.text(), st.integers(0, 2**53))
def test_a_broadcast_queue_item_round_trips(group: str, id_: int, body: str, ts: int) -> None:
    message = Message(id_, "system", None, None, body, ts, group)
    item = encode_broadcast_item(group, message.encode())
    assert decode_broadcast_item(item) == (group, message.wire())


@given(GROUPS, st.binary(max_size=100))
def test_a_broadcast_channel_message_round_trips(group: str, frame: bytes) -> None:
    assert decode_broadcast(encode_broadcast(group, frame)) == (group, frame)


def test_the_bytes_of_the_broadcast_formats() -> None:
    assert encode_broadcast("all", FRAME) == b"all\n" + FRAME
    assert encode_broadcast_item("all", b'{"id":"1"}') == b'{"group":"all","msg":{"id":"1"}}'


@pytest.mark.parametrize(
    "item",
    [b"[", b"[1]", b'{"group": "all"}', b'{"group": "all", "msg": []}',
     b'{"group": 1, "msg": {"id": "1"}}', b'{"group": "all", "msg": {"id": "x"}}'],
)
def test_a_malformed_broadcast_item_is_a_value_error(item: bytes) -> None:
    with pytest.raises(ValueError):
        decode_broadcast_item(item)


def test_a_broadcast_channel_message_needs_its_group_line() -> None:
    with pytest.raises(ValueError):
        decode_broadcast(b"all")
