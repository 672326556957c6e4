"""Logging set-up: one line per event, plain text or JSON, tagged with the process title."""

from __future__ import annotations

import logging
import sys
import time

import orjson

from pmq.config import LogConfig


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, process, msg and any ``extra`` fields."""

    RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        event = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        event.update({k: v for k, v in vars(record).items() if k not in self.RESERVED})
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(event, default=str).decode()


def setup(config: LogConfig) -> None:
    """Send every PMQ log line to stderr at the configured level (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    if config.json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    # picows logs every connection and disconnection at INFO; keep the noise at WARNING.
    logging.getLogger("pmq.reactor.picows").setLevel(logging.WARNING)


class Throttled:
    """A warning that may happen thousands of times a second (every request while Redis is
    away) logged at most once per ``every`` seconds, with how many it stood for, so an
    outage is seen in the log without burying it."""

    def __init__(self, logger: logging.Logger, every: float = 10.0) -> None:
        self.logger = logger
        self.every = every
        self.next_at = 0.0
        self.held = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.held += 1
            return
        more = f" (and {self.held} more like it in the last {self.every:g} s)" if self.held else ""
        self.logger.warning(msg + more, *args)
        self.held = 0
        self.next_at = now + self.every
