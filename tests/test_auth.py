"""Token verification against real Redis and a real (tiny) user centre over HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import secrets
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import jwt
import pytest
import websockets
from redis.asyncio import Redis

from pmq import configload, ctl
from pmq.config import AuthConfig, Config, StorageConfig
from pmq.domain.auth import Identity
from pmq.domain.authmode import make_authenticator
from pmq.domain.jwtauth import SECRET_FILE, JwtAuthenticator, mint_token, resolve_jwt_secret
from pmq.domain.kicks import Kicks, issued_before
from pmq.domain.usercentre import HttpAuthenticator
from pmq.errors import AuthError, ConfigError
from pmq.redis.keys import Keys
from pmq.wire.client import Role
from tests.helpers import GOOD_ANSWER, UserCentre, wait_for, wait_for_async

REDIS_URL = "redis://127.0.0.1:6379/0"
SECRET = "test-secret-" + "x" * 40
T = TypeVar("T")


def jwt_auth(token: str, secret: str = SECRET) -> Identity:
    return asyncio.run(JwtAuthenticator(secret).authenticate(token))


def jwt_refused(token: str) -> AuthError:
    with pytest.raises(AuthError) as info:
        jwt_auth(token)
    assert info.value.status == 401
    return info.value


# JWT ------------------------------------------------------------------------------------


def test_jwt_valid_token_gives_identity() -> None:
    token = mint_token(SECRET, 42, groups=["author", "signed_author"])
    assert jwt_auth(token) == Identity("42", ("author", "signed_author"), Role.USER)


def test_jwt_agent_role() -> None:
    identity = jwt_auth(mint_token(SECRET, "7", role="agent"))
    assert identity.role is Role.AGENT
    assert identity.groups == ()


def test_jwt_int_sub_is_accepted() -> None:
    token = jwt.encode({"sub": 42, "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    assert jwt_auth(token) == Identity("42", (), Role.USER)


def test_jwt_expired_is_refused() -> None:
    assert "expired" in jwt_refused(mint_token(SECRET, 42, ttl=-3600)).reason


def test_jwt_bad_signature_is_refused() -> None:
    assert "signature" in jwt_refused(mint_token("another-secret-" + "y" * 40, 42)).reason


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "x" * 10000])
def test_jwt_garbage_is_refused(token: str) -> None:
    jwt_refused(token)


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "abc"},
        {"sub": "0"},
        {"sub": -5},
        {"sub": True},
        {"sub": "42", "role": "admin"},
        {"sub": "42", "groups": "author"},
        {"sub": "42", "groups": [1, 2]},
        {},  # no sub
    ],
)
def test_jwt_bad_claims_are_refused(claims: dict[str, Any]) -> None:
    token = jwt.encode({**claims, "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    jwt_refused(token)


def test_jwt_without_exp_is_refused() -> None:
    jwt_refused(jwt.encode({"sub": "42"}, SECRET, algorithm="HS256"))


def signed(claims: dict[str, Any], secret: str = SECRET) -> str:
    """A JWT of ``claims``, with an exp a minute ahead unless they name one."""
    return jwt.encode({"exp": int(time.time()) + 60, **claims}, secret, algorithm="HS256")


@pytest.mark.parametrize("sub", [str(2**63), 2**63, str(10**19), "0" * 19 + "1" * 2])
def test_jwt_sub_past_the_uid_range_is_refused(sub: object) -> None:
    """Storage keeps uids as signed 64-bit integers: a larger one must never connect."""
    assert "uid" in jwt_refused(signed({"sub": sub})).reason


def test_jwt_sub_at_the_top_of_the_range_is_accepted() -> None:
    assert jwt_auth(signed({"sub": str(2**63 - 1)})).uid == str(2**63 - 1)
    assert jwt_auth(signed({"sub": "007"})).uid == "7"


def test_mint_refuses_a_uid_past_the_range() -> None:
    with pytest.raises(ValueError, match="uid"):
        mint_token(SECRET, 2**63)


def test_pmqctl_token_refuses_a_uid_past_the_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the generated secret goes beside var/pmq.db
    (tmp_path / "pmq.toml").write_text("")
    assert ctl.main(["token", str(2**63), "-c", "pmq.toml"]) == 1
    assert "uid must be an integer from 1 to 2^63-1" in capsys.readouterr().err
    assert ctl.main(["token", str(2**63 - 1), "-c", "pmq.toml"]) == 0


def checked(token: str, **config: Any) -> Identity:
    return asyncio.run(JwtAuthenticator(SECRET, AuthConfig(**config)).authenticate(token))


def checked_refused(token: str, **config: Any) -> str:
    with pytest.raises(AuthError) as info:
        checked(token, **config)
    assert info.value.status == 401
    return info.value.reason


def test_jwt_issuer_is_checked_when_set() -> None:
    site = {"issuer": "https://site.example"}
    assert checked(signed({"sub": "42", "iss": "https://site.example"}), **site).uid == "42"
    assert "issuer" in checked_refused(signed({"sub": "42", "iss": "https://evil"}), **site)
    assert "'iss'" in checked_refused(signed({"sub": "42"}), **site)


def test_jwt_audience_is_checked_when_set() -> None:
    pmq = {"audience": "pmq"}
    assert checked(signed({"sub": "42", "aud": "pmq"}), **pmq).uid == "42"
    assert checked(signed({"sub": "42", "aud": ["shop", "pmq"]}), **pmq).uid == "42"
    assert "audience" in checked_refused(signed({"sub": "42", "aud": "shop"}), **pmq)
    assert "'aud'" in checked_refused(signed({"sub": "42"}), **pmq)


def test_jwt_issuer_and_audience_are_not_checked_by_default() -> None:
    token = signed({"sub": "42", "iss": "anyone", "aud": "anything"})
    assert checked(token).uid == "42"


def test_jwt_max_token_age() -> None:
    now = int(time.time())
    day = {"max_token_age": 86400}
    assert checked(signed({"sub": "42", "iat": now, "exp": now + 86400}), **day).uid == "42"
    too_long = signed({"sub": "42", "iat": now, "exp": now + 86401})
    assert "max_token_age" in checked_refused(too_long, **day)
    assert "'iat'" in checked_refused(signed({"sub": "42", "exp": now + 60}), **day)
    assert checked(too_long).uid == "42"  # 0: off


@pytest.mark.parametrize("iat", ["1700000000", True])
def test_jwt_iat_must_be_a_number(iat: object) -> None:
    """PyJWT lets a string of digits or a boolean through as iat; the age check does not
    (and without it iat is not read: such tokens keep working where they did)."""
    token = signed({"sub": "42", "iat": iat})
    assert "iat" in checked_refused(token, max_token_age=60)
    assert checked(token).uid == "42"


@pytest.mark.parametrize("key", ["max_token_age", "revoke_seconds"])
def test_negative_auth_seconds_fail_the_config(tmp_path: Path, key: str) -> None:
    path = tmp_path / "pmq.toml"
    path.write_text(f"[auth]\n{key} = -1\n")
    with pytest.raises(ConfigError, match=f"auth.{key}"):
        configload.load(str(path), environ={})


# Kicks ------------------------------------------------------------------------------------


KICK_MS = 1_700_000_000_500  # a kick half-way through a second


@pytest.mark.parametrize(
    ("iat", "before"),
    [
        (None, True),  # no iat: may be anything
        (1_699_999_999, True),
        (1_700_000_000, True),  # the kick's own second: maybe before it
        (1_700_000_000.4, True),  # a fraction before the kick
        (1_700_000_000.9, False),  # a fraction after it: issued after the kick
        (1_700_000_001, False),  # a later second: after it
    ],
)
def test_issued_before_a_kick(iat: float | None, before: bool) -> None:
    assert issued_before(iat, KICK_MS) is before


def test_an_iat_in_the_kicks_millisecond_is_refused() -> None:
    # Kicked at 1_700_000_000.000x: the kick keeps only the millisecond, so a token minted
    # in it, a whole-second iat of that second included, may be older than the kick.
    assert issued_before(1_700_000_000, 1_700_000_000_000)
    assert issued_before(1_700_000_000.0005, 1_700_000_000_000)
    assert not issued_before(1_700_000_000.002, 1_700_000_000_000)


def test_a_minted_token_issued_later_in_the_kicks_second_is_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """mint_token (pmqctl token) keeps the millisecond of its iat: a token minted 0.2 s after
    a kick, in the kick's own second, connects; a whole-second iat was refused until the
    next second."""
    monkeypatch.setattr(time, "time", lambda: KICK_MS / 1000 + 0.2)
    claims = jwt.decode(
        mint_token(SECRET, 7), SECRET, algorithms=["HS256"],
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims["iat"] == 1_700_000_000.7
    assert not issued_before(claims["iat"], KICK_MS)
    assert claims["exp"] == 1_700_000_000 + 86400


def with_kicks(scenario: Callable[[Redis, Keys], Awaitable[T]]) -> T:
    async def main() -> T:
        redis = Redis.from_url(REDIS_URL)
        keys = Keys(f"pmqtest:{secrets.token_hex(8)}:")
        try:
            return await scenario(redis, keys)
        finally:
            async for key in redis.scan_iter(match=keys.prefix + "*"):
                await redis.delete(key)
            await redis.aclose()

    return asyncio.run(main())


def test_jwt_kick_revokes_the_tokens_issued_before_it() -> None:
    async def scenario(redis: Redis, keys: Keys) -> None:
        config = AuthConfig(revoke_seconds=100)
        auth = JwtAuthenticator(SECRET, config, Kicks(redis, keys, config.revoke_seconds))
        old, no_iat, other = mint_token(SECRET, 42), signed({"sub": "42"}), mint_token(SECRET, 43)
        assert (await auth.authenticate(old)).uid == "42"
        assert (await auth.authenticate(no_iat)).uid == "42"
        await auth.revoke("42")
        for token in (old, no_iat):
            with pytest.raises(AuthError) as info:
                await auth.authenticate(token)
            assert (info.value.status, info.value.reason) == (401, "token revoked by a kick")
        assert (await auth.authenticate(other)).uid == "43"  # another user's tokens stay good
        assert 0 < await redis.ttl(keys.kicked("42")) <= 100
        kicked_second = int(await redis.get(keys.kicked("42"))) // 1000
        after = signed({"sub": "42", "iat": kicked_second + 1})
        assert (await auth.authenticate(after)).uid == "42"

    with_kicks(scenario)


def test_jwt_kick_revokes_nothing_with_revoke_seconds_0() -> None:
    async def scenario(redis: Redis, keys: Keys) -> None:
        auth = JwtAuthenticator(SECRET, AuthConfig(revoke_seconds=0), Kicks(redis, keys, 0))
        token = mint_token(SECRET, 42)
        await auth.revoke("42")
        assert (await auth.authenticate(token)).uid == "42"
        assert await redis.exists(keys.kicked("42")) == 0

    with_kicks(scenario)


def test_jwt_kick_check_without_redis_is_unavailable() -> None:
    async def scenario() -> AuthError:
        redis = Redis.from_url(f"redis://127.0.0.1:{closed_port()}/0")
        auth = JwtAuthenticator(SECRET, AuthConfig(), Kicks(redis, Keys(), 100))
        try:
            with pytest.raises(AuthError) as info:
                await auth.authenticate(mint_token(SECRET, 42))
            return info.value
        finally:
            await redis.aclose()

    assert asyncio.run(scenario()).status == 503


def closed_port() -> int:
    """A port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The secret -----------------------------------------------------------------------------


