"""The master: a prefork supervisor in the manner of gunicorn's arbiter.

It writes the pid file, forks ``server.workers`` socket workers and ``server.task_workers``
task workers, and then loops: reap the dead, kill the stuck, keep the count, answer pmqctl.
Signal handlers only queue the signal; the loop calls one ``handle_*`` method per signal.
The master never imports pmq.reactor, pmq.tasks or pmq.handlers: children load them.

What is settled before the loop (start-up checks, the shared secret, leftovers of a dead
master) is pmq.workers.boot; forking one worker is pmq.workers.spawn; HUP reload and USR2
rolling restart are pmq.workers.rollout.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import logging
import os
import select
import signal
import sys
import time
from typing import Any

import psutil
import setproctitle

from pmq import metrics
from pmq.config import Config
from pmq.errors import AlreadyRunning, WorkerExit
from pmq.workers import pidfile
from pmq.workers.boot import refuse_live_master, stop_leftovers
from pmq.workers.control import ControlServer
from pmq.workers.notify import notify
from pmq.workers.rollout import Rollout
from pmq.workers.spawn import WorkerState, fork_withdraw, fork_worker, worker_id

log = logging.getLogger(__name__)

SIGNALS: dict[int, str] = {
    signal.SIGTERM: "term",
    signal.SIGINT: "int",
    signal.SIGQUIT: "quit",
    signal.SIGHUP: "hup",
    signal.SIGUSR2: "usr2",
    signal.SIGCHLD: "chld",
}
LOOP_SECONDS = 0.5
FAST_STOP_SECONDS = 2.0
MAX_BACKOFF = 30.0
SHORT_LIFE = 10.0  # a worker that dies younger than this counts as a failed start


class StopMaster(Exception):
    def __init__(self, code: int = 0) -> None:
        self.code = code


@dataclasses.dataclass
class Slot:
    """One (kind, index) place to keep filled, with its respawn back-off."""

    failures: int = 0
    next_spawn: float = 0.0


class Master:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.node = config.server.node
        self.title = f"pmq: master [{self.node}]"
        self.workers: dict[int, WorkerState] = {}
        self.slots: dict[tuple[str, int], Slot] = {
            ("socket", i): Slot() for i in range(1, config.server.workers + 1)
        }
        self.slots.update({("task", j): Slot() for j in range(1, config.server.task_workers + 1)})
        self.signals: list[int] = []
        self.started = time.time()
        self.restarts = 0
        self.announced_ready = False
        self.rollout = Rollout(self)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.control = ControlServer(config.server.control_socket, self)

    # Start and loop -----------------------------------------------------------------
    def run(self) -> int:
        """Run until stopped; return the process exit code."""
        try:
            self.start()
        except AlreadyRunning as exc:
            log.error("%s", exc)
            return 1
        try:
            while True:
                self.wait_for_events()
                if self.signals:
                    getattr(self, f"handle_{SIGNALS[self.signals.pop(0)]}")()
                    continue
                self.reap_workers()
                self.murder_stuck_workers()
                self.manage_workers()
                self.rollout.step_rolling_restart()
                self.rollout.check_reload()
        except StopMaster as stop:
            return stop.code
        finally:
            self.cleanup()

    def start(self) -> None:
        setproctitle.setproctitle(self.title)
        refuse_live_master(self.node)
        pidfile.create(self.config.server.pid_file)
        stop_leftovers(self.node)
        self.control.open()
        for sig in SIGNALS:
            signal.signal(sig, self.record_signal)
        log.info("%s starting (pid %d)", self.title, os.getpid())
        # Workers share the master's pages until written; a collection in a worker would
        # write to every object it scans, so the master's objects leave the collector.
        gc.collect()
        gc.freeze()
        self.manage_workers()

    def record_signal(self, signum: int, frame: Any) -> None:
        if len(self.signals) < 5:
            self.signals.append(signum)
        try:
            os.write(self.wake_w, b".")
        except BlockingIOError:
            pass

    def wait_for_events(self) -> None:
        fds = [self.wake_r, *self.control.fds(), *(w.fd for w in self.workers.values())]
        try:
            readable, _, _ = select.select(fds, [], [], LOOP_SECONDS)
        except InterruptedError:
            return
        except OSError as exc:  # a worker fd closed under us
            if exc.errno != errno.EBADF:
                raise
            return
        for fd in readable:
            if fd == self.wake_r:
                self.drain_wakeups()
            elif fd in self.control.fds():
                self.control.handle(fd)
            else:
                self.read_worker_events(fd)

    def drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # Signal handlers ------------------------------------------------------------------
    def handle_chld(self) -> None:
        self.reap_workers()

    def handle_term(self) -> None:
        self.stop(graceful=True)

    def handle_int(self) -> None:
        self.stop(graceful=True)

    def handle_quit(self) -> None:
        self.stop(graceful=False)

    def handle_hup(self) -> None:
        self.reload()

    def handle_usr2(self) -> None:
        self.rolling_restart()

    def reload(self) -> None:
        """HUP every worker to re-import handlers (pmq.workers.rollout); pmqctl reload."""
        self.rollout.reload()

    def rolling_restart(self) -> None:
        """New workers for all, then the old ones drain (pmq.workers.rollout); pmqctl restart."""
        self.rollout.rolling_restart()

    # Workers ------------------------------------------------------------------------
    def spawn_worker(self, kind: str, index: int) -> WorkerState:
        """Fork the ``kind`` worker for slot ``index`` and watch it."""
        state = fork_worker(self.config, kind, index, self.close_in_child)
        self.workers[state.pid] = state
        log.info("spawned %s worker #%d (pid %d)", kind, index, state.pid)
        return state

    def close_in_child(self) -> None:
        """Drop the master's descriptors and handlers from a freshly forked worker."""
        self.control.close_in_child()
        for fd in (self.wake_r, self.wake_w, *(w.fd for w in self.workers.values())):
            os.close(fd)
        self.workers.clear()

    def read_worker_events(self, fd: int) -> None:
        worker = next((w for w in self.workers.values() if w.fd == fd), None)
        if worker is None:
            return
        try:
            data = os.read(fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            return  # EOF: the process is gone; reap_workers will notice
        worker.last_seen = time.monotonic()
        for event in worker.reader.feed(data):
            self.on_worker_event(worker, event)

    def on_worker_event(self, worker: WorkerState, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "ready":
            worker.ready = True
            self.slots[(worker.kind, worker.index)].failures = 0
            self.announce_ready()
        elif kind == "heartbeat":
            worker.stats = {k: v for k, v in event.items() if k != "event"}
        elif kind == "reload":
            self.rollout.answered(worker.pid, event)

    def announce_ready(self) -> None:
        if self.announced_ready:
            return
        if all(self.ready_worker(slot) for slot in self.slots):
            self.announced_ready = True
            notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving")
            log.info("%s ready: %d workers", self.title, len(self.slots))

    def ready_worker(self, slot: tuple[str, int]) -> bool:
        return any(
            (w.kind, w.index) == slot and w.ready and not w.retiring for w in self.workers.values()
        )

    def reap_workers(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            os.close(worker.fd)
            self.on_worker_exit(worker, os.waitstatus_to_exitcode(status))

    def on_worker_exit(self, worker: WorkerState, code: int) -> None:
        name = f"{worker.kind} worker #{worker.index} (pid {worker.pid})"
        if worker.retiring:
            log.info("%s retired (exit %d)", name, code)
            metrics.process_gone(worker.pid)
            return
        self.restarts += 1
        metrics.WORKER_RESTARTS.inc()
        metrics.process_gone(worker.pid)
        if code == WorkerExit.BOOT_ERROR and not worker.ready:
            log.error("%s failed to boot; stopping the node", name)
            self.stop(graceful=True, code=1)
        log.error("%s died (exit %d); respawning", name, code)
        slot = self.slots[(worker.kind, worker.index)]
        if time.monotonic() - worker.started < SHORT_LIFE:
            slot.failures += 1
        delay = min(0.1 * 2**slot.failures, MAX_BACKOFF) if slot.failures else 0.0
        slot.next_spawn = time.monotonic() + delay

    def murder_stuck_workers(self) -> None:
        timeout = self.config.server.worker_timeout
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if now - worker.last_seen > timeout:
                log.error(
                    "%s worker #%d (pid %d) silent for %.0fs; killing it",
                    worker.kind,
                    worker.index,
                    worker.pid,
                    now - worker.last_seen,
                )
                self.kill(worker.pid, signal.SIGKILL)
                worker.last_seen = now  # one kill per timeout; reaping follows

    def manage_workers(self) -> None:
        now = time.monotonic()
        for (kind, index), slot in self.slots.items():
            filled = any(
                (w.kind, w.index) == (kind, index) and not w.retiring for w in self.workers.values()
            )
            if not filled and now >= slot.next_spawn:
                self.spawn_worker(kind, index)

    def kill(self, pid: int, sig: int) -> None:
        """Send ``sig`` to ``pid``; a process already gone is no error."""
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    # Stop ---------------------------------------------------------------------------
    def stop(self, graceful: bool = True, code: int = 0) -> None:
        """Stop every worker (TERM, or QUIT when fast), wait, kill the rest; raise StopMaster.
        A graceful stop stops the socket workers first and the task workers once those are
        gone, so that the writes queued by the last ingest requests are in the queue the task
        workers drain; each stage has its own graceful_timeout (a task worker sizes its drain
        by it), so a whole stop takes at most twice that."""
        notify("STOPPING=1")
        log.info("%s stopping (%s)", self.title, "graceful" if graceful else "fast")
        self.control.close()
        if graceful:
            timeout = self.config.server.graceful_timeout
            killed = self.stop_stage(("socket",), signal.SIGTERM, timeout)
            killed += self.stop_stage(("task",), signal.SIGTERM, timeout)
        else:
            killed = self.stop_stage(("socket", "task"), signal.SIGQUIT, FAST_STOP_SECONDS)
        if killed:  # they could not take their route entries with them
            fork_withdraw(self.config, killed, self.close_in_child)
        raise StopMaster(code)

    def stop_stage(self, kinds: tuple[str, ...], sig: int, timeout: float) -> list[str]:
        """Send ``sig`` to the workers of ``kinds``, wait ``timeout`` seconds for them to
        exit, kill those left; returns the registry ids of the socket workers killed."""
        for pid, worker in list(self.workers.items()):
            if worker.kind in kinds:
                self.kill(pid, sig)
        deadline = time.monotonic() + timeout

        def left() -> list[tuple[int, WorkerState]]:
            return [(pid, w) for pid, w in self.workers.items() if w.kind in kinds]

        while left() and time.monotonic() < deadline:
            self.reap_workers_quietly()
            time.sleep(0.02)
        killed = []
        for pid, worker in left():
            log.warning("worker pid %d still alive after %.0fs; killing it", pid, timeout)
            self.kill(pid, signal.SIGKILL)
            if worker.kind == "socket":
                killed.append(worker_id(self.node, worker.kind, worker.index, pid))
        while left():
            self.reap_workers_quietly()
            time.sleep(0.01)
        return killed

    def reap_workers_quietly(self) -> None:
        for worker in list(self.workers.values()):
            worker.retiring = True
        self.reap_workers()

    def cleanup(self) -> None:
        self.control.close()
        pidfile.remove(self.config.server.pid_file)
        log.info("%s exited", self.title)

    # Status -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        workers = []
        for w in sorted(self.workers.values(), key=lambda w: (w.kind, w.index, w.started)):
            workers.append(
                {
                    "pid": w.pid,
                    "kind": w.kind,
                    "index": w.index,
                    "uptime": round(now - w.started, 1),
                    "ready": w.ready,
                    "retiring": w.retiring,
                    "rss": rss(w.pid),
                    **w.stats,
                }
            )
        return {
            "node": self.node,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 1),
            "rss": rss(os.getpid()),
            "ready": self.announced_ready,
            "restarts": self.restarts,
            "workers": workers,
            "config": self.config.path,
            "python": sys.version.split()[0],
            # Which PMQ code the master holds: workers load theirs after fork (STYLE 7).
            "modules": sorted(m for m in sys.modules if m == "pmq" or m.startswith("pmq.")),
        }


def rss(pid: int) -> int:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def serve(config: Config) -> int:
    """Run a master for this config in the current process (``pmq`` / ``pmqctl start``)."""
    return Master(config).run()
