"""What the fuzz targets (tests/test_fuzz_*.py) share: example budgets, the report that
``python -m bench.fuzz`` prints, checks that a node came through unharmed, JSON strategies,
and a WebSocket client driven by hand over a raw socket (frames built byte by byte, so
they can be wrong in every way a hostile client could make them).

The example counts come from the Hypothesis profile tests/conftest.py loads: "ci" by
default, "long" (``HYPOTHESIS_PROFILE=long``, ``PMQ_FUZZ_EXAMPLES=N``) from bench.fuzz.
"""

from __future__ import annotations

import atexit
import base64
import collections
import contextlib
import json
import os
import re
import secrets
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests.helpers import Node

REPORT_ENV = "PMQ_FUZZ_REPORT"  # a file bench.fuzz reads: examples run per target (JSON)
BAD_LOG = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b")


def budget(share: float = 1.0, long_share: float = 1.0) -> settings:
    """Settings for a target: ``share`` of the profile's max_examples in CI (end-to-end
    targets cost a round trip per example), ``long_share`` of them in a long run (1 but for
    a target whose examples each wait out a timeout)."""
    assert settings.default is not None
    examples = settings.default.max_examples
    ci = os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci"
    examples = max(10, int(examples * (share if ci else long_share)))
    return settings(
        max_examples=examples,
        # A node is started once per test and shared by its examples.
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


TALLY: collections.Counter[str] = collections.Counter()
SPAN: dict[str, list[float]] = {}  # target -> [first example's start, last example's start]


def tally(target: str) -> None:
    """Count one example of ``target``; the counts go to the bench.fuzz report at exit."""
    if not TALLY and os.environ.get(REPORT_ENV):
        atexit.register(write_report, os.environ[REPORT_ENV])
    TALLY[target] += 1
    now = time.monotonic()
    SPAN.setdefault(target, [now, now])[1] = now


def write_report(path: str) -> None:
    with open(path, "w") as report:
        json.dump({t: {"examples": n, "seconds": SPAN[t][1] - SPAN[t][0]}
                   for t, n in TALLY.items()}, report)


# Nodes --------------------------------------------------------------------------------


def worker_pids(node: Node) -> dict[str, list[int]]:
    """The pids of the node's socket and task workers."""
    return {kind: sorted(w["pid"] for w in node.workers(kind)) for kind in ("socket", "task")}


@contextlib.contextmanager
def unharmed(node: Node) -> Iterator[None]:
    """The block must leave every worker of ``node`` alive (no restart: same pids) and its
    log free of tracebacks, ERROR and CRITICAL lines."""
    before = worker_pids(node)
    assert before["socket"] and before["task"], before
    yield
    assert worker_pids(node) == before, f"a worker was restarted:\n{node.log()}"
    bad = [line for line in node.log().splitlines() if BAD_LOG.search(line)]
    assert not bad, "\n".join(bad[:40])


def fuzz_node(make_node: Any, **sections: dict[str, Any]) -> Node:
    """A started node whose rate limit does not get in the fuzzer's way."""
    server = {"rate": 1_000_000, **sections.pop("server", {})}
    node: Node = make_node(server=server, **sections).start()
    return node


# Strategies ---------------------------------------------------------------------------

# Scalars PMQ meets in the wild, and the edges of its checks: long digit strings (int()
# refuses past 4300 digits), 64-bit bounds, non-ASCII digits, blanks, control characters.
EDGE_SCALARS = st.sampled_from(
    [
        0, -1, 1, 2**63 - 1, 2**63, -(2**63), 2**64 - 1, 1.5, -0.0, 1e308, True, False, None,
        "", " ", "0", "1", "00001", "9" * 19, "9" * 20, "1" * 5000, "²", "١٢٣", "\x00",
        "comment", "system", "all", "http://x", "https://example.com/a.png", "\ud7ff\ue000",
    ]
)
SCALARS = st.one_of(
    EDGE_SCALARS,
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=6)
    | st.dictionaries(st.text(max_size=12) | st.sampled_from(["id", "ids", "kind"]), inner,
                      max_size=6),
    max_leaves=30,
)


