"""The ingest HTTP server over real sockets on 127.0.0.1: routing, limits, auth, keep-alive,
pipelining, errors and drain. Each test runs its own event loop with asyncio.run."""

from __future__ import annotations

import asyncio
import collections
import http.client
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import httptools
import orjson
import pytest
import uvloop

from pmq.reactor import httpconn
from pmq.reactor.http import (
    HttpError,
    HttpRequest,
    HttpResponse,
    Router,
    json_response,
)
from pmq.reactor.httpserver import HttpServer, start_http_server
from tests.helpers import wait_for_async

DEADLINE = 5.0
KEY = "s3cret"


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,  # what the socket workers run
}
loop_factory = LOOPS["uvloop"]


@pytest.fixture(autouse=True, params=sorted(LOOPS))
def each_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test on both event loops."""
    monkeypatch.setattr(sys.modules[__name__], "loop_factory", LOOPS[request.param])


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(asyncio.wait_for(test(), 4 * DEADLINE))


class Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""

    def json(self) -> Any:
        return orjson.loads(self.body)


class Client:
    """A raw connection: write bytes, read responses in order (parsed by httptools)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.parser = httptools.HttpResponseParser(self)
        self.done: collections.deque[Response] = collections.deque()
        self.current = Response()

    @classmethod
    async def connect(cls, server: HttpServer) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", server.port))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_message_complete(self) -> None:
        self.current.status = self.parser.get_status_code()
        self.done.append(self.current)
        self.current = Response()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self) -> Response:
        while not self.done:
            data = await asyncio.wait_for(self.reader.read(65536), DEADLINE)
            assert data, "connection closed before a response"
            self.parser.feed_data(data)
        return self.done.popleft()

    async def request(self, method: str, path: str, body: bytes = b"", **headers: str) -> Response:
        lines = [f"{method} {path} HTTP/1.1", "Host: test", f"Content-Length: {len(body)}"]
        lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
        await self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        return await self.response()

    async def dribble(self, data: bytes, interval: float) -> int:
        """Send ``data`` a byte every ``interval`` seconds until the server answers (or
        closes); return how many bytes had gone out by then. The answer is left for
        :meth:`response`."""
        answer = asyncio.ensure_future(self.reader.read(65536))
        for sent in range(len(data)):
            try:
                self.writer.write(data[sent : sent + 1])
                await self.writer.drain()
            except ConnectionResetError:  # closed between two bytes: closed() sees it
                return sent
            done, _ = await asyncio.wait([answer], timeout=interval)
            if done:
                # A server that closes with bytes of ours unread resets the connection:
                # that is an end like EOF, seen again by closed().
                if not isinstance(answer.exception(), ConnectionResetError):
                    self.parser.feed_data(answer.result())
                return sent + 1
        answer.cancel()
        return len(data)

    async def closed(self) -> bool:
        """True once the server has closed the connection (EOF or reset)."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), DEADLINE)
        except ConnectionResetError:
            return True
        return rest == b""

    def close(self) -> None:
        self.writer.close()


def make_router() -> Router:
    router = Router()

    async def user(request: HttpRequest, uid: str) -> HttpResponse:
        return json_response(200, {"uid": uid, "query": request.query})

    async def kick(request: HttpRequest, uid: str) -> HttpResponse:
        return json_response(200, {"kicked": uid, "body": request.json()})

    async def echo_json(request: HttpRequest) -> HttpResponse:
        return json_response(202, {"got": request.json()})

    async def echo_form(request: HttpRequest) -> HttpResponse:
        return json_response(200, {"form": request.form()})

    async def refuse(request: HttpRequest) -> HttpResponse:
        raise HttpError(409, "duplicate id")

    async def boom(request: HttpRequest) -> HttpResponse:
        raise RuntimeError("handler bug")

    async def health(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, b"ok", "text/plain")

    router.add("GET", "/api/v1/users/{uid}", user)
    router.add("POST", "/api/v1/users/{uid}/kick", kick)
    router.add("POST", "/api/v1/messages", echo_json)
    router.add("POST", "/api/comment/message", echo_form)
    router.add("POST", "/refuse", refuse)
    router.add("GET", "/boom", boom)
    router.add("GET", "/healthz", health, public=True)
    return router


def add_slow(router: Router, release: asyncio.Event) -> None:
    """GET /slow on ``router``: answered 200 once ``release`` is set."""

    async def slow(request: HttpRequest) -> HttpResponse:
        await release.wait()
        return json_response(200, {"slow": True})

    router.add("GET", "/slow", slow)


def begun(server: HttpServer) -> bool:
    """Whether a connection of ``server`` is receiving a request it has not had in full."""
    return any(c.started is not None for c in server.connections)


async def serve(router: Router | None = None, api_key: str = "", **limits: Any) -> HttpServer:
    return await start_http_server(
        router or make_router(), "127.0.0.1", 0, max_body=1024, api_key=api_key, **limits
    )


def test_routing_with_params_and_query() -> None:
    async def main() -> None:
        server = await serve()
        client = await Client.connect(server)
        reply = await client.request("GET", "/api/v1/users/a%20b?x=1&x=2&y=")
        assert reply.status == 200
        assert reply.headers["content-type"] == "application/json"
        assert reply.json() == {
            "code": 200,
            "msg": "OK",
            "data": {"uid": "a b", "query": {"x": "1", "y": ""}},
        }
        reply = await client.request("POST", "/api/v1/users/42/kick", b'{"reason": "logout"}')
        assert reply.json()["data"] == {"kicked": "42", "body": {"reason": "logout"}}
        reply = await client.request("GET", "/healthz")
        assert (reply.status, reply.body, reply.headers["content-type"]) == (
            200,
            b"ok",
            "text/plain",
        )
        client.close()
        await server.drain(DEADLINE)

    run(main)


def test_not_found_and_method_not_allowed() -> None:
    async def main() -> None:
        server = await serve()
        client = await Client.connect(server)
        reply = await client.request("GET", "/api/v1/nothing")
        assert reply.status == 404
        assert reply.json() == {"code": 404, "msg": "Not Found", "data": {}}
        reply = await client.request("DELETE", "/api/v1/users/7")
        assert reply.status == 405
        assert reply.headers["allow"] == "GET"
        assert reply.json()["code"] == 405
        reply = await client.request("GET", "/api/v1/users/7/kick")  # keep-alive after errors
        assert (reply.status, reply.headers["allow"]) == (405, "POST")
        client.close()
        await server.drain(DEADLINE)

    run(main)


def test_json_body() -> None:
    async def main() -> None:
        server = await serve()
        client = await Client.connect(server)
        reply = await client.request(
            "POST", "/api/v1/messages", b'{"to": [1, 2], "kind": "comment"}'
        )
        assert reply.status == 202
        assert reply.json() == {
            "code": 202,
            "msg": "Accepted",
            "data": {"got": {"to": [1, 2], "kind": "comment"}},
        }
        reply = await client.request("POST", "/api/v1/messages", b"{not json")
        assert reply.json() == {"code": 400, "msg": "body is not valid JSON", "data": {}}
        reply = await client.request("POST", "/api/v1/messages")
        assert reply.status == 400
        reply = await client.request("POST", "/refuse")
        assert reply.json() == {"code": 409, "msg": "duplicate id", "data": {}}
        client.close()
        await server.drain(DEADLINE)

    run(main)


def test_form_body() -> None:
    async def main() -> None:
        server = await serve()
        client = await Client.connect(server)
        body = b"uid=7&msg=%7B%22comment_uid%22%3A%209%7D&uid=8"
        reply = await client.request(
            "POST", "/api/comment/message", body, Content_Type="application/x-www-form-urlencoded"
        )
        assert reply.json()["data"] == {"form": {"uid": "7", "msg": '{"comment_uid": 9}'}}
        client.close()
        await server.drain(DEADLINE)

    run(main)


def test_oversize_content_length_is_413_and_closes() -> None:
    async def main() -> None:
        server = await serve()
        client = await Client.connect(server)
        # Only the head is sent: the server must refuse before reading any body.
        await client.send(
            b"POST /api/v1/messages HTTP/1.1\r\nHost: t\r\nContent-Length: 1025\r\n\r\n"
        )
        reply = await client.response()
        assert reply.status == 413
        assert reply.headers["connection"] == "close"
        assert reply.json()["code"] == 413
        assert await client.closed()
        await server.drain(DEADLINE)

    run(main)


def test_oversize_chunked_body_is_413() -> None:
    async def main() -> None:
        server = await serve()
        client = await Client.connect(server)
        chunk = b"x" * 600
        head = b"POST /api/v1/messages HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        await client.send(
            head + b"258\r\n" + chunk + b"\r\n" + b"258\r\n" + chunk + b"\r\n0\r\n\r\n"
        )
        reply = await client.response()
        assert (reply.status, reply.headers["connection"]) == (413, "close")
        assert await client.closed()
        assert server.in_flight == 0
        # A chunked body under the limit is served.
        client = await Client.connect(server)
        await client.send(head + b"2\r\n{}\r\n0\r\n\r\n")
        reply = await client.response()
        assert reply.json()["data"] == {"got": {}}
        client.close()
        await server.drain(DEADLINE)

    run(main)


def test_malformed_request_is_400_and_closes() -> None:
    async def main() -> None:
        server = await serve()
        client = await Client.connect(server)
        await client.send(b"GET /healthz HTTP/1.1\r\nBad Header Line\r\n\r\n")
        reply = await client.response()
        assert (reply.status, reply.headers["connection"]) == (400, "close")
        assert await client.closed()
        await server.drain(DEADLINE)

    run(main)


def test_oversize_head_is_431() -> None:
    async def main() -> None:
        server = await serve()
        client = await Client.connect(server)
        await client.send(b"GET /healthz HTTP/1.1\r\n")
        line = b"X-Pad: " + b"p" * 1000 + b"\r\n"
        # The server counts head bytes per read; 1 MiB is well over MAX_HEAD plus one read.
        for _ in range(16):
            await client.send(line * 64)
        reply = await client.response()
        assert reply.status == 431
        client.close()
        await server.drain(DEADLINE)

    run(main)


def test_api_key() -> None:
    async def main() -> None:
        server = await serve(api_key=KEY)
        client = await Client.connect(server)
        reply = await client.request("GET", "/api/v1/users/1")
        assert (reply.status, reply.json()["code"]) == (401, 401)
        assert reply.headers["www-authenticate"] == "Bearer"
        reply = await client.request("GET", "/api/v1/users/1", Authorization="Bearer wrong")
        assert reply.status == 401
        reply = await client.request("GET", "/api/v1/users/1", Authorization=f"Bearer {KEY}")
        assert reply.status == 200
        reply = await client.request("GET", "/healthz")
        assert reply.status == 200
        client.close()
        await server.drain(DEADLINE)

    run(main)


def test_keep_alive_with_http_client() -> None:
    async def main() -> None:
        server = await serve()

        def two_requests() -> list[tuple[int, Any, str | None]]:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=DEADLINE)
            results = []
            conn.request("GET", "/api/v1/users/1")
            first_sock = conn.sock
            reply = conn.getresponse()
            results.append(
                (reply.status, orjson.loads(reply.read()), reply.getheader("connection"))
            )
            conn.request("POST", "/api/v1/messages", body=b'{"a": 1}')
            assert conn.sock is first_sock  # the same connection was reused
            reply = conn.getresponse()
            results.append(
                (reply.status, orjson.loads(reply.read()), reply.getheader("connection"))
            )
            conn.close()
            return results

        results = await asyncio.to_thread(two_requests)
        assert [(s, c) for s, _, c in results] == [(200, "keep-alive"), (202, "keep-alive")]
        assert results[1][1]["data"] == {"got": {"a": 1}}
        await server.drain(DEADLINE)

    run(main)


def test_http_10_closes_unless_keep_alive_asked() -> None:
    async def main() -> None:
        server = await serve()
        client = await Client.connect(server)
        await client.send(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        reply = await client.response()
        assert (reply.status, reply.headers["connection"]) == (200, "keep-alive")
        await client.send(b"GET /healthz HTTP/1.0\r\n\r\n")
        reply = await client.response()
        assert (reply.status, reply.headers["connection"]) == (200, "close")
        assert await client.closed()
        await server.drain(DEADLINE)

    run(main)


def test_pipelined_requests_are_answered_in_order() -> None:
    async def main() -> None:
        release = asyncio.Event()
        started: list[str] = []
        router = Router()

        async def slow(request: HttpRequest) -> HttpResponse:
            started.append("slow")
            await release.wait()
            return json_response(200, {"n": "slow"})

        async def fast(request: HttpRequest, n: str) -> HttpResponse:
            started.append(n)
            return json_response(200, {"n": n})

        router.add("GET", "/slow", slow)
        router.add("GET", "/fast/{n}", fast)
        server = await serve(router)
        client = await Client.connect(server)
        get = "GET {} HTTP/1.1\r\nHost: t\r\n\r\n"
        await client.send(
            "".join(get.format(p) for p in ("/slow", "/fast/1", "/x", "/fast/2")).encode()
        )
        await wait_for_async(
            lambda: server.in_flight == 4 and bool(started), DEADLINE, "four in flight, one started"
        )
        assert started == ["slow"]  # the rest wait their turn
        release.set()
        replies = [await client.response() for _ in range(4)]
        assert [r.status for r in replies] == [200, 200, 404, 200]
        assert [r.json()["data"].get("n") for r in replies] == ["slow", "1", None, "2"]
        assert started == ["slow", "1", "2"]
        await wait_for_async(lambda: server.in_flight == 0, DEADLINE, "no request in flight")
        client.close()
        await server.drain(DEADLINE)

    run(main)


def test_many_pipelined_requests_in_one_write() -> None:
    async def main() -> None:
        server = await serve()
        client = await Client.connect(server)
        count = 10 * httpconn.MAX_PIPELINE  # reading pauses and resumes on the way
        get = "GET /api/v1/users/{} HTTP/1.1\r\nHost: t\r\n\r\n"
        await client.send("".join(get.format(i) for i in range(count)).encode())
        for i in range(count):
            reply = await client.response()
            assert reply.json()["data"]["uid"] == str(i)
        await wait_for_async(lambda: server.in_flight == 0, DEADLINE, "no request in flight")
        client.close()
        await server.drain(DEADLINE)

    run(main)


def test_handler_exception_is_500_and_server_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        server = await serve()
        client = await Client.connect(server)
        with caplog.at_level(logging.ERROR, logger="pmq.reactor.httpconn"):
            reply = await client.request("GET", "/boom")
        assert reply.json() == {"code": 500, "msg": "internal error", "data": {}}
        assert reply.headers["connection"] == "keep-alive"
        reply = await client.request("GET", "/api/v1/users/3")
        assert reply.status == 200
        client.close()
        await server.drain(DEADLINE)

    run(main)
    [record] = [r for r in caplog.records if r.name == "pmq.reactor.httpconn"]
    assert "GET /boom" in record.getMessage()
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)


def test_expect_100_continue() -> None:
    async def main() -> None:
        server = await serve()
        client = await Client.connect(server)
        await client.send(
            b"POST /api/v1/messages HTTP/1.1\r\nHost: t\r\nContent-Length: 8\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        interim = await client.response()
        assert interim.status == 100
        await client.send(b'{"a": 1}')
        reply = await client.response()
        assert reply.json()["data"] == {"got": {"a": 1}}
        # Too large: refused at once with 413 instead of 100.
        await client.send(
            b"POST /api/v1/messages HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        reply = await client.response()
        assert reply.status == 413
        await server.drain(DEADLINE)

    run(main)


def test_drain_waits_for_in_flight_request() -> None:
    async def main() -> None:
        release = asyncio.Event()
        router = Router()

        add_slow(router, release)
        server = await serve(router)
        busy, idle = await Client.connect(server), await Client.connect(server)
        await busy.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        await wait_for_async(
            lambda: server.in_flight == 1 and len(server.connections) == 2,
            DEADLINE,
            "one in flight, two connections",
        )
        drain = asyncio.create_task(server.drain(DEADLINE))
        assert await idle.closed()  # idle keep-alive connections go at once
        assert not drain.done()
        with pytest.raises(OSError):  # no longer accepting
            await Client.connect(server)
        release.set()
        reply = await busy.response()
        assert (reply.status, reply.headers["connection"]) == (200, "close")
        assert await drain == 0
        assert await busy.closed()
        assert server.in_flight == 0

    run(main)


def test_drain_answers_a_request_partly_received_once_the_rest_is_in() -> None:
    """SPEC 1: a graceful stop finishes in-flight ingest requests. One whose head and part
    of whose body were in when the drain began is read to its end and answered (it used to
    be dropped without an answer); what comes after it is not read."""

    async def main() -> None:
        server = await serve()
        client = await Client.connect(server)
        body = b'{"to": 1, "kind": "notice", "body": {}}'
        head = b"POST /api/v1/messages HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
        await client.send(head % len(body) + body[:10])
        await wait_for_async(lambda: begun(server), DEADLINE, "the request begun")
        drain = asyncio.create_task(server.drain(DEADLINE))
        await asyncio.sleep(0)
        assert not drain.done()
        await client.send(body[10:])
        reply = await client.response()
        assert (reply.status, reply.headers["connection"]) == (202, "close")
        assert reply.json()["data"] == {"got": orjson.loads(body)}
        assert await drain == 0
        assert await client.closed()

    run(main)


def test_drain_answers_a_request_partly_received_behind_one_being_answered() -> None:
    """The partial request may follow one still running on the same connection: the
    running one's reply keeps the connection open for it, and it is answered too."""

    async def main() -> None:
        release = asyncio.Event()
        router = make_router()

        add_slow(router, release)
        server = await serve(router)
        client = await Client.connect(server)
        body = b'{"n": 1}'
        second = b"POST /api/v1/messages HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)
        await client.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n" + second + body[:3])
        await wait_for_async(
            lambda: server.in_flight == 1 and begun(server),
            DEADLINE,
            "one running, one begun",
        )
        drain = asyncio.create_task(server.drain(DEADLINE))
        await asyncio.sleep(0)
        release.set()
        first = await client.response()
        assert (first.status, first.headers["connection"]) == (200, "keep-alive")
        await client.send(body[3:])
        reply = await client.response()
        assert (reply.status, reply.headers["connection"]) == (202, "close")
        assert await drain == 0
        assert await client.closed()

    run(main)


