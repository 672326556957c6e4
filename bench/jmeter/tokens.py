"""Client tokens for bench/jmeter/websocket.jmx: one ``uid,token`` line per user.

    .venv/bin/python bench/jmeter/tokens.py -c CONFIG --first 1 --count 1000 > /tmp/tokens.csv

Like ``pmqctl token`` (auth.mode = jwt, the same config, run from the same directory when
the secret is the generated one kept beside the SQLite store), but one process for any
number of users.
"""

from __future__ import annotations

import argparse
import sys

from pmq import configload
from pmq.domain.jwtauth import mint_token, resolve_jwt_secret


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", help="the node's config (as for pmqctl)")
    parser.add_argument("--first", type=int, default=1, help="first uid (default 1)")
    parser.add_argument("--count", type=int, default=100, help="how many users (default 100)")
    parser.add_argument("--ttl", type=int, default=86400, help="seconds the tokens are valid")
    args = parser.parse_args(argv)
    secret = resolve_jwt_secret(configload.load(args.config))
    for uid in range(args.first, args.first + args.count):
        sys.stdout.write(f"{uid},{mint_token(secret, uid, ttl=args.ttl)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
