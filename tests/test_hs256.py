"""pmq.domain.hs256 against PyJWT: for every token drawn here, ``verify`` and ``jwt.decode``
(called as JwtAuthenticator called it) agree on accept or refuse, on the kind of refusal and
its wording, and on the claims, types included; and JwtAuthenticator gives the AuthErrors
it gave with PyJWT.

Both are judged at the same instant: PyJWT's clock (``datetime.now`` in jwt.api_jwt) is
stopped at the ``now`` handed to ``verify``, so exp, nbf and iat are drawn on and around
the boundaries, leeway included.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import time
import warnings
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import jwt
import jwt.api_jwt
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from jwt.algorithms import HMACAlgorithm

from pmq.config import AuthConfig
from pmq.domain import hs256
from pmq.domain.auth import CLOCK_LEEWAY
from pmq.domain.jwtauth import JwtAuthenticator
from pmq.errors import AuthError, ConfigError
from tests.test_fuzz_kit import JSON, SCALARS

KEY = b"test-secret-" + b"x" * 40
NOW = 1_800_000_000.0
ISSUER, AUDIENCE = "site", "pmq"
GOOD_HEADER = b'{"alg":"HS256","typ":"JWT"}'

Outcome = tuple[str, Any]  # ("ok", repr of the claims) or (kind of refusal, its wording)


# The two verifiers, their answers in one shape ---------------------------------------------


class _StoppedClock(datetime):
    at = NOW

    @classmethod
    def now(cls, tz: Any = None) -> Any:
        return datetime.fromtimestamp(cls.at, tz)


@contextlib.contextmanager
def pyjwt_clock_at(now: float) -> Iterator[None]:
    """PyJWT's ``now`` (datetime.now(tz=utc).timestamp()) is ``now`` within the block."""
    assert datetime.fromtimestamp(now, UTC).timestamp() == now
    _StoppedClock.at = now
    saved = jwt.api_jwt.datetime
    jwt.api_jwt.datetime = _StoppedClock  # type: ignore[misc]
    try:
        yield
    finally:
        jwt.api_jwt.datetime = saved  # type: ignore[misc]


def by_pyjwt(
    token: str,
    key: bytes = KEY,
    *,
    leeway: float = CLOCK_LEEWAY,
    issuer: str | None = None,
    audience: str | None = None,
    require: Sequence[str] = ("sub", "exp"),
    now: float = NOW,
) -> Outcome:
    """What jwt.decode makes of ``token``, called as JwtAuthenticator called it."""
    options: Any = {
        "require": list(require),
        "verify_sub": False,
        "verify_aud": audience is not None,
    }
    try:
        with pyjwt_clock_at(now), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # InsecureKeyLengthWarning for short keys
            claims = jwt.decode(
                token,
                key,
                algorithms=["HS256"],
                leeway=leeway,
                issuer=issuer,
                audience=audience,
                options=options,
            )
    except jwt.ExpiredSignatureError as exc:
        return "expired", str(exc)
    except jwt.InvalidSignatureError as exc:
        return "signature", str(exc)
    except jwt.InvalidIssuerError as exc:
        return "issuer", str(exc)
    except jwt.InvalidAudienceError as exc:
        return "audience", str(exc)
    except jwt.MissingRequiredClaimError as exc:
        return "missing", (exc.claim, str(exc))
    except jwt.InvalidTokenError as exc:
        return "malformed", str(exc)
    return "ok", repr(claims)  # repr: 1, 1.0 and True differ, NaN equals itself


def by_hs256(
    token: str,
    key: bytes = KEY,
    *,
    leeway: float = CLOCK_LEEWAY,
    issuer: str | None = None,
    audience: str | None = None,
    require: Sequence[str] = ("sub", "exp"),
    now: float = NOW,
) -> Outcome:
    try:
        claims = hs256.verify(
            token,
            key,
            leeway=leeway,
            issuer=issuer,
            audience=audience,
            require=require,
            now=now,
        )
    except hs256.Expired as exc:
        return "expired", str(exc)
    except hs256.BadSignature as exc:
        return "signature", str(exc)
    except hs256.IssuerRefused as exc:
        return "issuer", str(exc)
    except hs256.AudienceRefused as exc:
        return "audience", str(exc)
    except hs256.MissingClaim as exc:
        return "missing", (exc.claim, str(exc))
    except hs256.Malformed as exc:
        return "malformed", str(exc)
    return "ok", repr(claims)