def test_drain_counts_a_request_whose_rest_never_comes() -> None:
    async def main() -> None:
        server = await serve()
        client = await Client.connect(server)
        await client.send(b"POST /api/v1/messages HTTP/1.1\r\nContent-Length: 9\r\n\r\n{")
        await wait_for_async(lambda: begun(server), DEADLINE, "the request begun")
        assert await server.drain(0.1) == 1
        assert server.in_flight == 0
        assert await client.closed()

    run(main)


def test_drain_deadline_cancels_and_counts() -> None:
    async def main() -> None:
        cancelled = asyncio.Event()
        router = Router()

        async def stuck(request: HttpRequest) -> HttpResponse:
            try:
                await asyncio.Event().wait()
            finally:
                cancelled.set()
            raise AssertionError("unreachable")

        router.add("GET", "/stuck", stuck)
        server = await serve(router)
        client = await Client.connect(server)
        await client.send(b"GET /stuck HTTP/1.1\r\nHost: t\r\n\r\n")
        await wait_for_async(lambda: server.in_flight == 1, DEADLINE, "one request in flight")
        assert await server.drain(0.05) == 1
        assert cancelled.is_set()
        assert server.in_flight == 0
        assert await client.closed()
        server.close()  # idempotent

    run(main)


def test_idle_keep_alive_connection_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpconn, "KEEPALIVE_TIMEOUT", 0.05)

    async def main() -> None:
        server = await serve()
        client = await Client.connect(server)
        reply = await client.request("GET", "/healthz")
        assert reply.status == 200
        assert await client.closed()
        await server.drain(DEADLINE)

    run(main)


