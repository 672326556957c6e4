"""Fuzzing of the client WebSocket port of a real node, over raw sockets.

Envelopes and every action's data: random JSON (and text or binary frames that are not
JSON) is answered with a reply that is never a 500, and the connection stays open and
answers ping. Frames built by hand: each way of breaking RFC 6455 gets the close code it
calls for (1002 protocol error, 1007 bad UTF-8, 1009 too big), valid but unusual framing is
served, and random bytes after the handshake never get a 1011. The workers live on (same
pids) and the node's log has no traceback, ERROR or CRITICAL line.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.helpers import Node
from tests.test_fuzz_kit import (
    JSON,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    SCALARS,
    RawWebSocket,
    budget,
    close_payload,
    frame,
    fuzz_node,
    json_object_with,
    tally,
    unharmed,
)

USER, AGENT = 7001, 9001
MAX_FRAME = 8192  # server.max_frame of the fuzzed node: 1009 is cheap to reach
ANSWERS = {200, 400, 401, 403, 404, 409, 413, 429}  # the reply codes but 500 (and 503)

# Envelopes and action data ----------------------------------------------------------------

FIELDS = {
    "ping": [],
    "msg.ack": ["ids"],
    "msg.pull": ["after", "limit", "kind"],
    "unread.get": [],
    "unread.clear": ["kinds"],
    "cs.open": [],
    "cs.send": ["session_id", "text", "image"],
    "cs.close": ["session_id"],
    "cs.history": ["session_id", "peer", "before", "limit"],
    "cs.sessions": [],
}


@st.composite
def envelope(draw: st.DrawFn, session_ids: list[str]) -> bytes:
    """A request frame: mostly a known action with data built from its fields (and the
    id of a real session, so chat checks past the session are reached), sometimes any JSON
    or no JSON at all."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return draw(st.text(max_size=200)).encode()
    if kind == 2:
        return orjson.dumps(draw(JSON))
    # Mostly right where the envelope's check is simple, so that the data's are reached.
    if draw(st.integers(0, 9)) < 8:
        action: Any = draw(st.sampled_from(sorted(FIELDS)))
    else:
        action = draw(st.text(max_size=12) | SCALARS)
    fields = FIELDS.get(action, []) if isinstance(action, str) else []
    values = JSON | st.sampled_from(session_ids) | st.just({"url": "https://example.com/a.png"})
    data: Any
    if draw(st.integers(0, 9)) < 8:
        data = draw(st.dictionaries(st.sampled_from([*fields, "x"]), values, max_size=4))
    else:
        data = draw(JSON | json_object_with(fields or ["x"]))
    value: dict[str, Any] = {"action": action, "data": data}
    if draw(st.booleans()):
        value["id"] = draw(st.text(max_size=8) if draw(st.booleans()) else
                           st.text(max_size=70) | SCALARS)
    return orjson.dumps(value)


@pytest.fixture
def ws_node(make_node: Callable[..., Node]) -> Node:
    return fuzz_node(make_node, server={"max_frame": MAX_FRAME})


def test_envelopes_and_action_data_never_get_500_nor_close(ws_node: Node) -> None:
    with unharmed(ws_node):
        user = RawWebSocket(ws_node, USER)
        opened = user.request("cs.open")
        assert opened["code"] == 200, opened
        session_ids = [opened["data"]["session_id"], "1", "99999"]
        clients = {False: user, True: RawWebSocket(ws_node, AGENT, role="agent")}

        @budget(1.0)
        @given(st.booleans(), envelope(session_ids), st.sampled_from([OP_TEXT, OP_BINARY]))
        @example(False, b'{"action": "msg.pull", "data": {"after": "' + b"1" * 5000 + b'"}}',
                 OP_TEXT)  # int() of 4300+ digits: was a 500
        @example(False, b'{"action": "cs.history", "data": {"limit": "' + b"0" * 4301 + b'"}}',
                 OP_TEXT)
        def check(as_agent: bool, payload: bytes, opcode: int) -> None:
            tally("websocket: envelopes and action data")
            ws = clients[as_agent]
            if opcode == OP_TEXT:
                payload = payload.decode(errors="replace").encode()  # text must be UTF-8
            assert ws.send(frame(opcode, payload)), "the server closed the connection"
            if len(payload) > MAX_FRAME:  # closed with 1009, then connect again
                assert ws.close_code() == 1009
                ws.close()
                uid, role = (AGENT, "agent") if as_agent else (USER, "user")
                clients[as_agent] = RawWebSocket(ws_node, uid, role=role)
                return
            reply = ws.next_reply()
            assert reply["code"] in ANSWERS, reply
            assert isinstance(reply["msg"], str) and reply["msg"], reply
            assert ws.request("ping", request_id="alive")["code"] == 200

        check()
        for ws in clients.values():
            ws.close()


