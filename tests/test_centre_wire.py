"""The notification centre's storage operations (pmq.wire.storeops): read, revoke, edit and
bc_revoke, encoded and parsed back, and what is not one of them refused."""

from __future__ import annotations

import orjson
import pytest

from pmq.wire import storeops
from pmq.wire.client import Message
from pmq.wire.storeops import AmendOp, BroadcastRevokeOp, OpName, ReadOp

MESSAGE = Message(123, "comment", "5", "7", {"a": 1}, 1000).encode()
BROADCAST = Message(9, "system", None, None, {}, 3, "vip").encode()


@pytest.mark.parametrize(
    "raw",
    [
        storeops.encode_amend(OpName.REVOKE, MESSAGE),
        storeops.encode_amend(OpName.EDIT, MESSAGE),
        storeops.encode_amend(OpName.BC_REVOKE, BROADCAST, "vip"),
        storeops.encode_read("7", [(5, 10), (6, 11)], {"*": 9, "comment": 4}),
        storeops.encode_read("7", [], {}),
    ],
)
def test_each_op_parses_to_a_value_that_encodes_it_again(raw: bytes) -> None:
    op = storeops.parse(raw)
    assert isinstance(op, AmendOp | BroadcastRevokeOp | ReadOp)
    assert storeops.parse(op.encode()) == op


def test_the_values_carry_the_rows() -> None:
    revoke = storeops.parse(storeops.encode_amend(OpName.REVOKE, MESSAGE))
    assert revoke == AmendOp(
        OpName.REVOKE, storeops.MessageOp(123, 7, "comment", 5, '{"a":1}', 1000)
    )
    read = storeops.parse(storeops.encode_read("7", [(5, 10)], {"*": 9}))
    assert read == ReadOp(7, [(5, 10)], {"*": 9})


def test_a_read_op_as_lua_writes_it_with_no_ids_parses() -> None:
    # centre_read.lua re-encodes the op with cjson, which writes an empty list as {}.
    raw = orjson.dumps({"op": "read", "uid": "7", "ids": {}, "marks": {"*": "9"}})
    assert storeops.parse(raw) == ReadOp(7, [], {"*": 9})


@pytest.mark.parametrize(
    "item",
    [
        {"op": "read", "uid": "7", "ids": [["x", 1]], "marks": {}},
        {"op": "read", "uid": "7", "ids": [], "marks": {"Bad": "1"}},
        {"op": "read", "uid": "0", "ids": [], "marks": {}},
        {"op": "revoke", "msg": {"id": "1"}},
        {"op": "edit"},
        {"op": "bc_revoke", "msg": orjson.loads(BROADCAST)},  # no group
    ],
)
def test_what_is_not_an_op_is_refused(item: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        storeops.parse(orjson.dumps(item))
