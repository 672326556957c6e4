"""Logging set-up: one line per event, plain text or JSON, tagged with the process title."""

from __future__ import annotations

import logging
import sys

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
    # websockets logs every failed handshake at INFO; keep the noise at WARNING.
    logging.getLogger("websockets").setLevel(logging.WARNING)
