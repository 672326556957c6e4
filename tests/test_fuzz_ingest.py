"""Fuzzing of the ingest HTTP server (pmq.reactor.httpserver, httpconn).

In process, a connection is fed a stream of valid pipelined requests, whole and cut at
random points into reads: the answers are the same, and each echoes what was sent. Over a
real node's ingest port, malformed requests of every kind (heads, targets, header bytes,
Content-Length and Transfer-Encoding together, chunk sizes, bodies) are answered with a
4xx/5xx that is never 500, within a deadline, and the workers live on with a clean log.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, urlencode

import pytest
import uvloop
from hypothesis import example, given
from hypothesis import strategies as st

from pmq.reactor.http import HttpRequest, HttpResponse, Router, json_response
from pmq.reactor.httpconn import HttpConnection
from pmq.reactor.httpserver import HttpServer
from tests.helpers import Node, wait_for_async
from tests.test_fuzz_kit import budget, fuzz_node, tally, unharmed

# In process: one connection, its reads cut at random --------------------------------------

METHODS = ("GET", "POST", "PUT", "DELETE")


def echo_router() -> Router:
    async def echo(request: HttpRequest, **params: str) -> HttpResponse:
        headers = {k: v for k, v in request.headers.items() if k.startswith("x-fuzz-")}
        return json_response(
            200,
            {"method": request.method, "path": request.path, "query": request.query,
             "params": params, "headers": headers, "body": request.body.hex()},
        )

    router = Router()
    for method in METHODS:
        router.add(method, "/echo", echo)
        router.add(method, "/echo/{name}", echo)
    return router


class Transport(asyncio.Transport):
    """What the connection writes, kept; ``ended`` once it closed or half-closed."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = self.ended = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = self.ended = True

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.ended = True


HEADER_VALUE = st.from_regex(r"[!-~]([ -~]{0,30}[!-~])?", fullmatch=True)


