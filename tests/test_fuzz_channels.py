"""Fuzzing of what a real node's socket workers read from Redis pub/sub: their relay channel
(pushes, unread changes, kicks and evictions from other workers) and the broadcast channel.

Anything that can publish there is trusted, but a bad message must cost one warning, not a
worker: random and half-right messages are published to the channel of the worker holding
an online user, and to the broadcast channel. The user's connection keeps answering ping,
the workers live on (same pids) and the log has no traceback, ERROR or CRITICAL line.
tests/test_fuzz_decoders.py fuzzes the same decoders in process, with many more examples.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson
import redis
from hypothesis import example, given
from hypothesis import strategies as st

from pmq.redis.keys import Keys
from pmq.wire.relay import Op
from tests.helpers import REDIS_URL, Node, wait_for
from tests.test_fuzz_kit import RawWebSocket, budget, fuzz_node, tally, unharmed

USER, OTHER = 7101, 7102
PUSH = b'{"type":"push","msg":{"id":"'
FRAME = st.one_of(
    st.binary(max_size=60),
    st.builds(lambda digits, rest: PUSH + digits + rest,
              st.sampled_from([b"", b"1", b"123", b"x", b"9" * 5000]),
              st.sampled_from([b'"', b'","kind":"comment"}}', b'"\xff']) | st.binary(max_size=20)),
)
STATE = st.one_of(
    st.lists(st.sampled_from(["comment", "notice", "1", "-3", "x", "1700000000000"]),
             max_size=7).map(orjson.dumps),
    st.binary(max_size=30),
)


@st.composite
def relay(draw: st.DrawFn) -> bytes:
    """A relay message; kicks and evictions name a user not online (a kick of the fuzzing
    user would end the connection the test watches)."""
    how = draw(st.integers(0, 4))
    if how == 0:
        return draw(st.binary(max_size=100))
    sent = draw(st.sampled_from([b"1.5", b"nan", b"inf", b"-1", b"x", b""]))
    if how == 1:
        op = draw(st.sampled_from([Op.PUSH, Op.UNREAD, "msg"]).map(str.encode)
                  | st.binary(max_size=6))
        return op + b" %d " % USER + sent + b"\n" + draw(FRAME)
    if how == 2:
        payload = draw(STATE) + b"\n" + draw(FRAME)
        return Op.MESSAGE.encode() + b" %d " % USER + sent + b"\n" + payload
    op = draw(st.sampled_from([Op.KICK, Op.EVICT])).encode()
    return op + b" %d " % OTHER + sent + b"\n" + draw(st.binary(max_size=30))


BROADCAST = st.builds(
    lambda group, frame: group + b"\n" + frame,
    st.sampled_from([b"all", b"\xff", b"", b"nobody"]) | st.binary(max_size=6),
    FRAME,
) | st.binary(max_size=80)


def test_garbage_on_the_channels_costs_no_worker(make_node: Callable[..., Node]) -> None:
    node = fuzz_node(make_node)
    keys = Keys(node.prefix)
    client = redis.Redis.from_url(REDIS_URL)
    ws = RawWebSocket(node, USER)
    ws.lenient = True  # fuzzed pushes that pass as frames reach it: not always JSON
    conns = wait_for(lambda: client.hgetall(keys.user_conns(str(USER))), 5, "the registry")
    worker = next(iter(conns.values())).decode()

    @budget(1.0)
    @given(relay(), BROADCAST)
    @example(b"push %d 1.0\n[1]" % USER, b"all\n5")  # frames that are JSON, not objects
    def check(relayed: bytes, broadcast: bytes) -> None:
        tally("pub/sub channels: relay and broadcast (end to end)")
        assert client.spublish(keys.worker_channel(worker), relayed) == 1
        assert client.spublish(keys.broadcast_channel(), broadcast) >= 1
        assert ws.request("ping", request_id="alive")["code"] == 200

    try:
        with unharmed(node):
            check()
    finally:
        ws.close()
        client.close()
