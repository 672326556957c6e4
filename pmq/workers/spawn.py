"""Forking one worker: the pipe it reports on, the child's life from import to exit, and
the master's record of it (:class:`WorkerState`).

The child imports its worker module only after the fork (the master never holds
pmq.reactor, pmq.tasks or pmq.handlers) and never returns: it exits with the worker's code,
WorkerExit.BOOT_ERROR when it could not even start.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any, NoReturn

from pmq.config import Config
from pmq.errors import WorkerExit
from pmq.workers.channel import LineReader

log = logging.getLogger(__name__)

WORKER_MODULES = {"socket": "pmq.workers.socket", "task": "pmq.workers.task"}
WITHDRAW_WAIT_SECONDS = 6.0  # the child's own deadline (withdraw.WITHDRAW_SECONDS) and a margin


def worker_id(node: str, kind: str, index: int, pid: int) -> str:
    """A worker's name in the registry and the cluster view."""
    return f"{node}:{kind}{index}:{pid}"


@dataclasses.dataclass
class WorkerState:
    """The master's record of one worker process: its slot, its report pipe, its liveness."""

    pid: int
    kind: str
    index: int
    fd: int
    started: float
    last_seen: float
    ready: bool = False
    retiring: bool = False
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    reader: LineReader = dataclasses.field(default_factory=LineReader)


def fork_worker(
    config: Config, kind: str, index: int, close_in_child: Callable[[], None]
) -> WorkerState:
    """Fork the ``kind`` worker (``socket`` or ``task``) numbered ``index``; the child first
    calls ``close_in_child`` to drop the master's descriptors. Returns the new worker's
    record, its pipe's read end non-blocking."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(write_fd, False)
    master_pid = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child never returns from here
        os.close(read_fd)
        close_in_child()
        run_child(config, kind, index, write_fd, master_pid)
    os.close(write_fd)
    os.set_blocking(read_fd, False)
    now = time.monotonic()
    return WorkerState(pid, kind, index, read_fd, started=now, last_seen=now)


def run_child(config: Config, kind: str, index: int, write_fd: int, master_pid: int) -> NoReturn:
    """In the forked child: import and run the worker, then exit with its code."""
    code: int = WorkerExit.BOOT_ERROR
    try:
        module = importlib.import_module(WORKER_MODULES[kind])
        code = module.run(config, index, write_fd, master_pid)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("pmq: %s worker #%d crashed", kind, index)
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)


def fork_withdraw(
    config: Config, worker_ids: list[str], close_in_child: Callable[[], None]
) -> None:
    """Remove the registry entries of the killed socket workers ``worker_ids`` in a child
    (pmq.workers.withdraw) and wait for it, WITHDRAW_WAIT_SECONDS at most."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)  # not the master's: they write to its pipe
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            close_in_child()
            code = importlib.import_module("pmq.workers.withdraw").run(config, worker_ids)
        except BaseException:
            log.exception("pmq: removing the killed workers' entries failed")
        finally:
            logging.shutdown()
            os._exit(code)
    deadline = time.monotonic() + WITHDRAW_WAIT_SECONDS
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)

