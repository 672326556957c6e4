"""Verifying an HS256 JWT the way PyJWT 2.15's ``jwt.decode`` does, for a sixth of its CPU time.

:func:`verify` is what every WebSocket connect runs (through pmq.domain.jwtauth). It accepts
and refuses exactly the tokens ``jwt.decode(token, key, algorithms=["HS256"], leeway=...,
issuer=..., audience=..., options={"require": ..., "verify_sub": False, "verify_aud":
audience is not None})`` accepts and refuses, returns the same claims, and raises, in the
same order, the same category of error with PyJWT's own wording (tests/test_hs256.py holds it
to that). What PyJWT spends its time on is done once (the key, by the caller), by C code
(the base64 alphabet check, orjson), or not again (the checks of the usual header).

Left out, as that call never reaches them: other algorithms, detached payloads (a ``b64:
false`` header is refused as PyJWT refuses it without one), keys given as PyJWK objects.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
import time
from collections.abc import Sequence
from typing import Any

import orjson

ALGORITHM = "HS256"

# Base64url: what may remain of a segment once its '=' padding is stripped.
_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_URL_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
# The last character of a segment 2 or 3 (mod 4) long carries 4 or 2 bits beyond the
# data; PyJWT refuses a segment unless they are zero (it encodes again and compares).
_LAST_CHARACTERS = {2: b"AQgw", 3: b"AEIMQUYcgkosw048"}

# The header PyJWT writes for HS256 (pmq.domain.jwtauth.mint_token, most clients): it passes
# every header check, so none is made again.
_USUAL_HEADER = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")

# Where orjson and json.loads (PyJWT's parser) could part: orjson turns integers past 64
# bits into floats, and takes up to 1,024 levels of nesting where json.loads may hit the
# recursion limit first. Such text goes to json.loads, as does any orjson refuses (NaN,
# lone surrogates, a BOM, UTF-16: json.loads takes those and words its own errors).
_LONG_NUMBER = re.compile(rb"[0-9]{19}")
_MAX_OPENINGS = 256


class Refused(Exception):
    """The token is refused; ``str()`` is PyJWT's wording of the reason."""


class Malformed(Refused):
    """Anything PyJWT raises as a plain InvalidTokenError or DecodeError (bad base64 or
    JSON, an algorithm other than HS256, a claim of the wrong type, a token not yet valid)."""


class BadSignature(Refused):
    """The signature is not the key's (PyJWT's InvalidSignatureError)."""


class Expired(Refused):
    """``exp`` has passed, leeway included (ExpiredSignatureError)."""


class IssuerRefused(Refused):
    """``iss`` is not a string or not the issuer wanted (InvalidIssuerError)."""


class AudienceRefused(Refused):
    """``aud`` is not of the right shape or not the audience wanted (InvalidAudienceError)."""


class MissingClaim(Refused):
    """A required claim is absent or null (MissingRequiredClaimError)."""

    def __init__(self, claim: str) -> None:
        super().__init__(claim)
        self.claim = claim

    def __str__(self) -> str:
        return f'Token is missing the "{self.claim}" claim'


def verify(
    token: str,
    key: bytes,
    *,
    leeway: float = 0,
    issuer: str | None = None,
    audience: str | None = None,
    require: Sequence[str] = (),
    now: float | None = None,
) -> dict[str, Any]:
    """The claims of ``token``, an HS256 JWT signed with ``key``; a :class:`Refused` when it
    is malformed, not HS256, badly signed, expired or not yet valid (``leeway`` seconds
    allowed each way), lacks a claim of ``require``, or has an ``iss`` other than
    ``issuer`` or an ``aud`` without ``audience`` (each checked only when not None).
    ``now``: the time to judge by, the clock's by default."""
    signing_input, payload, signature = _load(token.encode("utf-8"))
    if not hmac.compare_digest(signature, hmac.digest(key, signing_input, "sha256")):
        raise BadSignature("Signature verification failed")
    claims = _parse(payload, "payload")
    _check_claims(claims, time.time() if now is None else now, leeway, require)
    if issuer is not None:
        _check_issuer(claims, issuer)
    if audience is not None:
        _check_audience(claims, audience)
    if "jti" in claims and not isinstance(claims["jti"], str):
        raise Malformed("JWT ID must be a string")
    return claims