def test_router_rejects_bad_patterns() -> None:
    async def handler(request: HttpRequest) -> HttpResponse:
        return json_response(200)

    router = Router()
    router.add("GET", "/a/{x}", handler)
    with pytest.raises(ValueError):
        router.add("get", "/a/{x}", handler)
    with pytest.raises(ValueError):
        router.add("GET", "/a/b{x}", handler)
    with pytest.raises(ValueError):
        router.add("GET", "no-slash", handler)
    assert router.match("/a/1%2F2") == (router.match("/a/q")[0], {"x": "1/2"})  # type: ignore[index]
    assert router.match("/a/1/2") is None


SLOW_HEAD = b"POST /api/v1/messages HTTP/1.1\r\nHost: t\r\n" + b"X-Pad: " + b"p" * 500
TIMEOUT = 0.3  # request_timeout of the tests below


CODINGS = ["gzip, chunked", "identity", "gzip", "x-unknown", "chunked, gzip", "chunked, chunked"]


@pytest.mark.parametrize("coding", CODINGS)
def test_transfer_encoding_other_than_chunked_is_501(coding: str) -> None:
    async def main() -> None:
        server = await serve()
        client = await Client.connect(server)
        await client.send(
            b"POST /api/v1/messages HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: "
            + coding.encode()
            + b"\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
        )
        reply = await client.response()
        assert (reply.status, reply.headers["connection"]) == (501, "close")
        assert reply.json()["code"] == 501
        assert "chunked" in reply.json()["msg"]
        assert await client.closed()
        await server.drain(DEADLINE)

    run(main)