def agree(token: str, **kwargs: Any) -> Outcome:
    """Both verifiers' outcome for ``token``; fails the test when they differ."""
    expected = by_pyjwt(token, **kwargs)
    assert by_hs256(token, **kwargs) == expected, token
    return expected


# Making tokens by hand ---------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(payload: bytes, header: bytes = GOOD_HEADER, key: bytes = KEY) -> str:
    """A token of exactly these header and payload bytes, signed with ``key``."""
    signing_input = f"{b64(header)}.{b64(payload)}"
    mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def dumps(value: Any) -> bytes:
    """JSON as PyJWT writes it (NaN and Infinity included, as json.dumps allows)."""
    return json.dumps(value, separators=(",", ":")).encode()


def good_claims(now: float = NOW, **more: Any) -> dict[str, Any]:
    return {"sub": "42", "iat": int(now), "exp": int(now) + 3600, **more}


def accepted_by_pyjwt(key: bytes) -> bool:
    """PyJWT takes ``key`` as an HMAC secret (not empty, not shaped like a PEM or JWK)."""
    try:
        HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(key)
    except jwt.InvalidKeyError:
        return False
    return True


# Strategies --------------------------------------------------------------------------------

INSTANTS = st.sampled_from([NOW, NOW + 0.25, NOW + 0.5, NOW + 0.75])
LEEWAYS = st.sampled_from([CLOCK_LEEWAY, 0, 2.5])


def times(now: float) -> st.SearchStrategy[Any]:
    """Values for exp, nbf or iat: on and around now and now +- leeway, and of odd types."""
    offsets = st.sampled_from([0, 1, -1, 29, 30, 31, -29, -30, -31, 2, -2, 3600, -3600])
    near = st.builds(lambda o: int(now) + o, offsets | st.integers(-100, 100))
    return st.one_of(
        near,
        near.map(float),
        st.builds(lambda o, f: now + o + f, offsets, st.sampled_from([0.0, 0.25, 0.5, -0.5])),
        near.map(str),
        near.map(lambda t: f" {t} "),
        st.sampled_from(
            [
                True,
                False,
                None,
                10**30,
                -(10**30),
                2**64,
                1e300,
                float("inf"),
                float("-inf"),
                float("nan"),
                "",
                "soon",
                "1e9",
                "1_800_000_000",
                "١٨٠٠٠٠٠٠٠٠",
                [],
                {},
                [int(now) + 60],
                0,
                -1,
            ]
        ),
        SCALARS,
    )


def audiences() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from([AUDIENCE, "other", "", [], [AUDIENCE], ["other"], ["other", AUDIENCE]]),
        st.sampled_from([[AUDIENCE, 1], [None], ["PMQ"], {"aud": AUDIENCE}, 0, None, True]),
        st.lists(st.sampled_from([AUDIENCE, "x", "pmq "]), max_size=3),
        SCALARS,
    )


@st.composite
def claim_sets(draw: st.DrawFn, now: float) -> dict[str, Any]:
    """Claims with each registered one present or not, of a likely or an odd value."""
    claims: dict[str, Any] = {}
    for name, values in (
        ("sub", st.sampled_from(["42", 42, "", None, ["42"], 4.2]) | SCALARS),
        ("iat", times(now)),
        ("nbf", times(now)),
        ("exp", times(now)),
        ("iss", st.sampled_from([ISSUER, "other", "", None, 7, [ISSUER]]) | SCALARS),
        ("aud", audiences()),
        ("jti", st.sampled_from(["a-b", "", 12, None, ["x"]])),
        ("groups", st.lists(st.text(max_size=5), max_size=3) | JSON),
        ("role", st.sampled_from(["user", "agent", "root", 1])),
    ):
        if draw(st.integers(0, 3)):  # present three times in four
            claims[name] = draw(values)
    claims.update(draw(st.dictionaries(st.text(max_size=6), JSON, max_size=3)))
    return claims


