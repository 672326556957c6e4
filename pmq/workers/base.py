"""The worker base shared by socket and task workers: title, signals, liveness both ways.

A worker runs one asyncio loop (uvloop). It tells the master it is alive by writing a
heartbeat event to its status pipe every second, and it leaves by itself when its parent
changes (the master died). Subclasses implement :meth:`start`, :meth:`shutdown` and
optionally :meth:`reload` and :meth:`stats`.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import signal
import threading
import time
from typing import Any

import setproctitle
import uvloop

from pmq.config import Config
from pmq.errors import WorkerExit
from pmq.workers.channel import send_event

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
PARENT_CHECK_SECONDS = 0.25
ORPHAN_DEADLINE = 1.5  # seconds an orphan may spend cleaning up before it is gone


class BootError(Exception):
    """The worker cannot start (port taken, Redis unreachable); the master gives up."""


class Worker(abc.ABC):
    kind: str = "worker"

    def __init__(self, config: Config, index: int, status_fd: int, ppid: int) -> None:
        self.config = config
        self.index = index
        self.status_fd = status_fd
        self.ppid = ppid
        self.pid = os.getpid()
        self.started = time.time()
        self.id = f"{config.server.node}:{self.kind}{index}:{self.pid}"
        self.title = f"pmq: {self.kind} worker #{index} [{config.server.node}]"
        self.stopping: asyncio.Event | None = None
        self.fast_stop = False

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
        send_event(self.status_fd, event="ready", id=self.id)
        log.info("%s ready (pid %d)", self.title, self.pid)
        watchers = [
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
            asyncio.create_task(self._watch_parent(), name="parent-watch"),
        ]
        await self.stopping.wait()
        for task in watchers:
            task.cancel()
        timeout = ORPHAN_DEADLINE if self.fast_stop else self.config.server.graceful_timeout
        try:
            await asyncio.wait_for(self.shutdown(fast=self.fast_stop), timeout)
        except TimeoutError:
            log.warning("%s: shutdown passed its %.1fs deadline", self.title, timeout)
        log.info("%s stopped", self.title)
        return WorkerExit.OK

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
            timer = threading.Timer(ORPHAN_DEADLINE + 0.3, os._exit, args=(WorkerExit.OK,))
            timer.daemon = True
            timer.start()
        self.stopping.set()

    async def _reload(self) -> None:
        try:
            await self.reload()
        except Exception as exc:
            log.error("%s: reload failed, keeping the old code: %s", self.title, exc)
            send_event(self.status_fd, event="reload", ok=False, error=f"{self.title}: {exc}")
        else:
            send_event(self.status_fd, event="reload", ok=True)

    # Liveness -----------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        while True:
            send_event(self.status_fd, event="heartbeat", **self.stats())
            await asyncio.sleep(HEARTBEAT_SECONDS)

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
        """Stop in phases (SPEC 1); ``fast`` skips the niceties, not the cleanup."""

    async def reload(self) -> None:  # noqa: B027 - optional hook
        """Re-read what can change without a restart; raise to keep the old state."""

    def stats(self) -> dict[str, Any]:
        """Numbers for ``pmqctl status``, sent with every heartbeat."""
        return {}