def test_chunked_in_any_case_is_served_and_smuggling_is_400() -> None:
    async def main() -> None:
        server = await serve()
        client = await Client.connect(server)
        head = b"POST /api/v1/messages HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: Chunked\r\n"
        await client.send(head + b"\r\n2\r\n{}\r\n0\r\n\r\n")
        assert (await client.response()).status == 202
        await client.send(head + b"Content-Length: 3\r\n\r\n{}\n")  # both: not a 501
        assert (await client.response()).status == 400
        await server.drain(DEADLINE)

    run(main)


def test_slow_request_head_is_408_and_closes() -> None:
    async def main() -> None:
        server = await serve(request_timeout=TIMEOUT)
        client = await Client.connect(server)
        sent = await client.dribble(SLOW_HEAD, TIMEOUT / 10)
        assert sent < len(SLOW_HEAD)  # answered before the head was in
        reply = await client.response()
        assert (reply.status, reply.headers["connection"]) == (408, "close")
        assert reply.json()["code"] == 408
        assert await client.closed()
        assert server.timed_out == 1
        await server.drain(DEADLINE)

    run(main)


def test_slow_request_body_is_408() -> None:
    async def main() -> None:
        server = await serve(request_timeout=TIMEOUT)
        client = await Client.connect(server)
        await client.send(
            b"POST /api/v1/messages HTTP/1.1\r\nHost: t\r\nContent-Length: 900\r\n\r\n"
        )
        body = b"[" + b"1," * 449
        sent = await client.dribble(body, TIMEOUT / 10)
        assert sent < len(body)
        reply = await client.response()
        assert (reply.status, reply.headers["connection"]) == (408, "close")
        assert await client.closed()
        assert server.in_flight == 0
        await server.drain(DEADLINE)

    run(main)


