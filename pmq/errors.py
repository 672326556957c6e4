"""The exception tree and the process exit codes.

::

    PMQError                      base of everything PMQ raises on purpose
    ├── ConfigError               bad configuration file, key, type or value
    ├── AlreadyRunning            the pid file names a live master
    ├── NotRunning                no live master for this node
    ├── ControlError              the master's control socket failed or refused
    ├── StorageError              the SQL store failed (connect, schema, write)
    │   └── StorageDataError      the store refused the data itself: retrying cannot help
    ├── AuthError                 a token was refused (carries an HTTP status)
    └── ActionError               a client request failed (carries a reply code)
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """What ``pmq`` and ``pmqctl`` return to the shell."""

    OK = 0
    FAILURE = 1
    NOT_RUNNING = 3


class WorkerExit(enum.IntEnum):
    """Exit codes a worker uses to tell the master why it left."""

    OK = 0
    BOOT_ERROR = 3  # could not bind or connect at start: respawning will not help
    LOOP_DIED = 4  # a supervised loop died of an unexpected error: respawn a fresh worker


class PMQError(Exception):
    """Base class of every error PMQ raises on purpose."""


class ConfigError(PMQError):
    """The configuration is unusable; the message names the key."""


class AlreadyRunning(PMQError):
    """A live master already owns this node's pid file."""


class NotRunning(PMQError):
    """No live master answers for this node."""


class ControlError(PMQError):
    """The master's control socket failed or answered with an error."""


class StorageError(PMQError):
    """The SQL store could not do what was asked."""


class StorageDataError(StorageError):
    """The store refused the data of a call (a value out of range, a constraint): the same
    call fails the same way every time, unlike an outage, which a retry outlives."""


class AuthError(PMQError):
    """A client token was refused; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ActionError(PMQError):
    """A client request failed; ``code`` is the reply code (see protocol.Code)."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