def headers() -> st.SearchStrategy[bytes]:
    """Header bytes: HS256 as PyJWT writes it, other algorithms, odd kid/crit/b64, not JSON."""
    objects = st.fixed_dictionaries(
        {},
        optional={
            "alg": st.sampled_from(
                [
                    "HS256",
                    "none",
                    "None",
                    "HS512",
                    "HS384",
                    "RS256",
                    "ES256",
                    "hs256",
                    "HS256 ",
                    "",
                    None,
                    256,
                    ["HS256"],
                    {"HS256": 1},
                ]
            ),
            "typ": st.sampled_from(["JWT", "jwt", 1, None]),
            "kid": st.sampled_from(["k1", "", 1, None, ["k"]]),
            "crit": st.sampled_from([["b64"], [], "b64", ["exp"], [1], ["b64", "b64"], None]),
            "b64": st.sampled_from([False, True, 0, "false", None]),
        },
    ).map(dumps)
    return st.one_of(
        st.just(GOOD_HEADER),
        st.just(b'{"typ":"JWT","alg":"HS256"}'),
        objects,
        st.sampled_from(
            [
                b"",
                b"null",
                b"[]",
                b'"HS256"',
                b"{",
                b'{"alg":"HS256",}',
                b"\xef\xbb\xbf{}",
                b'{"alg":"HS256"} ',
                '{"alg":"HS256"}'.encode("utf-16"),
                b'{"alg":NaN}',
                b'{"alg":"HS256","alg":"none"}',
                b'{"alg":"none","alg":"HS256"}',
                b'{"alg":"HS256","x":' + b"[" * 2000 + b"]" * 2000 + b"}",
            ]
        ),
    )


def json_texts() -> st.SearchStrategy[bytes]:
    """Payload bytes that are or nearly are JSON, where orjson and json.loads could differ."""
    good = good_claims()
    return st.one_of(
        st.sampled_from(
            [
                b"",
                b"null",
                b"[]",
                b"42",
                b'"claims"',
                b"{}",
                b"\xef\xbb\xbf" + dumps(good),
                json.dumps(good).encode("utf-16"),
                json.dumps(good).encode("utf-32-le"),
                b'{"sub":"42","exp":1e400}',
                b'{"sub":"42","exp":NaN}',
                b'{"sub":"42","exp":Infinity}',
                b'{"sub":"42","exp":-Infinity}',
                b'{"sub":"\\ud800","exp":9999999999}',
                b'{"sub":"42","exp":9999999999,}',
                b'{"sub":"42","exp":99999999999999999999999}',
                b'{"sub":18446744073709551616,"exp":9999999999}',
                b'{"sub":-9223372036854775809,"exp":9999999999}',
                b'{"sub":"42","exp":9999999999.000000000000001}',
                b'{"sub":"42","exp":9999999999,"sub":"43"}',
                b'{"sub":"42","exp":9999999999,"x":' + b"[" * 300 + b"]" * 300 + b"}",
                b'{"sub":"42","exp":9999999999,"x":' + b"[" * 2000 + b"]" * 2000 + b"}",
                b'{"sub":"42","exp":9999999999,"x":"\xff"}',
                b'{"sub":"42","exp":9999999999,"x":"\x00"}',
                b' {"sub":"42","exp":9999999999}\n',
                b'{"sub":"42","exp":9999999999}\x0c',
            ]
        ),
        # Text near JSON: digits, signs, exponents, brackets, quotes, escapes.
        st.lists(st.sampled_from([*'{}[]:,"-+.eE0123456789 \\u/nt\t', "nul", "tru"]), max_size=30)
        .map("".join)
        .map(lambda t: b'{"sub":"42","exp":9999999999,"x":' + t.encode()),
        st.floats().map(lambda f: b'{"sub":"42","exp":' + repr(f).encode() + b"}"),
        st.integers().map(lambda i: b'{"sub":"42","exp":' + str(i).encode() + b"}"),
        st.binary(max_size=60),
    )


def tampered(token: str) -> st.SearchStrategy[str]:
    """``token`` with one thing done to it: a character changed, added or dropped, padding,
    characters outside the base64url alphabet, segments added, dropped or swapped."""
    odd = st.sampled_from([*"=+/ \n\t.-_Aa0é\x00", "==", "===", "%3D", "\u00a0"])

    @st.composite
    def one(draw: st.DrawFn) -> str:
        at = draw(st.integers(0, len(token)))
        kind = draw(st.integers(0, 5))
        if kind == 0:
            return token[:at] + draw(odd) + token[at + 1 :]
        if kind == 1:
            return token[:at] + draw(odd) + token[at:]
        if kind == 2:
            return token[:at] + token[at + 1 :]
        if kind == 3:
            parts = token.split(".")
            index = draw(st.integers(0, 2))
            parts[index] += draw(st.sampled_from(["=", "==", "===", "A=", "AA==", "AAA="]))
            return ".".join(parts)
        if kind == 4:
            parts = token.split(".")
            return ".".join(draw(st.permutations(parts)))
        return draw(
            st.sampled_from(
                [
                    token + ".",
                    "." + token,
                    token + ".x",
                    token.rsplit(".", 1)[0],
                    token.replace(".", "", 1),
                    token[:at],
                ]
            )
        )

    return one()


