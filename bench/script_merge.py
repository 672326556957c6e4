"""Redis's CPU per message of the publish script, one message per call against several.

    python -m bench.script_merge [--messages 20000] [--per-call 1,4,12,32] [--rounds 3]
    python -m bench.script_merge --per-call 12 --rounds 10 --compare OTHER.lua

Runs a private redis-server (no persistence) on a free port and sends it ``inbox_publish``
calls as a socket worker does, to offline users of one bucket: pipelined, 100 messages per
round trip, ``k`` messages per call, for each ``k`` of ``--per-call`` in turn, rounds
alternating. Reports Redis's own CPU (INFO cpu) per message: what merging the publishes of
one loop iteration into one call (pmq.redis.batching's script_merged) saves Redis.
``--compare FILE`` measures another version of the script against PMQ's instead, in turn
in the same server, and reports the median of their ratio round by round.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench.common import emit, log
from bench.run_node import free_port, redis_server
from pmq.domain.ids import EPOCH_MS, TIME_SHIFT, timestamp_ms
from pmq.redis import scripts
from pmq.redis.keys import Keys

USERS = 10_000
TTL = 86_400
PER_ROUND_TRIP = 100


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def one_pass(client: redis.Redis, sha: str, keys: Keys, messages: int, per_call: int) -> float:
    """Redis CPU seconds for ``messages`` published ``per_call`` to a call."""
    head = [keys.publish_dedupe("", 0), keys.store_queue(), keys.inbox_index(0), keys.owners(0)]
    rnd = random.Random(per_call)
    message_id = (int(time.time() * 1000) - EPOCH_MS) << TIME_SHIFT
    calls: list[tuple[list[Any], list[Any]]] = []
    for first in range(0, messages, per_call):
        call_keys: list[Any] = list(head)
        call_args: list[Any] = ["0", 86_400, TTL, b""]
        for _ in range(min(per_call, messages - first)):
            message_id += 1
            uid = str(rnd.randrange(USERS))
            wire = (
                b'{"type":"msg","data":{"id":"%d","kind":"notice","from":null,"to":"%s",'
                b'"body":{"title":"hello","text":"%s"},"ts":%d}}'
                % (message_id, uid.encode(), b"x" * 80, timestamp_ms(message_id))
            )
            call_keys += keys.publish_keys(uid)
            call_args += [
                message_id,
                timestamp_ms(message_id),
                uid,
                wire,
                "notice",
                b'{"op":"msg","msg":' + wire + b"}",
            ]
        calls.append((call_keys, call_args))
    before = redis_cpu(client)
    sent = 0
    while sent < len(calls):
        pipe = client.pipeline(transaction=False)
        batch = calls[sent : sent + max(1, PER_ROUND_TRIP // per_call)]
        for call_keys, call_args in batch:
            pipe.evalsha(sha, len(call_keys), *call_keys, *call_args)
        pipe.execute()
        sent += len(batch)
    used = redis_cpu(client) - before
    client.delete(*head)  # the queue and owners grow with every message
    return used


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--per-call", default="1,4,12,32", help="messages per call, in turn")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--compare",
        type=Path,
        help="another source of the script (same KEYS and ARGV): PMQ's and it in turn, at "
        "the first --per-call",
    )
    args = parser.parse_args()
    per_calls = [int(k) for k in args.per_call.split(",")]
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        server = redis_server(port, Path(directory), "--appendonly", "no")
        try:
            client = redis.Redis(port=port)
            sha = client.script_load(scripts.source("inbox_publish"))
            # (name, script, messages per call), measured in turn, the order reversed
            # every other round
            variants = [(str(k), sha, k) for k in per_calls]
            if args.compare:
                other = client.script_load(args.compare.read_text())
                variants = [("pmq", sha, per_calls[0]), (str(args.compare), other, per_calls[0])]
            keys = Keys("pmqbench:merge:")
            one_pass(client, sha, keys, args.messages, 1)  # warm: keys and allocator
            figures: dict[str, list[float]] = {name: [] for name, _, _ in variants}
            for round_no in range(args.rounds):
                for name, script, k in variants if round_no % 2 == 0 else variants[::-1]:
                    used = one_pass(client, script, keys, args.messages, k)
                    figures[name].append(round(1e6 * used / args.messages, 2))
                    log(f"round {round_no + 1}: {name}, {figures[name][-1]} us/message")
            client.close()
        finally:
            server.kill()
            server.wait()
    result: dict[str, Any] = {
        "bench": "script_merge",
        "messages": args.messages,
        "redis_cpu_us_per_message": figures,
        "median": {name: statistics.median(v) for name, v in figures.items()},
    }
    if args.compare:  # round by round: the machine's speed drifts less within a round
        pmq, other = figures.values()
        result["compare_over_pmq_median"] = round(
            statistics.median(b / a for a, b in zip(pmq, other, strict=True)), 3
        )
    emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
