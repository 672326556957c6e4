"""The load generator's connect on uvloop: its own non-blocking connect
(bench.common.connected_socket), and a socket handed to a transport
(bench.common.connection_over) never closes a descriptor the transport owns."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from typing import cast

import pytest
import uvloop

from bench.common import connected_socket, connection_over


class Upgrading(asyncio.Protocol):
    """Writes at once, as the load generator's clients do: the write meets the reset."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(b"GET /ws HTTP/1.1\r\n\r\n")


def test_a_connection_reset_as_it_is_made_leaves_the_socket_owning_nothing() -> None:
    """The node accepts and dies (RST) before create_connection(sock=) resumes: uvloop closes
    the transport, and the descriptor with it, then attaches the socket object to that
    closed transport, never to be detached. Left so, its garbage collection closed the
    descriptor number again, by then another live connection's (a reconnect storm's
    "File descriptor N is used by transport")."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, listener.getsockname())
            peer, _ = listener.accept()
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()  # a reset
            number = sock.fileno()
            await asyncio.sleep(0.05)  # the reset has arrived
            await connection_over(sock, Upgrading)
            await asyncio.sleep(0)  # connection_lost has run: the descriptor is closed
            with socket.socket() as other:  # the next descriptor made gets the number
                assert other.fileno() == number
                assert sock.fileno() == -1  # nothing left to close twice
                sock.close()
                os.fstat(other.fileno())  # still open

    uvloop.run(scenario())


def test_connected_socket_connects_from_its_source_and_names_a_refusal() -> None:
    """The load generator's own non-blocking connect: from the source address asked for,
    and a port nobody listens on is a ConnectionRefusedError, as uvloop's was."""

    async def scenario() -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            port = listener.getsockname()[1]
            sock = await connected_socket(port, "127.0.0.5")
            peer, address = listener.accept()
            assert address[0] == "127.0.0.5" and sock.getpeername()[1] == port
            peer.close()
            sock.close()
        with pytest.raises(ConnectionRefusedError):
            await connected_socket(port, None)

    uvloop.run(scenario())


def test_connected_socket_gives_up_on_an_unanswered_syn_and_closes_its_socket() -> None:
    """A listener whose accept queue is full drops new SYNs: the connect stays in progress
    until the timeout, which closes the socket."""

    async def scenario() -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)
            port = listener.getsockname()[1]
            held: list[socket.socket] = []
            open_before = len(os.listdir("/proc/self/fd"))
            try:
                with pytest.raises(TimeoutError):
                    for _ in range(8):  # the queue fills; one of these waits
                        held.append(await connected_socket(port, None, timeout=0.3))
                assert held  # the first got in
                assert len(os.listdir("/proc/self/fd")) == open_before + len(held)
            finally:
                for sock in held:
                    sock.close()

    uvloop.run(scenario())
