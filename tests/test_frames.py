"""pmq.reactor.connections.text_frame: the bytes websockets would write for a server's text
frame, at every length boundary of RFC 6455's three length encodings; first_frame_size()
reads them back, and message_id_of() finds a push frame's message id."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode

from pmq.reactor.connections import first_frame_size, text_frame
from pmq.wire.client import FrameType, encode_event, message_id_of, push_of


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_is_websockets_serialization(length: int) -> None:
    payload = bytes(i % 251 for i in range(length))
    assert text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False)



@pytest.mark.parametrize("length", [0, 125, 126, 65535, 65536])
def test_first_frame_size_splits_frames_written_together(length: int) -> None:
    first, second = text_frame(b"x" * length), text_frame(b"badge")
    together = first + second
    assert together[first_frame_size(together) :] == second


def test_message_id_of_a_push_frame_and_of_others() -> None:
    payload, message_id = push_of({"id": "387000000000000001", "kind": "notice", "body": {}})
    assert message_id == message_id_of(payload) == 387000000000000001
    assert message_id_of(encode_event(FrameType.UNREAD, data={"total": 1})) == 0