def test_blank_lines_do_not_keep_a_new_connection_open() -> None:
    async def main() -> None:
        server = await serve(request_timeout=TIMEOUT)
        client = await Client.connect(server)
        sent = await client.dribble(b"\r\n" * 200, TIMEOUT / 10)  # no request ever begins
        assert sent < 400
        assert not client.done and client.parser.get_status_code() == 0  # no reply
        assert await client.closed()
        silent = await Client.connect(server)  # sends nothing at all: closed, no reply
        assert await silent.closed()
        assert server.timed_out == 0
        await server.drain(DEADLINE)

    run(main)


def test_408_waits_for_the_replies_owed_before_it() -> None:
    async def main() -> None:
        release = asyncio.Event()
        router = make_router()

        add_slow(router, release)
        server = await serve(router, request_timeout=TIMEOUT)
        client = await Client.connect(server)
        await client.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\nGET /heal")  # and stall
        await wait_for_async(lambda: server.timed_out == 1, DEADLINE, "a timed-out request")
        release.set()
        first, second = await client.response(), await client.response()
        assert (first.status, first.headers["connection"]) == (200, "keep-alive")
        assert (second.status, second.headers["connection"]) == (408, "close")
        assert await client.closed()
        await server.drain(DEADLINE)

    run(main)