def sqlite_config(url: str, secret: str = "") -> Config:
    return Config(storage=StorageConfig(url=url), auth=AuthConfig(jwt_secret=secret))


def test_secret_file_is_created_once_beside_the_database(tmp_path: Path) -> None:
    config = sqlite_config(f"sqlite:///{tmp_path}/data/pmq.db")  # four slashes: absolute
    first = resolve_jwt_secret(config)
    path = tmp_path / "data" / SECRET_FILE
    assert path.read_text().strip() == first
    assert len(first) >= 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert resolve_jwt_secret(config) == first
    assert [p.name for p in path.parent.iterdir()] == [SECRET_FILE]  # no temp files left
    # Another process (as pmqctl token would be) reads the same secret.
    code = (
        "import sys; from pmq.domain.jwtauth import resolve_jwt_secret; from pmq.config import *;"
        "print(resolve_jwt_secret(Config(storage=StorageConfig(url=sys.argv[1]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, config.storage.url], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == first
    # and tokens minted with it are accepted by the node's authenticator (no Redis here:
    # with kicks off it reads none).
    no_kicks = dataclasses.replace(config, auth=AuthConfig(revoke_seconds=0))
    auth = make_authenticator(no_kicks, None, Keys())  # type: ignore[arg-type]
    assert asyncio.run(auth.authenticate(mint_token(out.stdout.strip(), 5))).uid == "5"


def test_secret_relative_url_is_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    secret = resolve_jwt_secret(sqlite_config("sqlite:///var/pmq.db"))
    assert (tmp_path / "var" / SECRET_FILE).read_text().strip() == secret


def test_secret_racing_processes_agree(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/pmq.db"
    code = (
        "import sys, time; from pmq.domain.jwtauth import resolve_jwt_secret;"
        " from pmq.config import *;"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()));"
        "print(resolve_jwt_secret(Config(storage=StorageConfig(url=sys.argv[1]))))"
    )
    start = str(time.time() + 2.0)  # every process starts at once (if the machine keeps up)
    procs = [
        subprocess.Popen([sys.executable, "-c", code, url, start], stdout=subprocess.PIPE)
        for _ in range(6)
    ]
    outputs = {p.communicate(timeout=30)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(outputs) == 1
    assert outputs == {(tmp_path / SECRET_FILE).read_bytes().strip()}


def test_secret_from_config_wins() -> None:
    assert resolve_jwt_secret(sqlite_config("mysql://u@h:3306/db", "s3cret")) == "s3cret"


def test_secret_required_without_sqlite() -> None:
    with pytest.raises(ConfigError, match=r"auth\.jwt_secret: must be set"):
        resolve_jwt_secret(sqlite_config("mysql://u:p@127.0.0.1:3306/pmq"))


# User centre ----------------------------------------------------------------------------

GOOD = GOOD_ANSWER


Scenario = Callable[[HttpAuthenticator, Redis, Keys], Awaitable[T]]


def with_http_auth(url: str, scenario: Scenario[T], **auth: Any) -> T:
    """Run ``scenario`` with an HttpAuthenticator on its own Redis key prefix, then clean up."""

    async def main() -> T:
        redis = Redis.from_url(REDIS_URL)
        keys = Keys(f"pmqtest:{secrets.token_hex(8)}:")
        config = AuthConfig(mode="http", url=url, **auth)
        authenticator = HttpAuthenticator(redis, keys, config)
        try:
            return await scenario(authenticator, redis, keys)
        finally:
            await authenticator.close()
            async for key in redis.scan_iter(match=keys.prefix + "*"):
                await redis.delete(key)
            await redis.aclose()

    return asyncio.run(main())


def cache_key(keys: Keys, token: str) -> str:
    return keys.auth_cache(hashlib.sha256(token.encode()).hexdigest())


async def refused(auth: HttpAuthenticator, token: str) -> AuthError:
    with pytest.raises(AuthError) as info:
        await auth.authenticate(token)
    return info.value


def test_http_valid_token_is_cached_with_jittered_ttl(centre: UserCentre) -> None:
    async def scenario(auth: HttpAuthenticator, redis: Redis, keys: Keys) -> None:
        expected = Identity("123", ("author",), Role.USER)
        assert await auth.authenticate("good") == expected
        assert await auth.authenticate("good") == expected
        assert centre.calls["good"] == 1
        assert 101 <= await redis.ttl(cache_key(keys, "good")) <= 150
        assert (await auth.authenticate("agent")).role is Role.AGENT

    with_http_auth(centre.url, scenario, cache_ttl=100, cache_jitter=50)


def test_http_cache_ttls_differ(centre: UserCentre) -> None:
    async def scenario(auth: HttpAuthenticator, redis: Redis, keys: Keys) -> set[int]:
        tokens = [f"good-{i}" for i in range(20)]
        for token in tokens:
            await auth.authenticate(token)
        return {await redis.ttl(cache_key(keys, t)) for t in tokens}

    ttls = with_http_auth(centre.url, scenario, cache_ttl=100, cache_jitter=1000)
    assert len(ttls) > 1
    assert all(101 <= ttl <= 1100 for ttl in ttls)


@pytest.mark.parametrize("token", ["uid0", "uid0-string", "forbidden", "unknown"])
def test_http_invalid_token_is_refused_and_cached(centre: UserCentre, token: str) -> None:
    async def scenario(auth: HttpAuthenticator, redis: Redis, keys: Keys) -> None:
        assert (await refused(auth, token)).status == 401
        assert (await refused(auth, token)).status == 401
        assert centre.calls[token] == 1
        assert 0 < await redis.ttl(cache_key(keys, token)) <= 20

    with_http_auth(centre.url, scenario, invalid_ttl=20)


def test_http_empty_token_makes_no_call(centre: UserCentre) -> None:
    async def scenario(auth: HttpAuthenticator, redis: Redis, keys: Keys) -> None:
        assert (await refused(auth, "")).status == 401

    with_http_auth(centre.url, scenario)
    assert centre.calls == {}


def test_http_concurrent_lookups_make_one_call(centre: UserCentre) -> None:
    async def scenario(auth: HttpAuthenticator, redis: Redis, keys: Keys) -> list[Identity]:
        return await asyncio.gather(*(auth.authenticate("good-slow") for _ in range(10)))

    identities = with_http_auth(centre.url, scenario)
    assert centre.calls["good-slow"] == 1
    assert len(identities) == 10 and len(set(identities)) == 1


def test_http_cancelled_waiter_does_not_cancel_the_others(centre: UserCentre) -> None:
    async def scenario(auth: HttpAuthenticator, redis: Redis, keys: Keys) -> Identity:
        first = asyncio.create_task(auth.authenticate("good-slow"))
        second = asyncio.create_task(auth.authenticate("good-slow"))
        await wait_for_async(lambda: centre.calls.get("good-slow"), 5, "the lookup")
        first.cancel()  # both wait on the one lookup by now
        return await second

    assert with_http_auth(centre.url, scenario).uid == "123"
    assert centre.calls["good-slow"] == 1


def test_http_server_error_is_unavailable_and_not_cached(centre: UserCentre) -> None:
    async def scenario(auth: HttpAuthenticator, redis: Redis, keys: Keys) -> None:
        for _ in range(2):
            error = await refused(auth, "crash")
            assert (error.status, error.reason) == (503, "user centre unavailable")
        assert centre.calls["crash"] == 2
        assert await redis.exists(cache_key(keys, "crash")) == 0

    with_http_auth(centre.url, scenario)


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (429, b'{"error": "slow down"}'),
        (404, b""),
        (400, b'{"uid": 0}'),  # not a verdict: only a 2xx carries a uid
        (502, b""),
        (302, b""),
        (200, b"<html>maintenance</html>"),
        (200, b"[123]"),
        (200, b"{}"),
        (200, b'{"uid": false}'),
        (200, b'{"uid": 9223372036854775808}'),  # 2^63: past the uid range
        (200, b'{"uid": 42, "role": "admin"}'),
    ],
)
def test_http_other_answers_are_unavailable_and_not_cached(
    centre: UserCentre, status: int, body: bytes
) -> None:
    """Only 401, 403 and uid 0 say a token is invalid; the next good answer is used."""

    async def scenario(auth: HttpAuthenticator, redis: Redis, keys: Keys) -> None:
        centre.script("good-later", (status, body, 0.0))
        error = await refused(auth, "good-later")
        assert (error.status, error.reason) == (503, "user centre unavailable")
        assert await redis.exists(cache_key(keys, "good-later")) == 0
        assert (await auth.authenticate("good-later")).uid == "123"
        assert centre.calls["good-later"] == 2

    with_http_auth(centre.url, scenario)


