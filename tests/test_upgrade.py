"""The client port's upgrade (pmq.reactor.websocket.Upgrade) around a real gateway in this
process, with its deadline shortened."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from pmq.domain.auth import Identity
from pmq.reactor import websocket
from tests.test_connection_memory import raw_upgrade, start_gateway, stop


class SlowAuthenticator:
    """Takes ``seconds`` to accept any token, as a loaded Redis or user centre may."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def authenticate(self, token: str) -> Identity:
        await asyncio.sleep(self.seconds)
        return Identity(token)

    async def close(self) -> None:
        pass


async def upgrade_with_slow_check(seconds: float) -> bytes:
    gateway, _, port, _ = await start_gateway()
    gateway.authenticator = SlowAuthenticator(seconds)  # type: ignore[assignment]
    try:
        return await raw_upgrade(port, 42)
    finally:
        await stop(gateway)


def test_a_slow_token_check_is_not_cut_by_the_head_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The head's deadline is the client's: once the head is in, the node's own time to
    check the token (a storm of connects queues them behind each other) does not count."""
    monkeypatch.setattr(websocket, "HEAD_SECONDS", 0.2)
    assert uvloop.run(upgrade_with_slow_check(1.0)).startswith(b"HTTP/1.1 101")


async def silent_client() -> bytes:
    """What a client that sends half a head and then nothing reads before the end (a reset
    counts as an end)."""
    gateway, _, port, _ = await start_gateway()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /ws?token=42 HTTP/1.1\r\n")  # and never the rest
        try:
            answer = await asyncio.wait_for(reader.read(), 10)
        except ConnectionResetError:
            answer = b""
        writer.close()
        return answer
    finally:
        await stop(gateway)


def test_a_head_that_never_completes_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(websocket, "HEAD_SECONDS", 0.2)
    assert uvloop.run(silent_client()) == b""  # closed without an answer
