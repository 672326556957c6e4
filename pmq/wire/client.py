"""The client wire format, sans I/O: frames in as bytes or text, values out, and back.

Nothing here touches a socket. The gateway calls :func:`parse_request` on every text frame
and the ``encode_*`` functions to build what it sends; every frame is one JSON object. A
message as clients see it is a :class:`Message`, encoded once per message
(:meth:`Message.encode`) and wrapped in its push frame by :func:`push_frame` for every
socket (docs/protocol.md).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Any, NamedTuple

import orjson

KIND_PATTERN = re.compile(r"[a-z_]{1,32}")
MAX_REQUEST_ID = 64  # characters
MAX_ID = 2**63 - 1  # the largest uid or message id (a signed 64-bit integer)


class Code(enum.IntEnum):
    """Reply codes (HTTP's, so the site's developers know them already)."""

    OK = 200
    ACCEPTED = 202
    BAD_REQUEST = 400
    UNAUTHORIZED = 401
    FORBIDDEN = 403
    NOT_FOUND = 404
    CONFLICT = 409
    TOO_LARGE = 413
    RATE_LIMITED = 429
    SERVER_ERROR = 500
    UNAVAILABLE = 503


MESSAGES = {
    Code.OK: "OK",
    Code.ACCEPTED: "Accepted",
    Code.BAD_REQUEST: "Bad Request",
    Code.UNAUTHORIZED: "Unauthorized",
    Code.FORBIDDEN: "Forbidden",
    Code.NOT_FOUND: "Not Found",
    Code.CONFLICT: "Conflict",
    Code.TOO_LARGE: "Payload Too Large",
    Code.RATE_LIMITED: "Too Many Requests",
    Code.SERVER_ERROR: "Internal Server Error",
    Code.UNAVAILABLE: "Service Unavailable",
}


class CloseCode(enum.IntEnum):
    """WebSocket close codes PMQ sends."""

    GOING_AWAY = 1001  # graceful stop or rolling restart: reconnect
    PROTOCOL_ERROR = 1002  # a frame RFC 6455 does not allow where it came
    INVALID_DATA = 1007  # a text message that is not UTF-8
    POLICY_VIOLATION = 1008  # send buffer over server.max_pending, or silent too long
    MESSAGE_TOO_BIG = 1009  # frame over server.max_frame
    INTERNAL_ERROR = 1011
    KICKED = 4001  # the site asked to close this user's connections
    TOO_MANY_CONNECTIONS = 4008  # the user opened more than server.max_connections_per_user


class Kind(enum.StrEnum):
    """Message kinds with a meaning of their own; any KIND_PATTERN name is also allowed."""

    COMMENT = "comment"
    NOTICE = "notice"
    LETTER = "letter"
    SYSTEM = "system"
    CS = "cs"


UNREAD_KINDS: tuple[str, ...] = tuple(k.value for k in Kind)


class Role(enum.StrEnum):
    USER = "user"
    AGENT = "agent"


class FrameType(enum.StrEnum):
    HELLO = "hello"
    REPLY = "reply"
    PUSH = "push"
    UNREAD = "unread"
    CS_ASSIGNED = "cs.assigned"
    CS_CLOSED = "cs.closed"
    INBOX_MORE = "inbox.more"  # the connect's replay stopped at its bound: msg.pull the rest
    REVOKE = "revoke"  # a message or broadcast was retracted: drop it (its "id")
    UPDATE = "update"  # a message was edited: its "msg" replaces the one of the same id


class ProtocolError(Exception):
    """A frame that cannot be served; answered with ``code`` and kept open."""

    def __init__(self, code: Code, msg: str, request_id: str | None = None) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.request_id = request_id


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    id: str | None
    action: str
    data: dict[str, Any]


def parse_request(frame: str | bytes) -> Request:
    """Decode one client frame; raise ProtocolError(400) naming what is wrong."""
    try:
        value = orjson.loads(frame)
    except orjson.JSONDecodeError:
        raise ProtocolError(Code.BAD_REQUEST, "frame is not valid JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError(Code.BAD_REQUEST, "frame must be a JSON object")
    request_id = value.get("id")
    if isinstance(request_id, int) and not isinstance(request_id, bool):
        request_id = str(request_id)
    if request_id is not None and (
        not isinstance(request_id, str) or len(request_id) > MAX_REQUEST_ID
    ):
        raise ProtocolError(Code.BAD_REQUEST, f"id: must be a string of at most {MAX_REQUEST_ID}")
    action = value.get("action")
    if not isinstance(action, str) or not action:  # any other name: 404 if unknown
        raise ProtocolError(Code.BAD_REQUEST, "action: missing or not a string", request_id)
    data = value.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProtocolError(Code.BAD_REQUEST, "data: must be an object", request_id)
    return Request(request_id, action, data)


def dumps(value: Any) -> bytes:
    """JSON-encode a frame (UTF-8 bytes, sent as a text frame)."""
    return orjson.dumps(value)


def encode_hello(conn_id: str, uid: str, heartbeat: float) -> bytes:
    interval: float | int = int(heartbeat) if heartbeat == int(heartbeat) else heartbeat
    return dumps({"type": FrameType.HELLO, "conn_id": conn_id, "uid": uid, "heartbeat": interval})


def encode_reply(
    request_id: str | None,
    code: Code | int = Code.OK,
    msg: str | None = None,
    data: dict[str, Any] | None = None,
) -> bytes:
    code = Code(code)
    return dumps(
        {
            "type": FrameType.REPLY,
            "id": request_id,
            "code": int(code),
            "msg": MESSAGES[code] if msg is None else msg,
            "data": {} if data is None else data,
        }
    )


PUSH_PREFIX = b'{"type":"push","msg":'
ID_PREFIX = PUSH_PREFIX + b'{"id":"'  # every message's JSON opens with its id


# The recipient of a message made before a script names it (chat_send: the sender's peer).
LATER_RECIPIENT = "\0recipient\0"
_LATER_RECIPIENT_JSON = orjson.dumps(LATER_RECIPIENT)


def around_recipient(encoded: bytes) -> tuple[bytes, bytes]:
    """``encoded`` (a message made with ``to`` = LATER_RECIPIENT, or a storage op holding
    one) as the bytes before and after its recipient, for a script to put the recipient's
    JSON string between. The first stand-in is the ``to``: only ``id``, ``kind`` and
    ``from`` come before it, and a uid is digits only."""
    before, after = encoded.split(_LATER_RECIPIENT_JSON, 1)
    return before, after


def message_id_of(payload: bytes) -> int:
    """The id of the message a push frame carries, or 0 for any other frame. A push frame
    whose id is not a number raises ValueError."""
    if not payload.startswith(ID_PREFIX):
        return 0
    start = len(ID_PREFIX)
    return int(payload[start : payload.index(b'"', start)])


def push_frame(message_json: bytes) -> bytes:
    """The push frame around a message's JSON (:meth:`Message.encode`, or a message as
    stored): the message is encoded once, the frame made for every socket."""
    return PUSH_PREFIX + message_json + b"}"


def push_of(message: dict[str, Any]) -> tuple[bytes, int]:
    """The push frame of a message read back as a JSON object, and its id."""
    return push_frame(orjson.dumps(message)), int(message["id"])


class Message(NamedTuple):
    """A message as clients see it, the ``msg`` of a push frame (docs/protocol.md). A named
    tuple: a publish makes one per recipient, and a frozen dataclass's __init__ sets every
    field through object.__setattr__. A broadcast has no ``to`` and names its ``group``."""

    id: int
    kind: str
    sender: str | None
    to: str | None
    body: Any
    ts: int
    group: str | None = None

    def wire(self) -> dict[str, Any]:
        """The message as a JSON object; its id comes first (:func:`message_id_of`)."""
        if self.group is None:
            return {
                "id": str(self.id),
                "kind": self.kind,
                "from": self.sender,
                "to": self.to,
                "body": self.body,
                "ts": self.ts,
            }
        return {
            "id": str(self.id),
            "kind": self.kind,
            "from": self.sender,
            "to": self.to,
            "group": self.group,
            "body": self.body,
            "ts": self.ts,
        }

    def encode(self) -> bytes:
        """The message's JSON, to wrap with :func:`push_frame` and to store."""
        return orjson.dumps(self.wire())

    @property
    def counts_unread(self) -> bool:
        """A comment on one's own content counts nothing."""
        return not (self.kind == Kind.COMMENT and self.sender == self.to)


def stored_message(
    message_id: int, kind: str, sender: int | None, to: int, body_json: str, ts: int
) -> dict[str, Any]:
    """A message kept in storage (ids as integers, the body as JSON text) as clients see it."""
    return Message(
        message_id,
        kind,
        None if sender is None else str(sender),
        str(to),
        orjson.loads(body_json),
        ts,
    ).wire()


def encode_event(frame_type: FrameType, **fields: Any) -> bytes:
    """A server event such as ``unread``, ``cs.assigned`` or ``cs.closed``."""
    return dumps({"type": frame_type, **fields})


def is_kind(value: object) -> bool:
    return isinstance(value, str) and KIND_PATTERN.fullmatch(value) is not None


def is_uid(value: object) -> bool:
    """A uid is a positive integer, sent as a number or a string of digits."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return 0 < value <= MAX_ID
    # isascii: str.isdigit() also accepts "²" and "١٢٣"; length first: int() of a huge
    # string is slow and raises past 4300 digits.
    return (
        isinstance(value, str)
        and len(value) < 20
        and value.isascii()
        and value.isdigit()
        and 0 < int(value) <= MAX_ID
    )