# Frames built by hand -------------------------------------------------------------------

PING_REQUEST = orjson.dumps({"id": "p", "action": "ping"})
CONTROL = st.sampled_from([OP_PING, OP_PONG, OP_CLOSE])
BAD_OPCODE = st.sampled_from([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
BAD_UTF8 = st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80",
                            b"\xc0\xaf", b'{"a":"\xe2\x82"}'])
INVALID_CLOSE_CODES = st.sampled_from([0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000,
                                       65535])


@st.composite
def prelude(draw: st.DrawFn) -> list[tuple[bytes, bool]]:
    """Valid frames before the one under test, each with whether it gets a reply:
    requests (whole, as binary, in fragments with a ping between them) and pongs."""
    frames: list[tuple[bytes, bool]] = []
    for _ in range(draw(st.integers(0, 2))):
        how = draw(st.integers(0, 3))
        if how == 0:
            frames.append((frame(OP_TEXT, PING_REQUEST), True))
        elif how == 1:
            cut = draw(st.integers(0, len(PING_REQUEST)))
            fragments = (frame(OP_BINARY, PING_REQUEST[:cut], fin=False)
                         + frame(OP_PING, draw(st.binary(max_size=125)))
                         + frame(OP_CONT, PING_REQUEST[cut:]))
            frames.append((fragments, True))
        elif how == 2:
            frames.append((frame(OP_PONG, draw(st.binary(max_size=125))), False))
        else:
            frames.append((frame(OP_BINARY, PING_REQUEST), True))
    return frames


@st.composite
def broken_frame(draw: st.DrawFn) -> tuple[str, bytes, int]:
    """(what is wrong, the frames, the close code RFC 6455 calls for)."""
    payload = draw(st.binary(max_size=40))
    cases: list[Callable[[], tuple[str, bytes, int]]] = [
        lambda: ("unmasked", frame(OP_TEXT, PING_REQUEST, masked=False), 1002),
        lambda: ("reserved bits", frame(OP_TEXT, PING_REQUEST, rsv=draw(st.integers(1, 7))),
                 1002),
        lambda: ("reserved opcode", frame(draw(BAD_OPCODE), payload), 1002),
        # RFC 6455 5.2: "the minimal number of bytes MUST be used to encode the length"
        lambda: ("length in a longer form than needed",
                 frame(OP_TEXT, PING_REQUEST, wide=draw(st.sampled_from([2, 8]))), 1002),
        lambda: ("control frame over 125 bytes",
                 frame(draw(CONTROL), draw(st.binary(min_size=126, max_size=300))), 1002),
        lambda: ("fragmented control frame", frame(draw(CONTROL), payload, fin=False), 1002),
        lambda: ("continuation with nothing to continue", frame(OP_CONT, payload), 1002),
        lambda: ("new message inside a fragmented one",
                 frame(OP_TEXT, b'{"id":', fin=False) + frame(draw(st.sampled_from(
                     [OP_TEXT, OP_BINARY])), PING_REQUEST), 1002),
        lambda: ("invalid UTF-8 text", frame(OP_TEXT, b'{"a":"' + draw(BAD_UTF8) + b'"}'), 1007),
        lambda: ("invalid UTF-8 across fragments",
                 frame(OP_TEXT, b'{"a":"\xe2', fin=False) + frame(OP_CONT, b'x"}'), 1007),
        lambda: ("message over max_frame",
                 frame(OP_BINARY, b" " * (MAX_FRAME + draw(st.integers(1, 3000)))), 1009),
        lambda: ("fragments over max_frame",
                 frame(OP_TEXT, b" " * MAX_FRAME, fin=False) + frame(OP_CONT, b" " * 10), 1009),
        lambda: ("close with a 1-byte payload", frame(OP_CLOSE, b"\x03"), 1002),
        lambda: ("close with an invalid code",
                 frame(OP_CLOSE, close_payload(draw(INVALID_CLOSE_CODES))), 1002),
        lambda: ("close reason not UTF-8",
                 frame(OP_CLOSE, close_payload(1000, draw(BAD_UTF8))), 1007),
    ]
    return cases[draw(st.integers(0, len(cases) - 1))]()