def test_http_kick_drops_the_users_cached_answers(centre: UserCentre) -> None:
    async def scenario(auth: HttpAuthenticator, redis: Redis, keys: Keys) -> None:
        for token in ("good-phone", "good-laptop", "agent"):  # uid 123 twice, uid 9
            await auth.authenticate(token)
        await auth.revoke("123")
        assert await redis.exists(cache_key(keys, "good-phone")) == 0
        assert await redis.exists(cache_key(keys, "good-laptop")) == 0
        assert await redis.exists(cache_key(keys, "agent")) == 1  # another user's stays
        assert 0 < await redis.ttl(keys.kicked("123")) <= 86400
        centre.script("good-phone", (401, b"", 0.0))  # the site logged that device out
        assert (await refused(auth, "good-phone")).status == 401
        assert (await auth.authenticate("good-laptop")).uid == "123"
        assert (await auth.authenticate("agent")).uid == "9"
        assert centre.calls == {"good-phone": 2, "good-laptop": 2, "agent": 1}

    with_http_auth(centre.url, scenario, cache_ttl=100, cache_jitter=50)


def test_http_answer_in_flight_at_a_kick_is_not_cached(centre: UserCentre) -> None:
    """Asked before the kick, answered after its sweep: the answer serves the handshake
    that asked, and is not cached for the next one."""

    async def scenario(auth: HttpAuthenticator, redis: Redis, keys: Keys) -> None:
        centre.script("good-racing", (200, json.dumps(GOOD).encode(), 0.5))
        asking = asyncio.create_task(auth.authenticate("good-racing"))
        await wait_for_async(lambda: centre.calls.get("good-racing"), 5, "a call")
        await auth.revoke("123")
        assert (await asking).uid == "123"
        assert await redis.exists(cache_key(keys, "good-racing")) == 0
        assert (await auth.authenticate("good-racing")).uid == "123"
        assert centre.calls["good-racing"] == 2

    with_http_auth(centre.url, scenario)


