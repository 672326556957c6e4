"""Ingest HTTP values: requests, responses and the router, with no sockets.

A :class:`Router` maps ``(method, path)`` to ``async def handler(request, **params) ->
HttpResponse`` functions; a handler reads an :class:`HttpRequest` and returns an
:class:`HttpResponse` (:func:`json_response` for the ingest reply shape ``{"code", "msg",
"data"}``), or raises :class:`HttpError` to answer a status with a message.
:func:`encode_response` turns a response into the bytes on the wire.

The server around them lives in pmq.reactor.httpserver (listening, routing refusals, the
API key, drain) and pmq.reactor.httpconn (one connection: parsing, pipelining, timeouts).
"""

from __future__ import annotations

import dataclasses
import functools
import http
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, unquote

import httptools
import orjson

from pmq.wire.client import MESSAGES

REASONS: dict[int, str] = {s.value: s.phrase for s in http.HTTPStatus} | {
    int(code): text for code, text in MESSAGES.items()
}

Handler = Callable[..., Awaitable["HttpResponse"]]
Methods = dict[str, tuple[Handler, bool]]  # method -> (handler, public)


class HttpError(Exception):
    """Raise from a handler (or ``HttpRequest.json``/``form``) to answer ``status`` with ``msg``."""

    def __init__(self, status: int, msg: str) -> None:
        super().__init__(status, msg)
        self.status = status
        self.msg = msg


@dataclasses.dataclass(slots=True)
class HttpRequest:
    """One complete request. ``path`` is as sent (still percent-encoded); ``query`` holds the
    first value of each parameter; header names are lower case (repeats joined with ", ")."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The decoded JSON body; HttpError(400) if it is empty or not valid JSON."""
        if not self.body:
            raise HttpError(400, "body is empty; expected JSON")
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            raise HttpError(400, "body is not valid JSON") from None

    def form(self) -> dict[str, str]:
        """The x-www-form-urlencoded body, first value of each field; HttpError(400) if not
        UTF-8."""
        try:
            text = self.body.decode()
        except UnicodeDecodeError:
            raise HttpError(400, "body is not valid form data") from None
        return {k: v[0] for k, v in parse_qs(text, keep_blank_values=True).items()}


@dataclasses.dataclass(slots=True)
class HttpResponse:
    """What a handler returns; the server adds Content-Length and Connection."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def parse_request(
    method: bytes, target: bytes, headers: dict[str, str], body: bytes
) -> HttpRequest:
    """A request from what httptools read: the target split into its path and query (the
    first value of each parameter); HttpError(400) for a malformed target."""
    try:
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        raise HttpError(400, "malformed request target") from None
    query = parse_qs(url.query.decode("latin-1"), keep_blank_values=True) if url.query else {}
    return HttpRequest(
        method.decode("latin-1"),
        (url.path or b"/").decode("latin-1"),
        {k: v[0] for k, v in query.items()},
        headers,
        body,
    )


def plain_response(status: int, text: str) -> HttpResponse:
    """``text`` (and a newline) as a plain-text reply: the client port's refusals."""
    return HttpResponse(status, (text + "\n").encode(), "text/plain; charset=utf-8")


def json_response(
    status: int, data: dict[str, Any] | None = None, msg: str | None = None
) -> HttpResponse:
    """A reply of the ingest shape: ``{"code": status, "msg": msg or the reason phrase,
    "data": data or {}}``, with that HTTP status."""
    body = {"code": status, "msg": msg or REASONS.get(status, ""), "data": data or {}}
    return HttpResponse(status, orjson.dumps(body))


class Router:
    """Maps (method, path) to a handler. ``{name}`` in a pattern matches one path segment and
    is passed to the handler as a keyword argument, percent-decoded."""

    def __init__(self) -> None:
        self._static: dict[str, Methods] = {}
        self._dynamic: list[tuple[re.Pattern[str], Methods]] = []
        self._by_pattern: dict[str, Methods] = {}

    def add(self, method: str, pattern: str, handler: Handler, *, public: bool = False) -> None:
        """Route ``method pattern`` to ``handler``; ``public`` routes skip the API key check.
        Raises ValueError for a malformed pattern or a route added twice."""
        if not pattern.startswith("/"):
            raise ValueError(f"route pattern must start with '/': {pattern!r}")
        method = method.upper()
        methods = self._by_pattern.get(pattern)
        if methods is None:
            regex = _compile(pattern) if "{" in pattern or "}" in pattern else None
            methods = self._by_pattern[pattern] = {}
            if regex is None:
                self._static[pattern] = methods
            else:
                self._dynamic.append((regex, methods))
        if method in methods:
            raise ValueError(f"route added twice: {method} {pattern}")
        methods[method] = (handler, public)

    def routes(self) -> Iterator[tuple[str, str, bool]]:
        """Every route as (method, pattern, public), in the order they were added."""
        for pattern, methods in self._by_pattern.items():
            for method, (_, public) in methods.items():
                yield method, pattern, public

    def match(self, path: str) -> tuple[Methods, dict[str, str]] | None:
        """The routes by method for ``path`` and its parameters, or None if no pattern matches."""
        methods = self._static.get(path)
        if methods is not None:
            return methods, {}
        for regex, methods in self._dynamic:
            found = regex.fullmatch(path)
            if found is not None:
                return methods, {k: unquote(v) for k, v in found.groupdict().items()}
        return None


def _compile(pattern: str) -> re.Pattern[str]:
    parts = []
    for segment in pattern.split("/"):
        if segment.startswith("{") and segment.endswith("}") and segment[1:-1].isidentifier():
            parts.append(f"(?P<{segment[1:-1]}>[^/]+)")
        elif "{" in segment or "}" in segment:
            raise ValueError(f"a parameter must be a whole segment: {pattern!r}")
        else:
            parts.append(re.escape(segment))
    return re.compile("/".join(parts))


@functools.lru_cache(maxsize=256)
def _head_start(status: int, content_type: str) -> bytes:
    """A reply's status line and Content-Type, up to the Content-Length value: made once
    per (status, type), the same for almost every reply."""
    reason = REASONS.get(status, "Unknown")
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: "
    return head.encode("latin-1")


def encode_response(response: HttpResponse, keep_alive: bool, head_only: bool) -> bytes:
    """``response`` as sent: its head (``Connection: keep-alive`` or ``close``) and, unless
    ``head_only`` (a HEAD request), its body."""
    head = (
        _head_start(response.status, response.content_type)
        + b"%d" % len(response.body)
        + (b"\r\nConnection: keep-alive\r\n" if keep_alive else b"\r\nConnection: close\r\n")
    )
    if response.headers:
        head += "".join(f"{name}: {value}\r\n" for name, value in response.headers).encode(
            "latin-1"
        )
    return head + b"\r\n" if head_only else head + b"\r\n" + response.body