def test_keep_alive_connection_outlives_request_timeout() -> None:
    async def main() -> None:
        server = await serve(request_timeout=TIMEOUT)
        client = await Client.connect(server)
        assert (await client.request("GET", "/healthz")).status == 200
        await asyncio.sleep(3 * TIMEOUT)  # idle between requests: KEEPALIVE_TIMEOUT applies
        assert (await client.request("GET", "/healthz")).status == 200
        get = b"GET /api/v1/users/%d HTTP/1.1\r\nHost: t\r\n\r\n"
        await client.send(get % 1 + get % 2)  # pipelining still works
        assert [(await client.response()).json()["data"]["uid"] for _ in range(2)] == ["1", "2"]
        client.close()
        await server.drain(DEADLINE)

    run(main)


def test_connections_over_max_connections_are_answered_503() -> None:
    async def main() -> None:
        server = await serve(max_connections=2)
        first, second = await Client.connect(server), await Client.connect(server)
        for client in (first, second):
            assert (await client.request("GET", "/healthz")).status == 200
        extra = await Client.connect(server)
        reply = await extra.response()  # answered at once, without a request
        assert (reply.status, reply.headers["connection"]) == (503, "close")
        assert reply.headers["retry-after"] == "1"
        assert reply.json()["code"] == 503
        assert await extra.closed()
        assert (server.served, server.refused) == (2, 1)
        assert (await first.request("GET", "/healthz")).status == 200  # served ones carry on
        second.close()
        await wait_for_async(lambda: server.served == 1, DEADLINE, "one connection served")
        third = await Client.connect(server)
        assert (await third.request("GET", "/healthz")).status == 200
        first.close()
        third.close()
        await server.drain(DEADLINE)

    run(main)
