"""Events to the site (docs/webhooks.md), sans I/O: one event as the outbox keeps it, the body
of a POST, and its signature.

An event is one JSON object ``{"id", "type", "ts", "data"}``: ``id`` a random hex string the
site drops duplicates by, ``type`` one of :class:`EventType`, ``ts`` the unix time in
milliseconds it happened, ``data`` the type's fields. The producers (pmq.domain.events, and
the task worker's timers, pmq.tasks.webhooks) encode each event once with :func:`encode`; a
Lua script that queues one gets it in its ARGV as encoded here, or, when only the script
knows the data (which ids an ack removed), its id (:func:`new_id`) and time, and makes the
same object itself (pmq/redis/scripts/_event.lua). A POST's body is the events
as they were queued, joined (:func:`body`), and its ``X-PMQ-Signature`` header is
``sha256=`` and the hex HMAC-SHA256 of those exact bytes under ``webhooks.secret``
(:func:`signature`).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence
from typing import Any

import orjson

SIGNATURE_HEADER = "X-PMQ-Signature"


class EventType(enum.StrEnum):
    ONLINE = "user.online"
    OFFLINE = "user.offline"
    ACKED = "message.acked"
    READ = "message.read"
    UNDELIVERED = "message.undelivered"
    CS_ASSIGNED = "cs.assigned"
    CS_CLOSED = "cs.closed"


def encode(kind: EventType, data: dict[str, Any], ts_ms: int | None = None) -> bytes:
    """One event, with a new id, at ``ts_ms`` (default now)."""
    ts = int(time.time() * 1000) if ts_ms is None else ts_ms
    return orjson.dumps({"id": new_id(), "type": kind.value, "ts": ts, "data": data})


def new_id() -> str:
    """A new event id: random, so the site can drop a repeated event by it."""
    return secrets.token_hex(12)


def parse(raw: bytes) -> dict[str, Any]:
    """An encoded event back as its object (ValueError when it is not one)."""
    event = orjson.loads(raw)
    if not isinstance(event, dict) or not {"id", "type", "ts", "data"} <= event.keys():
        raise ValueError(f"not an event: {raw[:80]!r}")
    return event


def body(events: Sequence[bytes]) -> bytes:
    """A POST's body: ``{"events": [...]}`` around the encoded events, in order."""
    return b'{"events":[' + b",".join(events) + b"]}"


def signature(secret: str, payload: bytes) -> str:
    """The ``X-PMQ-Signature`` header's value for ``payload`` (the raw body)."""
    return "sha256=" + hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()
