"""HUP reload and USR2 rolling restart: the master's two ways to renew its workers.

A :class:`Rollout` holds what is under way; the master's loop moves it on
(:meth:`Rollout.check_reload`, :meth:`Rollout.step_rolling_restart`) and hands it the
workers' reload answers (:meth:`Rollout.answered`). Each command answers the pmqctl clients
waiting for it on the control socket when it is done.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import TYPE_CHECKING, Any

from pmq import configload
from pmq import log as logsetup
from pmq.config import Config
from pmq.errors import ConfigError
from pmq.workers.notify import notify

if TYPE_CHECKING:
    from pmq.workers.master import Master

log = logging.getLogger(__name__)

RELOAD_SECONDS = 10.0  # how long a reload waits for every worker's answer


class Rollout:
    """The reload and the rolling restart of one master's workers."""

    def __init__(self, master: Master) -> None:
        self.master = master
        self.replacing: dict[int, int] = {}  # old pid -> its replacement's, during USR2
        self.reload_pending: dict[int, dict[str, Any]] | None = None
        self.fresh: Config | None = None  # the config a reload under way read
        self.reload_deadline = 0.0

    def answered(self, pid: int, event: dict[str, Any]) -> None:
        """Worker ``pid`` reported its reload (``{"ok": ..., "error": ...}``)."""
        if self.reload_pending and pid in self.reload_pending:
            self.reload_pending[pid] = event

    def reload(self) -> None:
        """Read the config again (a bad file fails the reload before any worker sees it) and
        HUP every worker: they re-import handlers and apply its reloadable settings. Once
        every worker took them, the workers forked from then on get them too."""
        notify("RELOADING=1")
        try:
            self.fresh, needs_restart = configload.reloaded(self.master.config)
        except ConfigError as exc:
            log.error("reload: %s; keeping the running config", exc)
            notify("READY=1\nSTATUS=serving")
            self.master.control.finish("reload", {"ok": False, "error": str(exc)})
            return
        if needs_restart:
            log.warning("reload: %s changed; a restart applies it", ", ".join(needs_restart))
        log.info("reloading handlers in %d workers", len(self.master.workers))
        live = [w for w in self.master.workers.values() if not w.retiring]
        self.reload_pending = {w.pid: {} for w in live}
        self.reload_deadline = time.monotonic() + RELOAD_SECONDS
        for worker in live:
            self.master.kill(worker.pid, signal.SIGHUP)
        self.check_reload()

    def check_reload(self) -> None:
        pending = self.reload_pending
        if pending is None:
            return
        for pid in [pid for pid in pending if pid not in self.master.workers]:
            pending[pid] = {"ok": False, "error": f"worker {pid} exited during reload"}
        answered = all(pending.values())
        if not answered and time.monotonic() < self.reload_deadline:
            return
        errors = [
            e.get("error") or f"worker {pid} did not answer"
            for pid, e in pending.items()
            if not e.get("ok")
        ]
        self.reload_pending = None
        if not errors and self.fresh is not None:  # the settings workers forked later get
            self.master.config = self.fresh
            logsetup.setup(self.fresh.log)
        self.fresh = None
        notify("READY=1\nSTATUS=serving")
        for error in errors:
            log.error("reload: %s", error)
        self.master.control.finish(
            "reload", {"ok": not errors, "error": "; ".join(map(str, errors))}
        )

    def rolling_restart(self) -> None:
        """USR2: replace every worker. A new one starts for each slot at once; once all of
        them are ready, the old ones drain together, their listeners closing first, so their
        clients (close 1001) reconnect onto new workers only. Replaced one at a time, a
        client moved off the first old worker landed on another old one about as often as
        not, and was moved again when its turn came."""
        if self.replacing:
            log.info("rolling restart already under way")
            return
        log.info("rolling restart of %d workers", len(self.master.slots))
        for slot in self.master.slots:
            old = next(
                (
                    w
                    for w in self.master.workers.values()
                    if (w.kind, w.index) == slot and not w.retiring
                ),
                None,
            )
            if old is not None:
                self.replacing[old.pid] = self.master.spawn_worker(*slot).pid
        if not self.replacing:  # no live worker to replace (all just died): nothing to wait for
            self.master.control.finish("restart", {"ok": True})
            return
        self.step_rolling_restart()

    def step_rolling_restart(self) -> None:
        """Once every replacement is ready (or died: its slot keeps the old worker), TERM
        the old workers that have one and answer ``pmqctl restart``."""
        if not self.replacing:
            return
        new = {old: self.master.workers.get(pid) for old, pid in self.replacing.items()}
        if any(w is not None and not w.ready for w in new.values()):
            return
        for old_pid, replacement in new.items():
            old = self.master.workers.get(old_pid)
            if replacement is not None and old is not None:
                old.retiring = True
                self.master.kill(old_pid, signal.SIGTERM)
        self.replacing = {}
        self.master.control.finish("restart", {"ok": True})
