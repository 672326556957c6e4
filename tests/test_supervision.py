"""Supervised loops: every forever-loop of a worker runs under pmq.workers.base.supervise.

An expected error (Redis, OS, storage) starts the loop again after a capped, doubling pause;
anything else takes the worker down with a non-zero exit, and the master starts a fresh one.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from pmq.errors import StorageError, WorkerExit
from pmq.redis.keys import Keys
from pmq.workers.base import supervise
from tests.helpers import REDIS_URL, Ingest, Node, wait_for, wait_for_async, ws_client


class Flaky:
    """A loop body that fails with ``errors`` in turn, then returns (or waits forever)."""

    def __init__(self, *errors: Exception, forever: bool = False) -> None:
        self.errors = list(errors)
        self.runs = 0
        self.forever = forever

    async def run(self) -> None:
        self.runs += 1
        if self.errors:
            raise self.errors.pop(0)
        if self.forever:
            await asyncio.Event().wait()


def supervised(loop: Flaky, cap: float = 5.0) -> list[tuple[str, Exception]]:
    died: list[tuple[str, Exception]] = []
    asyncio.run(supervise("flaky", loop.run, lambda name, exc: died.append((name, exc)), cap))
    return died


def restart_delays(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage().rpartition("restarting in ")[2] for r in caplog.records
            if r.getMessage().startswith("loop flaky failed")]


def test_expected_errors_restart_the_loop_with_a_capped_back_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    errors = [RedisConnectionError("down"), OSError("reset"), StorageError("gone"),
              TimeoutError(), RedisConnectionError("still down")]
    loop = Flaky(*errors)
    assert supervised(loop, cap=0.5) == []
    assert loop.runs == 6  # five failed runs, then one that returned
    assert restart_delays(caplog) == ["0.2s", "0.4s", "0.5s", "0.5s", "0.5s"]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_a_loop_that_ran_well_for_a_while_restarts_after_the_first_pause_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    runs = 0

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs == 2:
            await asyncio.sleep(0.35)  # longer than the cap: a healthy run
        if runs < 3:
            raise OSError("reset")

    asyncio.run(supervise("flaky", loop, lambda *_: None, cap=0.3))
    assert restart_delays(caplog) == ["0.2s", "0.2s"]  # not 0.3 s: the run did well


def test_an_unexpected_error_is_handed_to_died_and_not_retried() -> None:
    boom = ValueError("a bug")
    loop = Flaky(RedisConnectionError("down"), boom, forever=True)
    assert supervised(loop) == [("flaky", boom)]
    assert loop.runs == 2


def test_cancelling_stops_the_loop_even_during_its_pause() -> None:
    async def scenario() -> int:
        loop = Flaky(*(OSError("reset") for _ in range(100)))
        task = asyncio.create_task(supervise("flaky", loop.run, lambda *_: None))
        await wait_for_async(lambda: loop.runs >= 1, 10, "the first run")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return loop.runs

    assert asyncio.run(scenario()) == 1  # cancelled in the first pause


def test_cancelling_stops_a_loop_whose_cancellation_became_a_redis_error() -> None:
    """What redis-py can do: the cancel lands in a command, which fails with a RedisError
    instead. The supervisor must not restart the loop, or the task outlives its shutdown."""

    async def scenario() -> None:
        started = asyncio.Event()
        swallowed = 0

        async def loop() -> None:
            nonlocal swallowed
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if swallowed:  # once is the case; a failing test still ends
                    raise
                swallowed += 1
                raise RedisConnectionError("connection lost while cancelled") from None

        task = asyncio.create_task(supervise("swallowing", loop, lambda *_: None))
        await started.wait()
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=5.0)
        assert done, "the supervised loop was restarted after its cancellation"
        assert task.cancelled()

    asyncio.run(scenario())


WORKER_WITH_A_BUG = textwrap.dedent(
    """
    import asyncio, logging, os, sys
    from pmq.config import Config
    from pmq.workers.base import Worker

    class Buggy(Worker):
        kind = "test"

        async def start(self):
            self.ticks = 0
            self.loops = [self.supervise("ticker", self.tick)]

        async def tick(self):
            while True:
                self.ticks += 1
                if self.ticks == 3:
                    {}["missing"]  # a bug, not an outage
                await asyncio.sleep(0.01)

        async def shutdown(self, fast):
            for task in self.loops:
                task.cancel()
            print("shutdown fast=%s" % fast, flush=True)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    status_r, status_w = os.pipe()
    sys.exit(Buggy(Config(), 1, status_w, os.getppid()).run())
    """
)


def test_a_loop_that_dies_of_a_bug_makes_the_worker_exit_non_zero() -> None:
    done = subprocess.run(
        [sys.executable, "-c", WORKER_WITH_A_BUG], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == WorkerExit.LOOP_DIED != 0, done.stderr
    assert "shutdown fast=True" in done.stdout  # it stopped in order, quickly
    log = done.stderr
    assert "pmq: test worker #1" in log and "(pid " in log and "loop ticker died of KeyError" in log
    assert "Traceback" in log and "missing" in log


# End to end ----------------------------------------------------------------------------


def socket_pids(node: Node) -> set[int]:
    return {w["pid"] for w in node.workers("socket") if w["ready"]}


def test_a_socket_worker_whose_registry_loop_dies_is_respawned(make_node) -> None:
    """A member of the worker registry that is not UTF-8 (written by hand, or by a broken
    peer) makes the registry loop fail while decoding it: not an outage, so the worker must
    exit non-zero and the master start a new one, instead of serving on while its routes
    expire. Once the bad member is gone the node serves again."""
    node = make_node().start()
    before = socket_pids(node)
    assert len(before) == 2
    keys = Keys(node.prefix)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.zadd(keys.workers(), {b"\xff\xfe broken": 0})
        wait_for(lambda: not before & {p.pid for p in node.processes()}, 30,
                 "the socket workers to exit")
        client.zrem(keys.workers(), b"\xff\xfe broken")
    finally:
        client.close()
    wait_for(lambda: len(socket_pids(node) - before) == 2, 60, "two new socket workers")
    log = node.log()
    assert "loop registry died of UnicodeDecodeError" in log
    assert "died (exit 4); respawning" in log
    with ws_client(node, 501) as user:
        ingest = Ingest(node)
        status, _ = ingest.publish({"to": 501, "kind": "notice", "body": {"n": 1}})
        assert status == 202
        assert user.pushes(1)[0]["body"] == {"n": 1}
        ingest.close()
