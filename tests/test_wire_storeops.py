"""Pure unit tests of pmq/wire/storeops.py: storage-queue items in as bytes, values out, and
back; the Lua callers' side is in tests/test_tasks.py and tests/test_chat.py (real Redis)."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pmq.wire import storeops
from pmq.wire.client import MAX_ID, Message
from pmq.wire.storeops import (
    AckOp,
    BroadcastOp,
    CsMessageOp,
    CsSessionOp,
    LastReadOp,
    MessageOp,
    StoreOp,
    parse,
)

IDS = st.integers(1, MAX_ID)
KINDS = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=32)
TS = st.integers(0, 2**53)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
BODIES = JSON.map(lambda value: orjson.dumps(value).decode())  # as the store keeps them

OPS: st.SearchStrategy[StoreOp] = st.one_of(
    st.builds(MessageOp, IDS, IDS, KINDS, st.none() | IDS, BODIES, TS),
    st.builds(AckOp, IDS, st.lists(IDS, max_size=20)),
    st.builds(LastReadOp, IDS, KINDS, TS),
    st.builds(CsMessageOp, IDS, IDS, IDS, IDS, BODIES, TS),
    st.builds(CsSessionOp, IDS, IDS, st.none() | IDS, IDS, IDS, st.none() | IDS, st.text()),
    st.builds(BroadcastOp, IDS, st.text(min_size=1), KINDS, BODIES, TS),
)


@given(OPS)
def test_every_op_round_trips(op: StoreOp) -> None:
    raw = op.encode()
    assert parse(raw) == op
    assert orjson.loads(raw)["op"] == storeops.OpName(orjson.loads(raw)["op"])


# The bytes each producer queues (a Lua script's are made here too: the ack and the closed
# session it is handed), as the writer of every earlier version reads them.
MESSAGE = Message(5, "comment", "42", "7", {"t": "hi"}, 9)


def test_the_bytes_of_a_message_op() -> None:
    raw = storeops.encode_message(MESSAGE.encode())
    assert raw == (
        b'{"op":"msg","msg":{"id":"5","kind":"comment","from":"42","to":"7",'
        b'"body":{"t":"hi"},"ts":9}}'
    )
    assert parse(raw) == MessageOp(5, 7, "comment", 42, '{"t":"hi"}', 9)


def test_the_bytes_of_an_ack_and_a_last_read() -> None:
    assert storeops.encode_ack("7", [5, "6"]) == b'{"op":"ack","uid":"7","ids":["5","6"]}'
    assert parse(storeops.encode_ack("7", [5])) == AckOp(7, [5])
    raw = storeops.encode_last_read("7", "system", 9)
    assert raw == b'{"op":"last_read","uid":"7","kind":"system","ts":9}'
    assert parse(raw) == LastReadOp(7, "system", 9)


def test_the_bytes_of_the_chat_ops() -> None:
    cs = Message(5, "cs", "42", "7", {"text": "hi"}, 9)
    raw = storeops.encode_cs_message("3", cs.encode())
    assert raw.startswith(b'{"op":"cs","session_id":"3","msg":{"id":"5","kind":"cs"')
    assert parse(raw) == CsMessageOp(5, 3, 42, 7, '{"text":"hi"}', 9)
    filled = storeops.encode_cs_session("3", "idle", "7", "", "100", "200", "")
    assert parse(filled) == CsSessionOp(3, 7, None, 100, 200, None, "idle")
    with pytest.raises(ValueError):  # the CLOSE script's template, not yet filled in
        parse(storeops.encode_cs_session("3", "idle"))


def test_the_bytes_of_a_broadcast_op() -> None:
    wire = Message(5, "system", None, None, "hi", 9, "all").encode()
    raw = storeops.encode_broadcast("all", wire)
    assert raw == b'{"op":"broadcast","group":"all","msg":' + wire + b"}"
    assert parse(raw) == BroadcastOp(5, "all", "system", '"hi"', 9)


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe",
        b"[1]",
        b'{"op": "zap"}',
        b'{"op": "msg", "msg": "a producer\'s bug"}',
        b'{"op": "msg", "msg": {"id": "1", "to": "2", "kind": "c", "from": null, "ts": 1}}',
        b'{"op": "msg", "msg": {"id": "1", "to": "2", "kind": "c", "from": null, "ts": true,'
        b' "body": 1}}',
        b'{"op": "ack", "uid": "1", "ids": [1.5]}',
        b'{"op": "ack", "uid": "0", "ids": []}',
        b'{"op": "last_read", "uid": "1", "kind": "BAD", "ts": 1}',
        b'{"op": "cs", "session_id": "1", "msg": {"id": "1", "from": "2", "to": "x", "ts": 1,'
        b' "body": 1}}',
        b'{"op": "cs_session", "id": "1", "uid": "2", "opened": "3", "closed": "4",'
        b' "agent": "x", "last_msg_id": ""}',
        b'{"op": "broadcast", "group": "", "msg": {"id": "1", "kind": "c", "ts": 1, "body": 1}}',
    ],
)
def test_what_is_not_an_op_is_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse(raw)
