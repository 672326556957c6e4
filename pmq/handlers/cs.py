"""Customer-service chat actions: cs.open, cs.send, cs.close, cs.history, cs.sessions.

Input is checked here (a 400 names the field); who may do what to a session is decided
atomically in Redis by pmq.domain.chat (404 unknown session, 403 not a party, 409 closed).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from pmq.errors import ActionError
from pmq.handlers.base import App, Caller, Handler, bad_request, int_field
from pmq.wire.client import MAX_ID, Code, Role, is_uid

MAX_TEXT = 4000  # characters
MAX_URL = 2048
MAX_DIMENSION = 100_000  # pixels
HISTORY_DEFAULT = 50
HISTORY_MAX = 100
IMAGE_FIELDS = frozenset({"url", "width", "height"})


def is_agent(caller: Caller) -> bool:
    return caller.identity.role is Role.AGENT


def session_field(data: dict[str, Any]) -> str:
    """The required ``session_id`` as a canonical decimal string."""
    value: Any = data.get("session_id")
    if not is_uid(value):
        raise bad_request("session_id: must be a session id (a string of digits)")
    return str(int(value))


def image_field(image: Any) -> dict[str, Any]:
    """``{"url": http(s) URL, "width"?, "height"?}`` checked and copied."""
    if not isinstance(image, dict):
        raise bad_request('image: must be an object like {"url": "https://..."}')
    unknown = sorted(set(image) - IMAGE_FIELDS)
    if unknown:
        raise bad_request(f"image.{unknown[0]}: unknown field")
    url = image.get("url")
    if not isinstance(url, str) or not 0 < len(url) <= MAX_URL:
        raise bad_request(f"image.url: must be a URL of at most {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        web = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. a bad port or IPv6 literal
        web = False
    if not web or not url.isascii() or any(c.isspace() or ord(c) < 32 for c in url):
        raise bad_request("image.url: must be an http or https URL")
    checked: dict[str, Any] = {"url": url}
    for name in ("width", "height"):
        if name in image:
            size = image[name]
            if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_DIMENSION:
                raise bad_request(f"image.{name}: must be an integer from 1 to {MAX_DIMENSION}")
            checked[name] = size
    return checked


def content_field(data: dict[str, Any]) -> dict[str, Any]:
    """Exactly one of ``text`` (1..MAX_TEXT characters) or ``image``."""
    if ("text" in data) == ("image" in data):
        raise bad_request("text or image: send exactly one of them")
    if "image" in data:
        return {"image": image_field(data["image"])}
    text = data["text"]
    if not isinstance(text, str) or not 0 < len(text) <= MAX_TEXT or not text.strip():
        raise bad_request(f"text: must be 1 to {MAX_TEXT} characters, not only blanks")
    return {"text": text}


async def open_session(app: App, caller: Caller, data: dict[str, Any]) -> dict[str, Any]:
    """A user's open session, or a new one: assigned to an agent or queued."""
    if is_agent(caller):
        raise ActionError(Code.FORBIDDEN, "cs.open: agents answer sessions, users open them")
    return await app.chat.open(caller.uid)


async def send(app: App, caller: Caller, data: dict[str, Any]) -> dict[str, Any]:
    """Send text or an image to the other party of an open session; {"id"} of the message."""
    session_id = session_field(data)
    content = content_field(data)
    return {"id": await app.chat.send(caller.uid, session_id, content)}


async def close(app: App, caller: Caller, data: dict[str, Any]) -> dict[str, Any]:
    """Close a session (either party); both get cs.closed."""
    session_id = session_field(data)
    await app.chat.close(session_id, caller.uid)
    return {"session_id": session_id}


async def history(app: App, caller: Caller, data: dict[str, Any]) -> dict[str, Any]:
    """Messages of one session (``session_id``; the reply also describes the session) or of
    every session with ``peer``, newest first, with ids below ``before``, at most ``limit``."""
    before = int_field(data, "before", 0, 0, MAX_ID)
    limit = int_field(data, "limit", HISTORY_DEFAULT, 1, HISTORY_MAX)
    if data.get("session_id") is not None:
        session_id = session_field(data)
        return await app.chat.history(caller.uid, session_id, before, limit)
    peer = data.get("peer")
    if peer is None:
        raise bad_request("session_id or peer: one is required")
    if not is_uid(peer):
        raise bad_request("peer: must be a uid")
    peer = str(int(peer))
    user, agent = (peer, caller.uid) if is_agent(caller) else (caller.uid, peer)
    return {"messages": await app.chat.history_with(user, agent, before, limit)}


async def sessions(app: App, caller: Caller, data: dict[str, Any]) -> dict[str, Any]:
    """An agent's open sessions with their last messages, and the queue's length."""
    if not is_agent(caller):
        raise ActionError(Code.FORBIDDEN, "cs.sessions: for agents only")
    return await app.chat.sessions(caller.uid)


ACTIONS: dict[str, Handler] = {
    "cs.open": open_session,
    "cs.send": send,
    "cs.close": close,
    "cs.history": history,
    "cs.sessions": sessions,
}
