"""The rolling restart's order (pmq.workers.rollout), against a stand-in master: the old
workers are told to drain only once every replacement is ready, so no client moved off an
old worker lands on another old one still to go. tests/test_master.py restarts a real node."""

from __future__ import annotations

import signal
from typing import Any

from pmq.workers.rollout import Rollout
from pmq.workers.spawn import WorkerState


class Master:
    """What Rollout uses of pmq.workers.master.Master: slots, workers, spawn, kill, control."""

    def __init__(self, slots: list[tuple[str, int]]) -> None:
        self.slots = {slot: object() for slot in slots}
        self.workers: dict[int, WorkerState] = {}
        self.pids = iter(range(100, 1000))
        self.signalled: list[tuple[int, int]] = []
        self.finished: list[tuple[str, dict[str, Any]]] = []
        self.control = self
        for kind, index in slots:
            self.spawn_worker(kind, index).ready = True

    def spawn_worker(self, kind: str, index: int) -> WorkerState:
        pid = next(self.pids)
        self.workers[pid] = WorkerState(pid, kind, index, fd=-1, started=0.0, last_seen=0.0)
        return self.workers[pid]

    def kill(self, pid: int, sig: int) -> None:
        self.signalled.append((pid, sig))

    def finish(self, command: str, answer: dict[str, Any]) -> None:
        self.finished.append((command, answer))


SLOTS = [("socket", 1), ("socket", 2), ("socket", 3), ("task", 1)]


def restarted() -> tuple[Master, Rollout, set[int], list[WorkerState]]:
    """A stand-in master of SLOTS told to restart: it, its rollout, the old workers' pids
    and the replacements started."""
    master = Master(SLOTS)
    old = set(master.workers)
    rollout = Rollout(master)  # type: ignore[arg-type]
    rollout.rolling_restart()
    return master, rollout, old, [w for w in master.workers.values() if w.pid not in old]


def test_old_workers_drain_together_once_every_replacement_is_ready() -> None:
    master, rollout, old, new = restarted()
    assert sorted((w.kind, w.index) for w in new) == sorted(SLOTS)  # all started at once
    for replacement in new[:-1]:
        replacement.ready = True
        rollout.step_rolling_restart()
        assert master.signalled == []  # an old one drained now could take others' clients
    new[-1].ready = True
    rollout.step_rolling_restart()
    assert sorted(master.signalled) == sorted((pid, signal.SIGTERM) for pid in old)
    assert all(master.workers[pid].retiring for pid in old)
    assert master.finished == [("restart", {"ok": True})]


def test_a_replacement_that_died_leaves_its_slot_to_the_old_worker() -> None:
    master, rollout, old, new = restarted()
    dead = new[0]
    del master.workers[dead.pid]
    for replacement in new[1:]:
        replacement.ready = True
    rollout.step_rolling_restart()
    kept = next(pid for pid in old if (master.workers[pid].kind, master.workers[pid].index)
                == (dead.kind, dead.index))
    assert sorted(pid for pid, _ in master.signalled) == sorted(old - {kept})
    assert not master.workers[kept].retiring
    assert master.finished == [("restart", {"ok": True})]



def test_a_restart_with_no_live_worker_to_replace_answers_at_once() -> None:
    master = Master(SLOTS)
    master.workers.clear()  # every worker just died; the master respawns them on its own
    rollout = Rollout(master)  # type: ignore[arg-type]
    rollout.rolling_restart()
    assert master.workers == {}
    assert master.finished == [("restart", {"ok": True})]
