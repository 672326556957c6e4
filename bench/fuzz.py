"""The fuzz targets (tests/test_fuzz_*.py) with many examples each, then how many ran.

    python -m bench.fuzz [--examples 2000] [-k EXPR] [--seed N]

Runs the same tests CI runs, under the "long" Hypothesis profile of tests/conftest.py
(``HYPOTHESIS_PROFILE=long``): ``--examples`` per target, a fresh random seed each run unless
``--seed`` names one, a reproduction blob printed with any failure. ``-k`` picks targets as
pytest's ``-k`` does. Prints pytest's own output, then a table of the examples run per
target, and exits with pytest's status (0: nothing found).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_fuzz_*.py"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="examples per target")
    parser.add_argument("-k", dest="select", default="", help="pytest -k expression")
    parser.add_argument("--seed", type=int, help="Hypothesis seed (default: random)")
    args = parser.parse_args()
    if args.examples < 1:
        parser.error("--examples must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        env = {
            **os.environ,
            "HYPOTHESIS_PROFILE": "long",
            "PMQ_FUZZ_EXAMPLES": str(args.examples),
            "PMQ_FUZZ_REPORT": str(report),
        }
        command = [sys.executable, "-m", "pytest", *TARGETS, "-q", "-p", "no:cacheprovider",
                   "--timeout=0"]
        if args.select:
            command += ["-k", args.select]
        if args.seed is not None:
            command.append(f"--hypothesis-seed={args.seed}")
        started = time.monotonic()
        status = subprocess.run(command, cwd=ROOT, env=env, check=False).returncode
        counts = json.loads(report.read_text()) if report.exists() else {}
    print(f"\nexamples per target ({args.examples} asked, "
          f"{time.monotonic() - started:.0f} s, pytest exit {status}):")
    print(f"  {'examples':>8}  {'seconds':>7}  target")
    for target, seen in sorted(counts.items()):
        print(f"  {seen['examples']:>8}  {seen['seconds']:>7.0f}  {target}")
    return status


if __name__ == "__main__":
    sys.exit(main())