@st.composite
def valid_request(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    """A valid request and the echo it must get."""
    method = draw(st.sampled_from(METHODS))
    name = draw(st.none() | st.text(min_size=1, max_size=8))
    path = "/echo" if name is None else "/echo/" + quote(name, safe="")
    query = draw(st.dictionaries(st.from_regex(r"[a-z]{1,5}", fullmatch=True),
                                 st.text(max_size=8), max_size=3))
    target = path + ("?" + urlencode(query) if query else "")
    headers = draw(st.dictionaries(st.from_regex(r"x-fuzz-[a-z0-9]{1,6}", fullmatch=True),
                                   HEADER_VALUE, max_size=4))
    body = draw(st.binary(max_size=300)) if method in ("POST", "PUT") else b""
    lines = [f"{method} {target} HTTP/1.1", "Host: x"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body and draw(st.booleans()):
        lines.append("Transfer-Encoding: " + draw(st.sampled_from(["chunked", "Chunked"])))
        sizes = draw(st.lists(st.integers(1, 64), max_size=8))
        chunks, at = [], 0
        for size in [*sizes, len(body)]:
            piece, at = body[at : at + size], at + size
            if piece:
                size_text = draw(st.sampled_from(["%x", "%X", "%04x"])) % len(piece)
                chunks.append(size_text.encode() + b"\r\n" + piece + b"\r\n")
        encoded = b"".join(chunks) + b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
        encoded = body
    wire = ("\r\n".join(lines) + "\r\n\r\n").encode() + encoded
    echo = {"method": method, "path": path, "query": query,
            "params": {} if name is None else {"name": name}, "headers": headers,
            "body": body.hex()}
    return wire, echo


def final_responses(data: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in ``data`` but interim 100s, which may or may not
    go out depending on when a body's head is read."""
    found = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status == 100:
            continue
        length = content_length(head)
        found.append((status, data[:length]))
        data = data[length:]
    return found


def content_length(head: bytes) -> int:
    return int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])


async def serve(stream: bytes, cuts: list[int]) -> tuple[bytes, bool]:
    """Feed ``stream`` to one connection in reads cut at ``cuts``, letting the loop run
    between them; what it wrote once it owes nothing, and whether it stopped writing."""
    server = HttpServer(echo_router(), max_body=1024)
    conn = HttpConnection(server)
    transport = Transport()
    conn.connection_made(transport)
    try:
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            conn.data_received(stream[start:end])
            await asyncio.sleep(0)
        await wait_for_async(
            lambda: conn.task is None and not conn.queue, 5, "every request answered", interval=0
        )
        return bytes(transport.written), transport.ended
    finally:
        conn.connection_lost(None)


def run(coro: Any) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


@st.composite
def pipeline_with_cuts(draw: st.DrawFn) -> tuple[list[tuple[bytes, dict[str, Any]]], bytes,
                                                 list[int]]:
    requests = draw(st.lists(valid_request(), min_size=1, max_size=5))
    tail = draw(
        st.sampled_from([b"", b"BOGUS\r\n\r\n",
                         b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"]))
    stream = b"".join(wire for wire, _ in requests) + tail
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=40)))
    return requests, stream, [c for c in cuts if c < len(stream)]


@budget(1.0)
@given(pipeline_with_cuts())
def test_pipelined_requests_cut_anywhere_get_the_same_answers(
    case: tuple[list[tuple[bytes, dict[str, Any]]], bytes, list[int]],
) -> None:
    tally("ingest: pipelining and split reads")
    requests, stream, cuts = case
    whole, whole_ended = run(serve(stream, []))
    split, split_ended = run(serve(stream, cuts))
    one_by_one, _ = run(serve(stream, list(range(1, len(stream)))))
    assert final_responses(split) == final_responses(whole) == final_responses(one_by_one)
    assert split_ended == whole_ended
    answers = final_responses(whole)
    for (status, body), (_, echo) in zip(answers, requests, strict=False):
        assert status == 200, body
        assert json.loads(body)["data"] == echo
    rejected = len(stream) > sum(len(wire) for wire, _ in requests)
    assert len(answers) == len(requests) + rejected
    if rejected:
        assert answers[-1][0] == 400 and whole_ended


# Over a real node's ingest port: malformed requests -------------------------------------

REQUEST_TIMEOUT = 0.5  # ingest.request_timeout of the fuzzed node: a truncated request's 408
API_KEY = "fuzz-" + "k3y" * 8  # every base request carries it: routes are reached, and the
HOST = b"Host: x\r\nAuthorization: Bearer " + API_KEY.encode()  # key check is fuzzed too



def with_length(head: bytes, body: bytes) -> bytes:
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def chunked(head: bytes, *chunks: bytes) -> bytes:
    return head + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(
        b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in (*chunks, b"")
    )


BASES = [
    with_length(b"POST /api/v1/messages HTTP/1.1\r\n" + HOST
                + b"\r\nContent-Type: application/json\r\n",
                b'{"to": 7, "kind": "comment", "body": {"t": "hi"}}'),
    b"GET /api/v1/users/7 HTTP/1.1\r\n" + HOST + b"\r\n\r\n",
    chunked(b"POST /api/comment/message HTTP/1.1\r\n" + HOST + b"\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n",
            b"uid=7&msg={", b'"comment_uid": 8, "x": 1}'),
    with_length(b"POST /api/v1/users/7/kick HTTP/1.1\r\n" + HOST + b"\r\n", b"{}"),
    b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n\r\n",
]
HEADER_LINES = st.sampled_from(
    [
        b"Content-Length: -1", b"Content-Length: abc", b"Content-Length: 1e3",
        b"Content-Length: +5", b"Content-Length: 0x10", b"Content-Length: ",
        b"Content-Length: 99999999999999999999", b"Content-Length: 5\r\nContent-Length: 6",
        b"Content-Length: 70000", b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip",
        b"Transfer-Encoding: chunked, gzip", b"Transfer-Encoding: gzip, chunked",
        b"Transfer-Encoding: identity", b"Transfer-Encoding:  chunked",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked", b"Expect: 100-continue",
        b"Expect: 100-continue-x", b"Connection: upgrade\r\nUpgrade: websocket",
        b"X-A: b\r\n  folded", b"X\x00A: b", b"X-A: b\x00c", b"X-A: \xff\xfe", b"\xc3\xa9: v",
        b"No colon here", b": empty name", b"X-A:\tb", b"Authorization: Bearer \xff",
        b"Host: \xff", b"X-Long: " + b"v" * 70000,
    ]
) | st.binary(max_size=40)
CHUNK_SIZES = st.sampled_from(
    [b"zz", b"-1", b"FFFFFFFFFFFFFFFFFF", b"1;ext=1", b"0x5", b"5 ", b"", b"10000", b"\xff"]
)


@st.composite
def malformed_request(draw: st.DrawFn) -> bytes:
    """A request to a real route, then one to three corruptions of it."""
    data = draw(st.sampled_from(BASES))
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.integers(0, 8))
        head, _, body = data.partition(b"\r\n\r\n")
        line, _, rest = head.partition(b"\r\n")
        method, _, after = line.partition(b" ")
        target, _, version = after.partition(b" ")
        if how == 0:
            method = draw(st.sampled_from([b"GOT", b"get", b"", b"P\xffST", b"PRI", b"CONNECT",
                                           b"OPTIONS"]) | st.binary(max_size=8))
        elif how == 1:
            target = draw(st.sampled_from([b"*", b"http://x/healthz", b"/a b", b"/%", b"/%zz",
                                           b"/api/v1/users/%ff", b"/\xff", b"", b"/?" + b"a" * 9000,
                                           b"/api/v1/users/" + b"9" * 5000])
                          | st.binary(max_size=20))
        elif how == 2:
            version = draw(st.sampled_from([b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b"HTTP/9.9",
                                            b"http/1.1", b""]))
        elif how == 3:
            rest += b"\r\n" + draw(HEADER_LINES)
        elif how == 4:
            size = draw(CHUNK_SIZES)
            head = head.replace(b"Content-Length", b"X-Was-Length")
            rest += b"\r\nTransfer-Encoding: chunked"
            body = size + b"\r\n" + draw(st.binary(max_size=20)) + b"\r\n0\r\n\r\n"
        elif how == 5:
            data = data.replace(b"\r\n", b"\n")
            continue
        elif how == 6:
            at = draw(st.integers(0, len(data)))
            data = data[:at] + draw(st.binary(min_size=1, max_size=12)) + data[at:]
            continue
        elif how == 7:
            body = draw(st.binary(max_size=60))
        else:
            at = draw(st.integers(0, len(data)))
            data = data[:at] + data[at + draw(st.integers(1, 8)):]
            continue
        line = b" ".join(part for part in (method, target, version) if part)
        data = line + b"\r\n" + rest + b"\r\n\r\n" + body
    return data