def json_object_with(fields: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects that mostly use ``fields`` (so the checks past the first are reached)."""
    return st.dictionaries(st.sampled_from(fields) | st.text(max_size=8), JSON, max_size=6)


# A WebSocket client by hand --------------------------------------------------------------

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    declared: int | None = None,
    wide: int | None = None,
) -> bytes:
    """One client frame: ``rsv`` the three reserved bits (0-7), ``declared`` a length to
    announce instead of the payload's, ``wide`` 2 or 8 to use a longer length form than
    needed (which RFC 6455 forbids: a server closes with 1002)."""
    length = len(payload) if declared is None else declared
    head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0xF)])
    mask_bit = 0x80 if masked else 0
    if wide == 8 or length > 0xFFFF:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", length)
    elif wide == 2 or length > 125:
        head += bytes([mask_bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([mask_bit | length])
    if not masked:
        return head + payload
    key = secrets.token_bytes(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


class RawWebSocket:
    """A client connection after a handshake done by hand: write any bytes, read the
    server's frames (never masked) with a deadline."""

    def __init__(self, node: Node, uid: int, role: str = "user", timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", node.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        self.sock.sendall(
            (
                f"GET /ws?token={node.token(uid, role=role)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.buffer = b""
        self.lenient = False  # True: skip text frames that are not JSON (fuzzed pushes)
        head = self._read_until(b"\r\n\r\n", time.monotonic() + timeout)
        assert head.startswith(b"HTTP/1.1 101"), head
        hello = self.next_frame()
        assert hello is not None and hello[0] == OP_TEXT, hello
        self.hello = json.loads(hello[1])

    def _fill(self, deadline: float) -> bool:
        """Read more; False at EOF (or a reset). Fails the test at the deadline."""
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail("the server neither answered nor closed in time")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            pytest.fail("the server neither answered nor closed in time")
        except ConnectionResetError:
            return False
        self.buffer += data
        return bool(data)

    def _read_until(self, marker: bytes, deadline: float) -> bytes:
        while marker not in self.buffer:
            if not self._fill(deadline):
                raise EOFError(self.buffer)
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def _take(self, n: int, deadline: float) -> bytes | None:
        while len(self.buffer) < n:
            if not self._fill(deadline):
                return None
        taken, self.buffer = self.buffer[:n], self.buffer[n:]
        return taken

    def next_frame(self, timeout: float = 5.0) -> tuple[int, bytes] | None:
        """(opcode, payload) of the server's next frame; None at EOF."""
        deadline = time.monotonic() + timeout
        head = self._take(2, deadline)
        if head is None:
            return None
        assert head[1] & 0x80 == 0, "the server masked a frame"
        length = head[1] & 0x7F
        if length >= 126:
            wide = self._take(2 if length == 126 else 8, deadline)
            if wide is None:
                return None
            length = int.from_bytes(wide, "big")
        payload = self._take(length, deadline)
        return None if payload is None else (head[0] & 0x0F, payload)

    def send(self, data: bytes) -> bool:
        """Write ``data``; False when the server has already closed the connection."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def request(self, action: str, data: Any = None, request_id: str = "fz") -> dict[str, Any]:
        """Send one request as a masked text frame; its reply (pushes in between skipped)."""
        body = json.dumps({"id": request_id, "action": action, "data": data or {}}).encode()
        assert self.send(frame(OP_TEXT, body)), "the server closed the connection"
        return self.reply(request_id)

    def reply(self, request_id: str | None) -> dict[str, Any]:
        while (value := self.next_reply())["id"] != request_id:
            pass
        return value

    def next_reply(self) -> dict[str, Any]:
        """The next reply frame (pushes and events before it skipped); fails the test if
        the server closes instead."""
        while True:
            got = self.next_frame()
            assert got is not None, "the server closed the connection"
            opcode, payload = got
            assert opcode != OP_CLOSE, f"closed: {close_code(payload)} {payload[2:]!r}"
            if opcode == OP_PING:  # the server's heartbeat
                self.send(frame(OP_PONG, payload))
            elif opcode == OP_TEXT:
                try:
                    value = json.loads(payload)
                except ValueError:
                    value = None
                if not isinstance(value, dict):  # no frame of PMQ's, a fuzzed push
                    assert self.lenient, f"not a JSON object: {payload[:200]!r}"
                    continue
                if value.get("type") == "reply":
                    return cast(dict[str, Any], value)

    def close_code(self, timeout: float = 5.0) -> int | None:
        """Read on to the server's close frame and the end of the connection: its code
        (None if it sent none). Pongs and replies before it are skipped."""
        code = None
        while (got := self.next_frame(timeout)) is not None:
            if got[0] == OP_CLOSE:
                code = close_code(got[1])
        return code

    def close(self) -> None:
        self.sock.close()


def close_code(payload: bytes) -> int | None:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None


def test_hand_built_frames_parse_as_websockets_reads_them() -> None:
    """The frame builder the fuzz targets rely on agrees with websockets' own parser."""
    from websockets.frames import Frame
    from websockets.streams import StreamReader

    for wide in (None, 2, 8):
        reader = StreamReader()
        reader.feed_data(frame(OP_TEXT, b"hello", wide=wide))
        parser = Frame.parse(reader.read_exact, mask=True)
        with pytest.raises(StopIteration) as done:
            next(parser)
        parsed = done.value.value
        assert (parsed.opcode, parsed.data, parsed.fin) == (OP_TEXT, b"hello", True)
