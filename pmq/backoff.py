"""Capped exponential back-off with full jitter: the client library's reconnect delay, and
the webhook sender's pause before it tries a failing site again.

After the n-th failed try in a row (n from 0) a client waits a random time in
``[0, min(cap, base * 2**n)]``. Full jitter spreads the clients a node dropped at once evenly
over each window, so their retries never come back as one wave; the cap bounds how long an
unlucky client waits once the node is back. ``bench.storm`` measures this policy on
thousands of clients around a kill -9 of every socket worker (docs/benchmarks.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_RANDOM = random.Random()
MAX_DOUBLINGS = 64  # past this the window is the cap anyway; 2**attempt stays a small float


@dataclass(frozen=True)
class Backoff:
    """Delays in seconds; ``attempt`` counts the failed tries in a row (for a client, since
    its last hello)."""

    base: float = 0.5
    cap: float = 10.0

    def window(self, attempt: int) -> float:
        """The largest delay after ``attempt`` failed tries: ``min(cap, base * 2**attempt)``."""
        return min(self.cap, self.base * 2 ** min(attempt, MAX_DOUBLINGS))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """A random delay in ``[0, window(attempt)]`` drawn from ``rng``."""
        return (rng or _RANDOM).uniform(0, self.window(attempt))
