"""Token verification: who is behind a client token, and the contract its verifiers keep.

A client token becomes an :class:`Identity` through an :class:`Authenticator`; two exist:
the local HS256 JWT check (:mod:`pmq.domain.jwtauth`, ``auth.mode = jwt``) and the site's user
centre behind a Redis cache (:mod:`pmq.domain.usercentre`, ``auth.mode = http``);
:func:`pmq.domain.authmode.make_authenticator` picks the one the configuration names.

Both answer an :class:`Identity` or raise :class:`AuthError` carrying the HTTP status to
refuse the handshake with: 401 for a bad token, 503 when the user centre or Redis cannot
answer. Both honour kicks (:meth:`Authenticator.revoke`, pmq.domain.kicks): a JWT issued before the
user's last kick is refused; the user centre's cached answers for a kicked user are dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from pmq.errors import AuthError
from pmq.wire.client import Role, is_uid

MAX_TOKEN = 4096  # bytes; longer tokens are refused before any work is done
CLOCK_LEEWAY = 30  # seconds of clock skew tolerated between the minting host and this node
_ROLES = frozenset(r.value for r in Role)


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated client: ``uid`` a canonical decimal string (1 to 2^63-1), its
    groups, its role."""

    uid: str
    groups: tuple[str, ...] = ()
    role: Role = Role.USER


class Authenticator(Protocol):
    """Turns a client token into an :class:`Identity` or raises :class:`AuthError`."""

    async def authenticate(self, token: str) -> Identity: ...

    async def revoke(self, uid: str) -> None:
        """After a kick of ``uid``: refuse the tokens it revokes, on every node."""
        ...

    async def close(self) -> None: ...


def make_identity(uid: object, groups: object = None, role: object = None) -> Identity:
    """Check claims from a token or a user-centre answer; ValueError says what is wrong.

    ``uid`` must be an int or a string of digits in 1..2^63-1 (the range storage keeps);
    ``groups`` absent or a list of strings; ``role`` absent or a :class:`Role` value.
    """
    if not is_uid(uid):
        raise ValueError("uid must be an integer from 1 to 2^63-1")
    if groups is None:
        groups = []
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise ValueError("groups must be a list of strings")
    role = Role.USER.value if role is None else role
    if not isinstance(role, str) or role not in _ROLES:
        raise ValueError(f"unknown role {role!r}")
    return Identity(uid=str(int(str(uid))), groups=tuple(groups), role=Role(role))


def check_token_shape(token: str) -> None:
    """AuthError(401) for an empty token or one longer than MAX_TOKEN, before any work."""
    if not token:
        raise AuthError(401, "missing token")
    if len(token) > MAX_TOKEN:
        raise AuthError(401, "token too long")
