"""The master's pid file: written at start, removed at stop, checked for a live owner."""

from __future__ import annotations

import os
from pathlib import Path

import psutil

from pmq.errors import AlreadyRunning


def read(path: str) -> int | None:
    """The pid the file names, or None when it is absent or unreadable."""
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def live_master(path: str) -> int | None:
    """The pid of a running PMQ master named by the file, else None (stale or absent)."""
    pid = read(path)
    if pid is None or pid == os.getpid():
        return None
    try:
        title = " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return pid if title.startswith("pmq: master") else None


def create(path: str) -> None:
    """Write our pid; raise AlreadyRunning when a live master owns the file."""
    owner = live_master(path)
    if owner is not None:
        raise AlreadyRunning(f"already running: master pid {owner} ({path})")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    Path(tmp).write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)


def remove(path: str) -> None:
    """Remove the file if it still names this process (idempotent)."""
    if read(path) == os.getpid():
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
