"""Pure unit tests of pmq/wire/client.py: frames in, values out, and back."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pmq.wire import client as protocol
from pmq.wire.client import (
    MAX_ID,
    Code,
    FrameType,
    Message,
    ProtocolError,
    Request,
    encode_event,
    encode_hello,
    encode_reply,
    is_kind,
    is_uid,
    message_id_of,
    parse_request,
    push_frame,
    push_of,
    stored_message,
)


def bad_request(frame: str | bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_request(frame)
    assert info.value.code == Code.BAD_REQUEST
    return info.value


# parse_request ---------------------------------------------------------------------------


def test_parse_valid_frame() -> None:
    request = parse_request('{"id":"c1","action":"msg.ack","data":{"ids":["1","2"]}}')
    assert request == Request("c1", "msg.ack", {"ids": ["1", "2"]})


def test_parse_bytes_frame() -> None:
    assert parse_request(b'{"id":"c2","action":"ping","data":{}}') == Request("c2", "ping", {})


def test_parse_int_id_becomes_string() -> None:
    request = parse_request('{"id":7,"action":"ping"}')
    assert request.id == "7"


def test_parse_without_id_or_data() -> None:
    request = parse_request('{"action":"unread.get"}')
    assert request == Request(None, "unread.get", {})


def test_parse_null_data_is_empty() -> None:
    assert parse_request('{"id":"a","action":"ping","data":null}').data == {}


@pytest.mark.parametrize("frame", ["{not json", "", b"\xff\xfe", '{"id":"c1",'])
def test_invalid_json_is_400_without_id(frame: str | bytes) -> None:
    error = bad_request(frame)
    assert error.request_id is None
    assert "JSON" in error.msg


@pytest.mark.parametrize("frame", ["[]", '"ping"', "42", "null", '[{"action":"ping"}]'])
def test_non_object_is_400(frame: str) -> None:
    error = bad_request(frame)
    assert error.request_id is None
    assert "object" in error.msg


@pytest.mark.parametrize(
    "frame",
    [
        '{"id":"c3"}',
        '{"id":"c3","action":""}',
        '{"id":"c3","action":5}',
        '{"id":"c3","action":null}',
    ],
)
def test_missing_or_invalid_action_is_400_with_id(frame: str) -> None:
    error = bad_request(frame)
    assert error.request_id == "c3"
    assert error.msg == "action: missing or not a string"


@pytest.mark.parametrize("name", ["Ping", "1ping", "msg-ack", "a" * 65])
def test_any_other_name_is_an_action_the_gateway_may_not_know(name: str) -> None:
    # SPEC 3: an unknown action is a 404, whatever its name (pmq.reactor.gateway).
    assert parse_request('{"action":"' + name + '"}').action == name


def test_invalid_action_carries_int_id_as_string() -> None:
    assert bad_request('{"id":9,"action":null}').request_id == "9"


@pytest.mark.parametrize("data", ['"x"', "[]", "1", "true"])
def test_data_not_object_is_400_with_id(data: str) -> None:
    error = bad_request('{"id":"c4","action":"ping","data":' + data + "}")
    assert error.request_id == "c4"
    assert "data" in error.msg


@pytest.mark.parametrize("request_id", ["true", "[1]", '{"a":1}', "1.5", '"' + "x" * 65 + '"'])
def test_bad_id_is_400(request_id: str) -> None:
    error = bad_request('{"id":' + request_id + ',"action":"ping"}')
    assert error.request_id is None
    assert "id" in error.msg


def test_id_at_max_length_is_accepted() -> None:
    long_id = "x" * protocol.MAX_REQUEST_ID
    assert parse_request(json.dumps({"id": long_id, "action": "ping"})).id == long_id


# Encoding --------------------------------------------------------------------------------


def test_encode_reply_defaults() -> None:
    assert json.loads(encode_reply("c1")) == {
        "type": "reply",
        "id": "c1",
        "code": 200,
        "msg": "OK",
        "data": {},
    }


def test_encode_reply_error_with_default_msg() -> None:
    assert json.loads(encode_reply(None, Code.BAD_REQUEST)) == {
        "type": "reply",
        "id": None,
        "code": 400,
        "msg": "Bad Request",
        "data": {},
    }


def test_encode_reply_int_code_and_explicit_fields() -> None:
    frame = encode_reply("c2", 429, "slow down", {"retry": 1})
    assert json.loads(frame) == {
        "type": "reply",
        "id": "c2",
        "code": 429,
        "msg": "slow down",
        "data": {"retry": 1},
    }


def test_encode_reply_empty_msg_is_kept() -> None:
    assert json.loads(encode_reply("c", Code.OK, ""))["msg"] == ""


def test_every_code_has_a_message() -> None:
    for code in Code:
        assert json.loads(encode_reply("x", code))["msg"] == protocol.MESSAGES[code]


def test_encode_reply_unknown_code_raises() -> None:
    with pytest.raises(ValueError):
        encode_reply("x", 418)


def test_push_frame_around_a_message() -> None:
    message = Message(123456789, "comment", "42", "7", {"text": "hi"}, 1700000000000)
    assert json.loads(push_frame(message.encode())) == {
        "type": "push",
        "msg": {
            "id": "123456789",
            "kind": "comment",
            "from": "42",
            "to": "7",
            "body": {"text": "hi"},
            "ts": 1700000000000,
        },
    }


def test_a_broadcast_names_its_group_and_no_recipient() -> None:
    wire = Message(5, "system", None, None, "hi", 9, "all").encode()
    assert wire == (
        b'{"id":"5","kind":"system","from":null,"to":null,"group":"all","body":"hi","ts":9}'
    )


def test_a_comment_on_ones_own_content_counts_nothing() -> None:
    assert not Message(1, "comment", "7", "7", {}, 1).counts_unread
    assert Message(1, "comment", "8", "7", {}, 1).counts_unread
    assert Message(1, "notice", "7", "7", {}, 1).counts_unread


def test_a_stored_message_as_clients_see_it() -> None:
    assert stored_message(5, "notice", None, 7, '{"a":1}', 9) == {
        "id": "5", "kind": "notice", "from": None, "to": "7", "body": {"a": 1}, "ts": 9
    }
    assert stored_message(5, "cs", 8, 7, "[]", 9)["from"] == "8"


uids = st.integers(1, MAX_ID).map(str)
bodies = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
messages = st.builds(
    Message,
    st.integers(1, MAX_ID),
    st.sampled_from(["comment", "notice", "letter", "system", "cs", "a_kind"]),
    st.none() | uids,
    st.none() | uids,
    bodies,
    st.integers(0, 2**53),
    st.none() | st.text(min_size=1),
)


@given(messages)
def test_a_message_round_trips_through_its_push_frame(message: Message) -> None:
    frame = push_frame(message.encode())
    assert message_id_of(frame) == message.id
    parsed = orjson.loads(frame)
    assert parsed["type"] == FrameType.PUSH and parsed["msg"] == message.wire()
    assert push_of(parsed["msg"]) == (frame, message.id)
    back = parsed["msg"]
    assert Message(
        int(back["id"]), back["kind"], back["from"], back["to"], back["body"], back["ts"],
        back.get("group"),
    ) == message


def test_encode_hello_whole_heartbeat_is_int() -> None:
    frame = json.loads(encode_hello("conn-1", "7", 25.0))
    assert frame == {"type": "hello", "conn_id": "conn-1", "uid": "7", "heartbeat": 25}
    assert type(frame["heartbeat"]) is int


def test_encode_hello_fractional_heartbeat() -> None:
    assert json.loads(encode_hello("c", "7", 2.5))["heartbeat"] == 2.5


def test_encode_event() -> None:
    frame = encode_event(FrameType.UNREAD, counts={"comment": 1, "total": 1})
    assert json.loads(frame) == {"type": "unread", "counts": {"comment": 1, "total": 1}}


def test_frames_are_bytes() -> None:
    assert isinstance(encode_reply("c"), bytes)
    assert isinstance(push_frame(b"{}"), bytes)
    assert isinstance(encode_hello("c", "1", 25), bytes)


# Validators ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["comment", "cs", "a", "new_follower", "z" * 32])
def test_is_kind_accepts(value: str) -> None:
    assert is_kind(value)


@pytest.mark.parametrize(
    "value", ["", "Comment", "a-b", "a b", "x1", "z" * 33, None, 1, True, ["comment"]]
)
def test_is_kind_rejects(value: object) -> None:
    assert not is_kind(value)


def test_kind_enum_values_are_kinds() -> None:
    assert all(is_kind(k) for k in protocol.Kind)
    assert protocol.UNREAD_KINDS == ("comment", "notice", "letter", "system", "cs")


@pytest.mark.parametrize("value", [1, 42, 2**63 - 1, "1", "42", "9223372036854775807"])
def test_is_uid_accepts(value: object) -> None:
    assert is_uid(value)


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        0,
        -1,
        2**63,
        "0",
        "-1",
        "+1",
        " 1",
        "1.0",
        "",
        "abc",
        "9223372036854775808",  # 2**63
        "1" * 20,
        "1" * 5000,  # past int()'s 4300-digit limit: must not raise
        "\u00b2",  # superscript two: isdigit() but not a number int() takes
        "\u0661\u0662\u0663",  # Arabic-Indic digits: int() takes them, a uid must not
        1.0,
        None,
        b"1",
    ],
)
def test_is_uid_rejects(value: object) -> None:
    assert not is_uid(value)


ACTIONS = st.text(min_size=1, max_size=70)
REQUEST_IDS = st.none() | st.text(max_size=protocol.MAX_REQUEST_ID)


@given(REQUEST_IDS, ACTIONS, st.dictionaries(st.text(max_size=5), bodies, max_size=4))
def test_a_request_round_trips(
    request_id: str | None, action: str, data: dict[str, object]
) -> None:
    frame = orjson.dumps({"id": request_id, "action": action, "data": data})
    assert parse_request(frame) == Request(request_id, action, data)


@given(REQUEST_IDS, st.sampled_from(Code), st.none() | st.text(), bodies.filter(bool))
def test_a_reply_round_trips(
    request_id: str | None, code: Code, msg: str | None, data: object
) -> None:
    value = {"data": data}
    reply = orjson.loads(encode_reply(request_id, code, msg, value))
    assert reply == {
        "type": "reply",
        "id": request_id,
        "code": int(code),
        "msg": protocol.MESSAGES[code] if msg is None else msg,
        "data": value,
    }


def test_a_message_whose_recipient_a_script_names_splits_around_it() -> None:
    body = {"session_id": "9", "text": "to: \u0000recipient\u0000 in the body too"}
    made = Message(12, "cs", "7", protocol.LATER_RECIPIENT, body, 1700000000000).encode()
    before, after = protocol.around_recipient(made)
    named = Message(12, "cs", "7", "123", body, 1700000000000).encode()
    assert before + b'"123"' + after == named
