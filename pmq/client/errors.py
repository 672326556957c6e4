"""What :class:`pmq.client.Client` raises; every error is a :class:`ClientError`."""

from __future__ import annotations


class ClientError(Exception):
    """Any failure of the client library."""


class RequestError(ClientError):
    """The server answered a request with a code other than 200 (``msg`` says why)."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(f"{code} {msg}")
        self.code = code
        self.msg = msg


class RequestTimeout(ClientError, TimeoutError):
    """No reply came within the request's timeout (waiting for a connection included)."""


class ConnectionLost(ClientError):
    """The connection closed (``code`` and ``reason`` of the close, when one came) before a
    request was answered. The client reconnects by itself; the request was not retried."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"connection lost: {code or ''} {reason}".replace("  ", " "))
        self.code = code
        self.reason = reason


class Stopped(ClientError):
    """The client stopped for good: ``code`` is the close code (4001: the site kicked the
    user; 4008: a newer connection of the user took this one's place) or the handshake's
    status (401: the token was refused; 403: its user may not connect), or None when the
    application closed it. ``reason`` is the close reason or the handshake's answer."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"stopped: {code} {reason}" if code else f"stopped: {reason}")
        self.code = code
        self.reason = reason
