"""Tokens, kicks and the user centre's answers, end to end against real nodes.

What docs/security.md ("Tokens and kicks", "The user centre") promises: a sub past the uid
range, a wrong issuer or audience, a token living longer than auth.max_token_age are refused
with 401; after a kick every worker of every node refuses the user's older tokens while a
newer one connects; in http mode a kick drops the cached answers; a user centre that cannot
give a verdict makes the handshake 503, and its failure is not cached.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.helpers import (
    GOOD_ANSWER,
    SECRET,
    Ingest,
    Node,
    UserCentre,
    connections_of,
    wait_for,
)

UID = "4242"


def signed(claims: dict[str, Any]) -> str:
    """A token of ``claims`` signed with the test nodes' secret (exp a minute ahead)."""
    return jwt.encode({"exp": int(time.time()) + 60, **claims}, SECRET, algorithm="HS256")


def socket_to(node: Node, source_port: int = 0) -> socket.socket:
    """A TCP connection to the node's client port from ``source_port`` (0: any)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", source_port))
    sock.connect(("127.0.0.1", node.port))
    return sock


@contextlib.contextmanager
def opened(node: Node, token: str, source_port: int = 0) -> Iterator[ClientConnection]:
    """An open connection with ``token``, its hello read."""
    url = f"{node.ws_url}?token={token}"
    with connect(url, sock=socket_to(node, source_port), open_timeout=10) as ws:
        assert '"hello"' in str(ws.recv(timeout=5))
        yield ws


def connect_to(node: Node, token: str) -> ClientConnection:
    """A connection with ``token``, nothing read from it yet."""
    return connect(f"{node.ws_url}?token={token}", open_timeout=10)


def handshake(node: Node, token: str, source_port: int = 0) -> int:
    """101 when ``token`` connects (the hello comes), else the HTTP status it got."""
    try:
        with opened(node, token, source_port):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


def kick(node: Node, uid: str) -> int:
    ingest = Ingest(node)
    try:
        status, reply = ingest.call("POST", f"/api/v1/users/{uid}/kick", {"reason": "logout"})
    finally:
        ingest.close()
    assert status == 200, reply
    return int(reply["data"]["closed"])


def closed_with(ws: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed) as info:
        while True:
            ws.recv(timeout=5)
    return info.value.rcvd.code if info.value.rcvd else None


def next_second_after(moment: float) -> None:
    """Wait until the clock is in a later second than ``moment``: a token minted then has
    an iat after the second of a kick made before ``moment``."""
    wait_for(lambda: int(time.time()) > int(moment), 3, "the next second")


# Claims -------------------------------------------------------------------------------


def test_sub_past_the_uid_range_is_refused(make_node: Callable[..., Node]) -> None:
    """Storage keeps uids as signed 64-bit integers: 2^63 must never connect."""
    node = make_node().start()
    assert handshake(node, signed({"sub": str(2**63)})) == 401
    assert handshake(node, signed({"sub": 2**63})) == 401
    assert handshake(node, signed({"sub": str(2**63 - 1)})) == 101


def test_issuer_audience_and_max_token_age(make_node: Callable[..., Node]) -> None:
    node = make_node(
        auth={"issuer": "https://site.example", "audience": "pmq", "max_token_age": 3600}
    ).start()
    now = int(time.time())
    good = {"sub": UID, "iss": "https://site.example", "aud": "pmq", "iat": now, "exp": now + 3600}
    assert handshake(node, signed(good)) == 101
    assert handshake(node, signed({**good, "iss": "https://evil.example"})) == 401
    assert handshake(node, signed({**good, "aud": "shop"})) == 401
    for missing in ("iss", "aud", "iat"):
        claims = {k: v for k, v in good.items() if k != missing}
        assert handshake(node, signed(claims)) == 401, missing
    assert handshake(node, signed({**good, "exp": now + 3601})) == 401  # lives too long


# Kicks --------------------------------------------------------------------------------


def hold_on_every_worker(
    node: Node, token: str, stack: contextlib.ExitStack
) -> list[tuple[int, ClientConnection]]:
    """Open connections with ``token`` until each socket worker of ``node`` holds one: their
    source ports and themselves. The kernel picks a worker by the connection's addresses
    and ports, so a new connection from one of these ports reaches the same worker again."""
    held: list[tuple[int, ClientConnection]] = []
    began = time.monotonic()

    def on_both_workers() -> bool:
        # Four more every 3 s until both hold one: workers report their connections each second.
        while len(held) < 4 * (1 + int((time.monotonic() - began) // 3)):
            ws = stack.enter_context(opened(node, token))
            held.append((ws.socket.getsockname()[1], ws))
        workers = node.workers()
        return len(workers) == 2 and all(w.get("connections") for w in workers)

    wait_for(on_both_workers, 30, "connections on both socket workers")
    return held


def test_kick_revokes_older_tokens_on_every_worker_of_every_node(
    make_node: Callable[..., Node],
) -> None:
    node = make_node().start()  # two socket workers
    other = make_node().start()  # another node of the same cluster (same Redis)
    old, no_iat = node.token(UID), signed({"sub": UID})
    assert handshake(other, no_iat) == 101
    with contextlib.ExitStack() as stack:
        held = hold_on_every_worker(node, old, stack)
        assert kick(node, UID) == len(held)
        kicked_at = time.time()
        assert [closed_with(ws) for _, ws in held] == [4001] * len(held)
    for port, _ in held:  # each worker again: the same source ports
        assert handshake(node, old, port) == 401, port
    for token in (old, no_iat):
        assert handshake(other, token) == 401
    assert handshake(node, node.token("4243")) == 101  # other users are not affected
    next_second_after(kicked_at)
    new = node.token(UID)
    assert handshake(node, new) == 101
    assert handshake(other, new) == 101


def test_a_token_with_a_fractional_iat_after_the_kick_connects(
    make_node: Callable[..., Node],
) -> None:
    """A NumericDate may carry a fraction: a token whose iat lies after the kick's
    millisecond was issued after it, even within the kick's own second."""
    node = make_node().start()
    uid = "4244"
    before = signed({"sub": uid, "iat": time.time()})
    assert kick(node, uid) == 0
    answered_ms = int(time.time() * 1000)  # the kick's millisecond is this one or earlier
    wait_for(lambda: time.time() * 1000 >= answered_ms + 1, 3, "the next millisecond")
    after = signed({"sub": uid, "iat": time.time()})
    assert handshake(node, before) == 401
    assert handshake(node, after) == 101