def responses(sock: socket.socket, deadline: float) -> Iterator[tuple[int, bytes, bytes]]:
    """(status, head, body) of every response until the server closes; fails the test
    at ``deadline`` (a hang)."""
    data = b""

    def fill() -> bool:
        nonlocal data
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no answer and no close before the deadline; got {data[:300]!r}")
        sock.settimeout(left)
        try:
            more = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"no answer and no close before the deadline; got {data[:300]!r}")
        except ConnectionResetError:
            more = b""
        data += more
        return bool(more)

    while True:
        while b"\r\n\r\n" not in data:
            if not fill():
                assert not data, f"a cut-off answer: {data!r}"
                return
        head, _, data = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0 if status == 100 else content_length(head)
        while len(data) < length:
            assert fill(), f"a cut-off answer: {head!r}"
        body, data = data[:length], data[length:]
        yield status, head, body


def exchange(node: Node, data: bytes, half_close: bool = True) -> list[tuple[int, bytes, bytes]]:
    with socket.create_connection(("127.0.0.1", node.ingest_port), timeout=5) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:  # reset (or, for shutdown, no longer connected): the server closed
            pass  # after answering, before all was sent; its answer is still there to read
        return list(responses(sock, time.monotonic() + 10 + REQUEST_TIMEOUT))


def check_answers(answers: list[tuple[int, bytes, bytes]]) -> None:
    for status, head, body in answers:
        assert status != 500, (head, body)
        if status != 100:
            assert json.loads(body)["code"] == status, (head, body)


@pytest.fixture
def ingest_node(make_node: Callable[..., Node]) -> Node:
    return fuzz_node(make_node, ingest={"request_timeout": REQUEST_TIMEOUT, "api_key": API_KEY})


def test_malformed_requests_get_a_4xx_or_5xx_never_500(ingest_node: Node) -> None:
    @budget(1.0)
    @given(malformed_request())
    @example(chunked(b"GET /healthz HTTP/1.1\r\nContent-Length: 3\r\n"))  # smuggling
    @example(b"POST /api/v1/messages HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    def check(data: bytes) -> None:
        tally("ingest: malformed requests")
        answers = exchange(ingest_node, data)
        check_answers(answers)
        final = [status for status, _, _ in answers if status != 100]
        # Nothing at all only for a request the client's close cut short (no byte of it
        # was wrong yet): that one cannot be answered.
        if final:
            assert all(100 < s < 600 for s in final)

    with unharmed(ingest_node):
        check()


@st.composite
def truncated_request(draw: st.DrawFn) -> bytes:
    data = draw(st.sampled_from(BASES))
    return data[: draw(st.integers(1, len(data) - 1))]


def test_truncated_requests_are_answered_408(ingest_node: Node) -> None:
    """A request cut short, the connection left open: 408 after ingest.request_timeout."""

    @budget(0.1, long_share=0.04)
    @given(truncated_request())
    def check(data: bytes) -> None:
        tally("ingest: truncated requests")
        answers = exchange(ingest_node, data, half_close=False)
        assert [status for status, _, _ in answers if status != 100] == [408], answers

    with unharmed(ingest_node):
        check()