# Properties --------------------------------------------------------------------------------


@settings(max_examples=400)
@given(st.data(), INSTANTS, LEEWAYS)
def test_random_claims_agree(data: st.DataObject, now: float, leeway: float) -> None:
    claims = data.draw(claim_sets(now))
    issuer = data.draw(st.sampled_from([None, ISSUER]))
    audience = data.draw(st.sampled_from([None, AUDIENCE]))
    require = ["sub", "exp", *data.draw(st.sampled_from([[], ["iat"]]))]
    require += ["iss"] * (issuer is not None) + ["aud"] * (audience is not None)
    agree(
        signed(dumps(claims)),
        leeway=leeway,
        issuer=issuer,
        audience=audience,
        require=require,
        now=now,
    )


@given(INSTANTS)
def test_good_tokens_are_accepted_alike(now: float) -> None:
    claims = good_claims(now, groups=["a", "b"], role="user", iss=ISSUER, aud=[AUDIENCE, "x"])
    outcome = agree(signed(dumps(claims)), issuer=ISSUER, audience=AUDIENCE, now=now)
    assert outcome == ("ok", repr(claims))


@settings(max_examples=300)
@given(headers(), st.sampled_from([dumps(good_claims()), b"{}", b"[]"]))
@example(b'{"alg":"none","typ":"JWT"}', dumps(good_claims()))
@example(b'{"typ":"JWT"}', dumps(good_claims()))
@example(b'{"alg":"HS256","b64":false,"crit":["b64"]}', b"")
def test_headers_agree(header: bytes, payload: bytes) -> None:
    token = signed(payload, header)
    agree(token)
    if header.startswith(b"{") and b"HS256" not in header:
        assert by_hs256(token)[0] != "ok"


def test_alg_none_and_others_are_refused_alike() -> None:
    for alg in ("none", "HS512", "RS256", None):
        header = dumps({"alg": alg, "typ": "JWT"} if alg else {"typ": "JWT"})
        for signature in ("", b64(b"x" * 32)):
            token = signed(dumps(good_claims()), header).rsplit(".", 1)[0] + "." + signature
            outcome = agree(token)
            assert outcome[0] in ("malformed", "signature"), (alg, outcome)
        assert agree(signed(dumps(good_claims()), header))[0] == "malformed"


@settings(max_examples=300)
@given(json_texts(), LEEWAYS)
def test_payload_json_agrees(payload: bytes, leeway: float) -> None:
    agree(signed(payload), leeway=leeway)


@settings(max_examples=400)
@given(st.data())
def test_tampered_tokens_agree(data: st.DataObject) -> None:
    claims = data.draw(st.sampled_from([good_claims(), good_claims(jti="j", groups=["g"])]))
    header = data.draw(st.sampled_from([GOOD_HEADER, b'{"alg":"HS256"}']))
    token = data.draw(tampered(signed(dumps(claims), header)))
    agree(token)


BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@settings(max_examples=400)
@given(
    st.lists(st.sampled_from([*BASE64URL, *"=+/ .\n\x00é"]), max_size=14).map("".join),
    st.integers(0, 2),
)
@example("eyJhbGciOiJIUzI1NiJ9", 0)
@example("eyJhbGciOiJIUzI1NiJ9=", 0)
@example("eyJhbGciOiJIUzI1NiJ9==", 0)
def test_base64_segments_agree(segment: str, position: int) -> None:
    """One segment of a good token replaced: padding, length, alphabet, stray last bits."""
    parts = signed(dumps(good_claims())).split(".")
    parts[position] = segment
    agree(".".join(parts))


@settings(max_examples=200)
@given(st.binary(min_size=1, max_size=100), st.binary(min_size=1, max_size=100))
@example(b"k", b"k")
@example(b"k" * 32, b"k" * 31)
def test_keys_of_any_length_agree(key: bytes, signing_key: bytes) -> None:
    assume(accepted_by_pyjwt(key))
    outcome = agree(signed(dumps(good_claims()), key=signing_key), key=key)
    assert (outcome[0] == "ok") == (key == signing_key)


@settings(max_examples=100)
@given(st.text(max_size=60), st.integers(0, 5000))
def test_strings_that_are_not_tokens_agree(text: str, length: int) -> None:
    assume(not any(0xD800 <= ord(c) <= 0xDFFF for c in text))  # both raise UnicodeError
    agree(text)
    agree(".".join([text] * 3))
    agree(signed(dumps(good_claims(pad="p" * length))))


