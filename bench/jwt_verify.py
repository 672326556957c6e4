"""The token check of a connect: PyJWT's ``jwt.decode`` against pmq.domain.hs256, per token.

    python -m bench.jwt_verify [-n 20000] [--passes 5] [--only pyjwt|hs256]

Verifies ``n`` distinct tokens as ``pmqctl token`` mints them (sub, iat, exp, two groups,
role; HS256 with a 52-byte secret) the way JwtAuthenticator's ``_decode`` does: with
``jwt.decode`` and the options it passed before the hand-written verifier, and with
``hs256.verify``. Each token is checked to come out the same both ways first. Prints (JSON)
the CPU microseconds per token, the best of ``passes`` passes, and every pass.

Counted in instructions under valgrind, which vary little from run to run on a loaded
machine: run ``--only X -n 2000`` twice, with ``--passes 2`` and ``--passes 1``, under
``valgrind --tool=callgrind --callgrind-out-file=/dev/null`` and divide the difference of
the two "Collected" counts by 2,000 (one pass: the start and the minting cancel out).
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from typing import Any

import jwt

from bench.common import emit, load_average
from pmq.domain import hs256
from pmq.domain.auth import CLOCK_LEEWAY
from pmq.domain.jwtauth import mint_token

SECRET = "bench-secret-" + "x" * 39
REQUIRE = ["sub", "exp"]
OPTIONS: Any = {"require": REQUIRE, "verify_sub": False, "verify_aud": False}


def by_pyjwt(token: str) -> dict[str, Any]:
    """As JwtAuthenticator._decode called PyJWT (no issuer or audience set)."""
    claims: dict[str, Any] = jwt.decode(
        token, SECRET, algorithms=["HS256"], leeway=CLOCK_LEEWAY, options=OPTIONS
    )
    return claims


KEY = SECRET.encode()


def by_hs256(token: str) -> dict[str, Any]:
    return hs256.verify(token, KEY, leeway=CLOCK_LEEWAY, require=REQUIRE)


VERIFIERS: dict[str, Callable[[str], dict[str, Any]]] = {"pyjwt": by_pyjwt, "hs256": by_hs256}


def passes_of(
    verify: Callable[[str], dict[str, Any]], tokens: list[str], passes: int
) -> list[float]:
    """CPU microseconds per token of each pass."""
    found = []
    for _ in range(passes):
        cpu = time.process_time()
        for token in tokens:
            verify(token)
        found.append((time.process_time() - cpu) / len(tokens) * 1e6)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000, help="tokens per pass")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--only", choices=sorted(VERIFIERS), help="time this one alone")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # none expected with this secret; keep timings clean
    tokens = [mint_token(SECRET, uid, ["vip", f"g{uid % 7}"]) for uid in range(1, args.n + 1)]
    chosen = [args.only] if args.only else list(VERIFIERS)
    if not args.only:
        for token in tokens[:1000]:
            assert by_pyjwt(token) == by_hs256(token)
    result: dict[str, Any] = {"tokens": args.n, "token_bytes": len(tokens[0])}
    for name in chosen:
        found = passes_of(VERIFIERS[name], tokens, args.passes)
        result[f"{name}_cpu_us_per_token"] = round(min(found), 2)
        result[f"{name}_passes_cpu_us"] = [round(us, 2) for us in found]
    if not args.only:
        result["ratio"] = round(
            result["pyjwt_cpu_us_per_token"] / result["hs256_cpu_us_per_token"], 1
        )
    result["load_average"] = load_average()
    emit(result)


if __name__ == "__main__":
    main()
