"""The worker base shared by socket and task workers: title, signals, liveness both ways.

A worker runs one asyncio loop (uvloop). It tells the master it is alive by writing a
heartbeat event to its status pipe every second, and it leaves by itself when its parent
changes (the master died). Subclasses implement :meth:`start`, :meth:`shutdown` and
optionally :meth:`reload` and :meth:`stats`, and run every forever-loop of theirs through
:meth:`Worker.supervise`, so that no loop ever dies unseen while the worker keeps serving.
Blocking calls (the SQL store's) go through :meth:`Worker.in_thread`, never on the loop.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import setproctitle
import uvloop
from redis.exceptions import RedisError

from pmq import configload
from pmq import log as logsetup
from pmq.cancel import raise_if_cancelled
from pmq.config import Config
from pmq.errors import StorageError, WorkerExit
from pmq.workers.channel import send_event
from pmq.workers.spawn import worker_id

log = logging.getLogger(__name__)

T = TypeVar("T")
HEARTBEAT_SECONDS = 1.0  # the longest between two stats events (the master sees us alive)
STATS_POLL_SECONDS = 0.1  # how soon a change of the stats reaches pmqctl status
PARENT_CHECK_SECONDS = 0.25
ORPHAN_DEADLINE = 1.5  # seconds an orphan may spend cleaning up before it is gone

# What a loop meets in normal operation and gets over by starting again: Redis down, failing
# over or still loading (every RedisError), a socket, pipe or timeout error (OSError, which
# TimeoutError and ConnectionError are), the SQL store down (StorageError). Anything else is
# a bug or a state the loop does not understand, and a fresh worker is the way out.
EXPECTED_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError, StorageError)
RESTART_FIRST = 0.2  # seconds before a failed loop starts again, doubling up to a cap
RESTART_MAX = 5.0
# Blocking calls at once: one per job that calls the store (the writer, the sweeper, a
# replay...), so a slow retention delete never holds up the writer.
THREADS = 4

Loop = Callable[[], Awaitable[object]]


class BootError(Exception):
    """The worker cannot start (port taken, Redis unreachable); the master gives up."""


async def supervise(
    name: str,
    loop: Loop,
    died: Callable[[str, Exception], None],
    cap: float = RESTART_MAX,
) -> None:
    """Run ``loop()`` until it returns, the one boundary of a forever-loop.

    On an error of EXPECTED_ERRORS it logs a warning and calls ``loop()`` again after a
    back-off, RESTART_FIRST doubling up to ``cap`` seconds (from RESTART_FIRST again once a
    run lasted longer than ``cap``), so the loop keeps whatever state it holds in its object.
    On any other exception it calls ``died(name, exc)`` and returns. Cancellation passes
    through: cancel the task to stop the loop, even one whose cancellation redis-py turned
    into a RedisError (it is not restarted)."""
    delay = RESTART_FIRST
    while True:
        began = time.monotonic()
        try:
            await loop()
            return
        except EXPECTED_ERRORS as exc:
            raise_if_cancelled()
            if time.monotonic() - began > cap:
                delay = RESTART_FIRST  # it ran well for a while: this is a new failure
            log.warning("loop %s failed: %r; restarting in %.1fs", name, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, cap)
        except Exception as exc:
            died(name, exc)
            return


class Worker(abc.ABC):
    kind: str = "worker"
    thread_prefix: str = "pmq-worker"  # in_thread's threads are named after it

    def __init__(self, config: Config, index: int, status_fd: int, ppid: int) -> None:
        self.config = config
        self.index = index
        self.status_fd = status_fd
        self.ppid = ppid
        self.pid = os.getpid()
        self.started = time.time()
        self.id = worker_id(config.server.node, self.kind, index, self.pid)
        self.title = f"pmq: {self.kind} worker #{index} [{config.server.node}]"
        self.stopping: asyncio.Event | None = None
        self.fast_stop = False
        self.exit_code = WorkerExit.OK
        # Threads start on first use, in the worker (after fork); a subclass's shutdown()
        # shuts the pool down before it closes its store.
        self.executor = ThreadPoolExecutor(THREADS, thread_name_prefix=self.thread_prefix)

    # Life cycle ---------------------------------------------------------------------
    def run(self) -> int:
        """Run the worker until it is told to stop; return its exit code."""
        setproctitle.setproctitle(self.title)
        for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR2, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        # Ctrl-C in a terminal reaches the whole group; the master decides for everyone.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(self._main())
        except BootError as exc:
            log.error("%s failed to boot: %s", self.title, exc)
            return WorkerExit.BOOT_ERROR

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, self.handle_term)
        loop.add_signal_handler(signal.SIGQUIT, self.handle_quit)
        loop.add_signal_handler(signal.SIGHUP, self.handle_hup)
        await self.start()
        # The stats first: pmqctl status right after the node is ready shows them.
        stats = self.stats()
        send_event(self.status_fd, event="heartbeat", **stats)
        send_event(self.status_fd, event="ready", id=self.id)
        log.info("%s ready (pid %d)", self.title, self.pid)
        watchers = [
            self.supervise("status", lambda: self._heartbeat(stats)),
            self.supervise("parent-watch", self._watch_parent),
        ]
        await self.stopping.wait()
        for task in watchers:
            task.cancel()
        timeout = ORPHAN_DEADLINE if self.fast_stop else self.config.server.graceful_timeout
        try:
            await asyncio.wait_for(self.shutdown(fast=self.fast_stop), timeout)
        except TimeoutError:
            log.warning("%s: shutdown passed its %.1fs deadline", self.title, timeout)
        log.info("%s stopped (exit %d)", self.title, self.exit_code)
        return self.exit_code

    # Signals: each handler only records what to do ----------------------------------
    def handle_term(self) -> None:
        self.begin_stop(fast=False)

    def handle_quit(self) -> None:
        self.begin_stop(fast=True)

    def handle_hup(self) -> None:
        asyncio.get_running_loop().create_task(self._reload())

    def begin_stop(self, fast: bool) -> None:
        assert self.stopping is not None
        if self.stopping.is_set():
            return
        self.fast_stop = fast
        if fast:
            # A stuck loop must not keep an orphan alive: a thread ends it regardless.
            timer = threading.Timer(ORPHAN_DEADLINE + 0.3, os._exit, args=(self.exit_code,))
            timer.daemon = True
            timer.start()
        self.stopping.set()

    def supervise(self, name: str, loop: Loop, cap: float = RESTART_MAX) -> asyncio.Task[None]:
        """Start ``loop()`` as a task under :func:`supervise`; cancel the task to stop it.
        A loop that dies of an unexpected error takes the worker down (:meth:`loop_died`)."""
        return asyncio.create_task(supervise(name, loop, self.loop_died, cap), name=name)

    async def in_thread(self, func: Callable[..., T], *args: Any) -> T:
        """``func(*args)`` run on this worker's thread pool, never on the loop: for blocking
        work, the SQL store's calls above all."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, func, *args)

    def loop_died(self, name: str, exc: Exception) -> None:
        """Log the dead loop with its traceback and stop fast with a non-zero exit code: the
        master respawns a worker whose loops all run, rather than one serving without one."""
        log.critical(
            "%s (pid %d): loop %s died of %r; exiting for the master to respawn this worker",
            self.title,
            self.pid,
            name,
            exc,
            exc_info=exc,
        )
        self.exit_code = WorkerExit.LOOP_DIED
        self.begin_stop(fast=True)

    async def _reload(self) -> None:
        try:
            fresh, _ = configload.reloaded(self.config)  # the master logs what changed
            await self.reload(fresh)
            self.config = fresh  # only once all of it took: else the old settings stay
            logsetup.setup(fresh.log)
        except Exception as exc:
            log.error("%s: reload failed, keeping the old code: %s", self.title, exc)
            send_event(self.status_fd, event="reload", ok=False, error=f"{self.title}: {exc}")
        else:
            send_event(self.status_fd, event="reload", ok=True)

    # Liveness -----------------------------------------------------------------------
    async def _heartbeat(self, sent: dict[str, Any]) -> None:
        """Send the stats when they change from ``sent`` (looked at every
        STATS_POLL_SECONDS), and at least every HEARTBEAT_SECONDS."""
        at = time.monotonic()
        while True:
            await asyncio.sleep(STATS_POLL_SECONDS)
            stats, now = self.stats(), time.monotonic()
            if stats != sent or now - at >= HEARTBEAT_SECONDS:
                send_event(self.status_fd, event="heartbeat", **stats)
                sent, at = stats, now

    async def _watch_parent(self) -> None:
        while os.getppid() == self.ppid:
            await asyncio.sleep(PARENT_CHECK_SECONDS)
        log.warning("%s: master %d is gone, leaving", self.title, self.ppid)
        self.begin_stop(fast=True)

    # For subclasses -----------------------------------------------------------------
    @abc.abstractmethod
    async def start(self) -> None:
        """Connect and listen; raise BootError when that cannot work."""

    @abc.abstractmethod
    async def shutdown(self, fast: bool) -> None:
        """Stop in phases (docs/protocol.md, "Processes and control"); ``fast`` skips the
        niceties, not the cleanup."""

    async def reload(self, fresh: Config) -> None:  # noqa: B027 - optional hook
        """Re-import what can change without a restart, then hand the parts that keep a
        reloadable setting of their own its value in ``fresh`` (Config.RELOADABLE); raise,
        before changing anything, to keep the old state. ``self.config`` becomes ``fresh``
        once this returns."""

    def stats(self) -> dict[str, Any]:
        """Numbers for ``pmqctl status``, sent with every heartbeat."""
        return {}