def test_deep_nesting_agrees() -> None:
    """orjson takes up to 1,024 levels, json.loads stops at the recursion limit (1,000)."""
    for depth in (300, 990, 1010, 1024, 1025, 2000):
        nested = b"[" * depth + b"]" * depth
        agree(signed(dumps(good_claims()), b'{"alg":"HS256","x":' + nested + b"}"))
        agree(signed(b'{"sub":"42","exp":9999999999,"x":' + nested + b"}"))


def test_long_tokens_agree() -> None:
    for size in (1000, 4096, 20_000):
        token = signed(dumps(good_claims(pad="p" * size)))
        assert agree(token)[0] == "ok"
        assert agree(token[:-2] + "AA")[0] == "signature"


def test_not_three_segments_agree() -> None:
    good = signed(dumps(good_claims()))
    head, body, mac = good.split(".")
    for token in (
        "",
        ".",
        "..",
        "...",
        "a",
        "a.b",
        f"{head}.{body}",
        f"{head}.{body}.{mac}.",
        f"{head}.{body}.{mac}.{mac}",
        f"{head}..{mac}",
        f"{head}.{body}.{mac}x",
    ):
        agree(token)


# JwtAuthenticator, as the gateway calls it ------------------------------------------------


def decoded_with_pyjwt(token: str, secret: str, config: AuthConfig) -> dict[str, Any]:
    """JwtAuthenticator._decode as it was before pmq.domain.hs256 (PyJWT)."""
    require = ["sub", "exp"]
    for claim, wanted in (
        ("iat", config.max_token_age),
        ("iss", config.issuer),
        ("aud", config.audience),
    ):
        if wanted:
            require.append(claim)
    options: Any = {"require": require, "verify_sub": False, "verify_aud": bool(config.audience)}
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            leeway=CLOCK_LEEWAY,
            issuer=config.issuer or None,
            audience=config.audience or None,
            options=options,
        )
    except jwt.ExpiredSignatureError:
        raise AuthError(401, "token expired") from None
    except jwt.InvalidSignatureError:
        raise AuthError(401, "bad token signature") from None
    except jwt.InvalidIssuerError:
        raise AuthError(401, "token issuer not accepted") from None
    except jwt.InvalidAudienceError:
        raise AuthError(401, "token audience not accepted") from None
    except jwt.MissingRequiredClaimError as exc:
        raise AuthError(401, f"token has no {exc.claim!r} claim") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(401, f"malformed token: {exc}") from None
    return claims


def near(value: Any, now: float) -> bool:
    """``value``, as PyJWT reads a time, is within 100 s of now +- leeway."""
    try:
        return abs(int(value) - now) < 100
    except (ValueError, TypeError, OverflowError):
        return False


def decode_outcome(decode: Any, *args: Any) -> tuple[str, str]:
    try:
        return "ok", repr(decode(*args))
    except AuthError as exc:
        assert exc.status == 401
        return "refused", str(exc)


CONFIGS = [
    AuthConfig(),
    AuthConfig(issuer=ISSUER, audience=AUDIENCE),
    AuthConfig(max_token_age=7200),
]


@settings(max_examples=300)
@given(st.data(), st.sampled_from(CONFIGS))
def test_authenticator_errors_are_unchanged(data: st.DataObject, config: AuthConfig) -> None:
    """Times kept far from every boundary, as _decode reads the real clock."""
    now = float(int(time.time()))
    claims = data.draw(claim_sets(now))
    for name in ("exp", "iat", "nbf"):
        value = claims.get(name)
        if type(value) in (int, float, str) and near(value, now):
            far = data.draw(st.sampled_from([-7200, -200, 200, 7200])) + int(now)
            claims[name] = type(value)(far)
    token = signed(dumps(claims), data.draw(headers()), KEY)
    if data.draw(st.booleans()):
        token = data.draw(tampered(token))
    secret = KEY.decode()
    expected = decode_outcome(decoded_with_pyjwt, token, secret, config)
    assert decode_outcome(JwtAuthenticator(secret, config)._decode, token) == expected


def test_authenticator_refuses_a_secret_pyjwt_refuses() -> None:
    for secret in (
        "",
        "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----",
        '{"kty":"oct"}',
    ):
        with pytest.raises(ConfigError, match=r"auth\.jwt_secret"):
            JwtAuthenticator(secret)
