"""What the master settles before it forks: the checks and the shared state its workers
inherit (:func:`prepare`), and this node's processes left by an earlier master
(:func:`refuse_live_master`, :func:`stop_leftovers`).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import psutil

from pmq.config import Config
from pmq.domain.jwtauth import resolve_jwt_secret
from pmq.errors import AlreadyRunning
from pmq.store import open_store, sqlite_path
from pmq.workers import startcheck

log = logging.getLogger(__name__)


def prepare(config: Config) -> Config:
    """Settle what workers must share before the fork: the start-up checks (ConfigError
    listing every unsafe secret, open file mode or Redis setting PMQ cannot keep its
    promises on), the JWT secret, the embedded schema."""
    startcheck.require(config)
    if config.auth.mode == "jwt" and not config.auth.jwt_secret:
        secret = resolve_jwt_secret(config)
        config = dataclasses.replace(
            config, auth=dataclasses.replace(config.auth, jwt_secret=secret)
        )
    if sqlite_path(config.storage.url) is not None:
        store = open_store(config.storage)
        try:
            store.init_schema()
        finally:
            store.close()
    return config


def refuse_live_master(node: str) -> None:
    """AlreadyRunning when a master of ``node`` is alive."""
    for proc in node_processes(node):
        if proc.info["cmdline"] and proc.info["cmdline"][0].startswith("pmq: master"):
            raise AlreadyRunning(f"already running: master pid {proc.pid} [{node}]")


def stop_leftovers(node: str) -> None:
    """Stop workers of ``node`` left behind by a master that died."""
    leftovers = list(node_processes(node))
    if not leftovers:
        return
    for proc in leftovers:
        log.warning("stopping leftover %r (pid %d)", proc.info["cmdline"][0], proc.pid)
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(leftovers, timeout=3)
    for proc in alive:
        proc.kill()
    psutil.wait_procs(alive, timeout=3)


def node_processes(node: str) -> list[psutil.Process]:
    """The other PMQ processes of ``node``, known by their titles (``pmq: ... [node]``)."""
    suffix = f" [{node}]"
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"]
        if proc.pid == me or not cmdline:
            continue
        title = cmdline[0]
        if title.startswith("pmq: ") and title.endswith(suffix):
            found.append(proc)
    return found