def test_http_server_down_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nothing listens there

    async def scenario(auth: HttpAuthenticator, redis: Redis, keys: Keys) -> None:
        assert (await refused(auth, "good")).status == 503
        assert await redis.exists(cache_key(keys, "good")) == 0

    with_http_auth(f"http://127.0.0.1:{port}/check", scenario)


def test_http_slow_server_is_unavailable(centre: UserCentre) -> None:
    async def scenario(auth: HttpAuthenticator, redis: Redis, keys: Keys) -> float:
        started = time.monotonic()
        assert (await refused(auth, "slow")).status == 503
        return time.monotonic() - started

    assert with_http_auth(centre.url, scenario, timeout=0.3) < 0.9


def test_make_authenticator_picks_the_mode(tmp_path: Path) -> None:
    keys = Keys()
    jwt_config = sqlite_config(f"sqlite:///{tmp_path}/pmq.db")
    assert isinstance(make_authenticator(jwt_config, None, keys), JwtAuthenticator)  # type: ignore[arg-type]

    async def build() -> None:
        http_config = Config(auth=AuthConfig(mode="http", url="http://127.0.0.1:1/"))
        redis = Redis.from_url(REDIS_URL)
        authenticator = make_authenticator(http_config, redis, keys)
        assert isinstance(authenticator, HttpAuthenticator)
        await authenticator.close()
        await authenticator.close()  # idempotent
        await redis.aclose()

    asyncio.run(build())