# The user centre (auth.mode = "http") ------------------------------------------------------


def http_node(make_node: Callable[..., Node], centre: UserCentre, **auth: Any) -> Node:
    return make_node(auth={"mode": "http", "url": centre.url, **auth}).start()


def test_kick_drops_the_cached_user_centre_answers(
    make_node: Callable[..., Node], centre: UserCentre
) -> None:
    node = http_node(make_node, centre)  # "good-..." tokens are uid 123
    with opened(node, "good-phone") as phone:
        assert handshake(node, "good-laptop") == 101
        assert handshake(node, "good-phone") == 101  # from the cache
        assert centre.calls == {"good-phone": 1, "good-laptop": 1}
        # The two handshakes' connections leave the registry in the next batch of departures.
        wait_for(lambda: connections_of(node, "123") == 1, 10, "only the phone registered")
        assert kick(node, "123") == 1
        assert closed_with(phone) == 4001
    centre.script("good-phone", (401, b"", 0.0))  # the site logged that device out
    assert handshake(node, "good-phone") == 401
    assert handshake(node, "good-laptop") == 101
    assert centre.calls == {"good-phone": 2, "good-laptop": 2}


def test_a_kick_during_a_handshake_closes_the_connection_it_opens(
    make_node: Callable[..., Node], centre: UserCentre
) -> None:
    # The handshake asked the user centre before the kick and has its answer after it: the
    # token passed, and the kick's close found no connection of the user yet. The
    # registration sees the kick (pmq.domain.kicks) and closes the connection with 4001.
    node = http_node(make_node, centre)
    answer = centre.gate("good-late")
    outcome: dict[str, Any] = {}

    def connect() -> None:
        try:
            with connect_to(node, "good-late") as ws:
                outcome["closed"] = closed_with(ws)
        except Exception as exc:  # reported by the assertion below
            outcome["error"] = exc

    client = threading.Thread(target=connect)
    client.start()
    wait_for(lambda: centre.calls.get("good-late") == 1, 10, "the handshake to ask the centre")
    assert kick(node, "123") == 0  # no connection of the user yet
    answer.set()
    client.join(30)
    assert outcome == {"closed": 4001}


def test_user_centre_without_a_verdict_is_503_and_not_cached(
    make_node: Callable[..., Node], centre: UserCentre
) -> None:
    node = http_node(make_node, centre, timeout=0.5)
    good = json.dumps(GOOD_ANSWER).encode()
    answers = {
        "good-429": (429, b'{"error": "slow down"}', 0.0),
        "good-500": (500, b"<html>Internal Server Error</html>", 0.0),
        "good-404": (404, b"", 0.0),
        "good-garbage": (200, b"<html>maintenance</html>", 0.0),
        "good-timeout": (200, good, 1.5),  # past auth.timeout
    }
    for token, answer in answers.items():
        centre.script(token, answer)
        assert handshake(node, token) == 503, token
        assert handshake(node, token) == 101, token  # the next, good answer: nothing cached
        assert centre.calls[token] == 2, token
