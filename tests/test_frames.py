"""pmq.reactor.connections.text_frame: the bytes websockets would write for a server's text
frame, at every length boundary of RFC 6455's three length encodings."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode

from pmq.reactor.connections import text_frame


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_is_websockets_serialization(length: int) -> None:
    payload = bytes(i % 251 for i in range(length))
    assert text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False)