def test_http_concurrent_lookups_in_two_workers_make_one_call(centre: UserCentre) -> None:
    """Two authenticators on one Redis prefix stand for two workers (or nodes)."""

    async def scenario(auth: HttpAuthenticator, redis: Redis, keys: Keys) -> list[Identity]:
        other = HttpAuthenticator(redis, keys, AuthConfig(mode="http", url=centre.url))
        try:
            return await asyncio.gather(
                *(a.authenticate("good-slow") for a in [auth, other] * 5)
            )
        finally:
            await other.close()

    identities = with_http_auth(centre.url, scenario)
    assert centre.calls["good-slow"] == 1
    assert len(identities) == 10 and len(set(identities)) == 1


def test_http_lookup_takes_over_the_lock_of_a_dead_holder(centre: UserCentre) -> None:
    async def scenario(auth: HttpAuthenticator, redis: Redis, keys: Keys) -> Identity:
        digest = hashlib.sha256(b"good-after-a-crash").hexdigest()
        await redis.set(keys.auth_lock(digest), "a-worker-killed-mid-call", px=300)
        return await auth.authenticate("good-after-a-crash")

    assert with_http_auth(centre.url, scenario, timeout=0.5).uid == "123"
    assert centre.calls["good-after-a-crash"] == 1


def test_http_one_token_handshaken_10_times_over_2_workers_is_asked_once(
    centre: UserCentre, make_node: Callable[..., Any]
) -> None:
    node = make_node(auth={"mode": "http", "url": centre.url}).start()

    async def handshakes() -> list[dict[str, Any]]:
        async def one() -> dict[str, Any]:
            ws = await websockets.connect(f"{node.ws_url}?token=good-slow", open_timeout=10)
            hello: dict[str, Any] = json.loads(await ws.recv())
            clients.append(ws)
            return hello

        clients: list[websockets.ClientConnection] = []
        try:
            hellos = await asyncio.gather(*(one() for _ in range(10)))
            # Every worker reports its connections each second: both must have some.
            await asyncio.to_thread(
                wait_for,
                lambda: all(w.get("connections") for w in node.workers()),
                10,
                "both socket workers to hold some of the connections",
            )
            return hellos
        finally:
            for ws in clients:
                await ws.close()

    hellos = asyncio.run(handshakes())
    assert [h["uid"] for h in hellos] == ["123"] * 10
    assert centre.calls["good-slow"] == 1