def test_broken_frames_are_closed_with_the_right_code(ws_node: Node) -> None:
    @budget(0.6)
    @given(prelude(), broken_frame())
    def check(before: list[tuple[bytes, bool]], broken: tuple[str, bytes, int]) -> None:
        tally("websocket: broken frames")
        what, data, code = broken
        ws = RawWebSocket(ws_node, USER)
        try:
            for sent, replied in before:
                assert ws.send(sent)
                if replied:
                    assert ws.next_reply()["code"] == 200
            ws.send(data)
            assert ws.close_code() == code, what
        finally:
            ws.close()

    with unharmed(ws_node):
        check()


@st.composite
def odd_but_valid(draw: st.DrawFn) -> tuple[bytes, int, Any]:
    """(frames, the opcode of the answer, what it holds): a request's reply, a ping's pong
    with its payload, a close echoed with its code."""
    how = draw(st.integers(0, 3))
    if how == 0:  # a request in many fragments
        cuts = sorted(draw(st.sets(st.integers(1, len(PING_REQUEST) - 1), max_size=6)))
        parts = [PING_REQUEST[a:b] for a, b in zip([0, *cuts], [*cuts, len(PING_REQUEST)],
                                                   strict=True)]
        frames = [frame(OP_TEXT if i == 0 else OP_CONT, part, fin=i == len(parts) - 1)
                  for i, part in enumerate(parts)]
        return b"".join(frames), OP_TEXT, 200
    if how == 1:
        payload = draw(st.binary(max_size=125))
        return frame(OP_PING, payload), OP_PONG, payload
    if how == 2:  # empty fragments are fine too
        frames = [frame(OP_TEXT, b"", fin=False), frame(OP_CONT, PING_REQUEST, fin=False),
                  frame(OP_CONT, b"")]
        return b"".join(frames), OP_TEXT, 200
    code = draw(st.sampled_from([1000, 1001, 1003, 1011, 3000, 4000, 4999]))
    reason = draw(st.text(max_size=20)).encode()
    return frame(OP_CLOSE, close_payload(code, reason)), OP_CLOSE, code


def test_unusual_but_valid_framing_is_served(ws_node: Node) -> None:
    @budget(0.2)
    @given(odd_but_valid())
    def check(case: tuple[bytes, int, Any]) -> None:
        tally("websocket: unusual valid framing")
        data, opcode, expected = case
        ws = RawWebSocket(ws_node, USER)
        try:
            assert ws.send(data)
            if opcode == OP_TEXT:
                assert ws.next_reply()["code"] == expected
            elif opcode == OP_PONG:
                while (got := ws.next_frame()) is not None and got[0] == OP_PING:
                    pass  # the server's heartbeat
                assert got == (OP_PONG, expected)
            else:
                assert ws.close_code() == expected  # a close is echoed
        finally:
            ws.close()

    with unharmed(ws_node):
        check()


def test_random_bytes_after_the_handshake_never_get_1011(ws_node: Node) -> None:
    valid = prelude().map(lambda frames: b"".join(data for data, _ in frames))
    wrong_length = st.builds(  # a length that is not the payload's: what follows is misread
        lambda opcode, payload, declared: frame(opcode, payload, declared=declared),
        st.integers(0, 15), st.binary(max_size=40), st.integers(0, 200),
    )

    @budget(0.5)
    @given(st.lists(st.binary(min_size=1, max_size=64) | valid | wrong_length, max_size=4))
    def check(pieces: list[bytes]) -> None:
        tally("websocket: random bytes")
        ws = RawWebSocket(ws_node, USER)
        try:
            for piece in pieces:
                if not ws.send(piece):
                    break
            ws.sock.shutdown(socket.SHUT_WR)
            code = ws.close_code()
            assert code != 1011, "internal error"
        except OSError:
            pass  # reset by the server after it failed the connection
        finally:
            ws.close()

    with unharmed(ws_node):
        check()
    ws = RawWebSocket(ws_node, USER)
    assert ws.request("ping")["code"] == 200
    ws.close()


def test_a_reply_after_the_fuzz_is_well_formed(ws_node: Node) -> None:
    """The envelope target's own check, on its own: the reply frame is the shape docs/protocol.md
    gives, so the fuzz targets above read real replies."""
    ws = RawWebSocket(ws_node, USER)
    assert ws.send(frame(OP_TEXT, b"not json"))
    reply = ws.next_reply()
    assert (reply["id"], reply["code"]) == (None, 400) and json.dumps(reply)
    ws.close()