def _load(token: bytes) -> tuple[bytes, bytes, bytes]:
    """(signing input, payload bytes, signature) once the header allows HS256, with
    PyJWT's checks in PyJWT's order (PyJWS._load, decode_complete, _verify_signature)."""
    try:
        signing_input, crypto_segment = token.rsplit(b".", 1)
        header_segment, payload_segment = signing_input.split(b".", 1)
    except ValueError:
        raise Malformed("Not enough segments") from None
    if header_segment == _USUAL_HEADER:
        return (
            signing_input,
            _segment(payload_segment, "payload"),
            _segment(crypto_segment, "crypto"),
        )
    header = _parse(_segment(header_segment, "header"), "header")
    detached = header.get("b64", True) is False
    if detached:
        if payload_segment:
            raise Malformed("Payload segment must be empty when 'b64' is false.")
        payload = b""
    else:
        payload = _segment(payload_segment, "payload")
    signature = _segment(crypto_segment, "crypto")
    _check_header(header)
    if detached:
        crit = header.get("crit") or []
        if not isinstance(crit, list) or "b64" not in crit:
            raise Malformed("The 'b64' header parameter requires 'b64' to be listed in 'crit'.")
        raise Malformed(
            'It is required that you pass in a value for the "detached_payload" argument '
            "to decode a message having the b64 header set to false."
        )
    if "alg" not in header:
        raise Malformed("Algorithm not specified")
    if header["alg"] != ALGORITHM:
        raise Malformed("The specified alg value is not allowed")
    return signing_input, payload, signature


def _segment(segment: bytes, name: str) -> bytes:
    """The bytes of one base64url segment: at most two '=' and only with a length that is
    a multiple of 4, nothing outside the alphabet, no stray bits in the last character."""
    stripped = segment.rstrip(b"=")
    padding = len(segment) - len(stripped)
    rest = len(stripped) % 4
    if (
        padding > 2
        or (padding and len(segment) % 4)
        or rest == 1
        or stripped.translate(None, _ALPHABET)  # what is left is outside the alphabet
        or (rest and stripped[-1] not in _LAST_CHARACTERS[rest])
    ):
        raise Malformed(f"Invalid {name} padding")
    return binascii.a2b_base64(stripped.translate(_URL_TO_STANDARD) + b"=" * (-rest % 4))


def _parse(data: bytes, name: str) -> dict[str, Any]:
    """``data`` as the JSON object json.loads makes of it (orjson when that gives the same)."""
    value: Any = None
    parsed = False
    if data.count(b"[") + data.count(b"{") <= _MAX_OPENINGS and _LONG_NUMBER.search(data) is None:
        try:
            value, parsed = orjson.loads(data), True
        except orjson.JSONDecodeError:
            pass  # json.loads decides, and words the error
    if not parsed:
        try:
            value = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise Malformed(f"Invalid {name} string: {exc}") from None
    if not isinstance(value, dict):
        raise Malformed(f"Invalid {name} string: must be a json object")
    return value


def _check_header(header: dict[str, Any]) -> None:
    """PyJWS._validate_headers: ``kid`` a string, ``crit`` naming only ``b64``, present."""
    if "kid" in header and not isinstance(header["kid"], str):
        raise Malformed("Key ID header parameter must be a string")
    if "crit" not in header:
        return
    crit = header["crit"]
    if not isinstance(crit, list) or not crit:
        raise Malformed("Invalid 'crit' header: must be a non-empty list")
    for extension in crit:
        if not isinstance(extension, str):
            raise Malformed("Invalid 'crit' header: values must be strings")
        if extension != "b64":
            raise Malformed(f"Unsupported critical extension: {extension}")
        if extension not in header:
            raise Malformed(f"Critical extension '{extension}' is missing from headers")


def _check_claims(
    claims: dict[str, Any], now: float, leeway: float, require: Sequence[str]
) -> None:
    """Required claims, then iat, nbf, exp: int() of each must work (PyJWT lets strings of
    digits, floats and booleans through), a future iat is refused like a future nbf."""
    for claim in require:
        if claims.get(claim) is None:
            raise MissingClaim(claim)
    if "iat" in claims and _integer(claims, "iat", "Issued At") > now + leeway:
        raise Malformed("The token is not yet valid (iat)")
    if "nbf" in claims and _integer(claims, "nbf", "Not Before") > now + leeway:
        raise Malformed("The token is not yet valid (nbf)")
    if "exp" in claims and _integer(claims, "exp", "Expiration Time") <= now - leeway:
        raise Expired("Signature has expired")


def _integer(claims: dict[str, Any], name: str, title: str) -> int:
    """int() of a time claim, as PyJWT takes it; Malformed in PyJWT's words if it fails."""
    try:
        return int(claims[name])
    except (ValueError, TypeError, OverflowError):
        raise Malformed(f"{title} claim ({name}) must be an integer.") from None


def _check_issuer(claims: dict[str, Any], issuer: str) -> None:
    if "iss" not in claims:
        raise MissingClaim("iss")
    if not isinstance(claims["iss"], str):
        raise IssuerRefused("Payload Issuer (iss) must be a string")
    if claims["iss"] != issuer:
        raise IssuerRefused("Invalid issuer")


def _check_audience(claims: dict[str, Any], audience: str) -> None:
    """``aud``: the audience, or a list of strings holding it (PyJWT, strict_aud off)."""
    if not claims.get("aud"):
        raise MissingClaim("aud")
    wanted = claims["aud"]
    if isinstance(wanted, str):
        wanted = [wanted]
    if not isinstance(wanted, list) or any(not isinstance(a, str) for a in wanted):
        raise AudienceRefused("Invalid claim format in token")
    if audience not in wanted:
        raise AudienceRefused("Audience doesn't match")
