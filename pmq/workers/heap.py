"""Keep a long-lived worker's settled objects out of the garbage collector's full passes.

A socket worker holds tens of thousands of connections, each a few hundred objects that live
for hours. CPython's full (generation 2) collection walks all of them every time a quarter
as many new objects have survived since the last one: at 12,500 connections that is 0.7 to
0.8 s of CPU with the event loop stopped, which freed nothing in our measurements
(docs/benchmarks-2026-11-23.md, section d) and landed in the middle of broadcasts.

So, every ``interval`` the worker collects the young generations (a few ms, and it keeps
young garbage out of what follows) and freezes what survived: frozen objects are skipped by
every collection but still freed by reference counting, which is how connections go (a
closed connection leaves no reference cycle; tests/test_connection_memory.py checks that).
Only cyclic garbage among frozen objects would wait, so every ``reclaim`` seconds the heap
is unfrozen and collected once in full.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

FREEZE_SECONDS = 5.0
RECLAIM_SECONDS = 3600.0


def freeze_survivors() -> None:
    """Collect the young generations, then move every tracked object out of the collector."""
    gc.collect(1)
    gc.freeze()


def reclaim() -> int:
    """Unfreeze and collect everything once (cycles among frozen objects); returns what it
    freed. Stops the loop for as long as a full pass takes, so call it rarely."""
    gc.unfreeze()
    freed = gc.collect()
    gc.freeze()
    return freed


async def keep_heap_frozen(
    busy: Callable[[], bool],
    interval: float = FREEZE_SECONDS,
    reclaim_every: float = RECLAIM_SECONDS,
) -> None:
    """Freeze survivors every ``interval``; reclaim every ``reclaim_every`` once ``busy()``
    (a fan-out in progress, say) is false, so the full pass never lands inside one."""
    next_reclaim = time.monotonic() + reclaim_every
    while True:
        await asyncio.sleep(interval)
        if time.monotonic() >= next_reclaim and not busy():
            began = time.perf_counter()
            freed = reclaim()
            log.info(
                "full collection freed %d objects in %.0f ms",
                freed,
                (time.perf_counter() - began) * 1000,
            )
            next_reclaim = time.monotonic() + reclaim_every
        else:
            freeze_survivors()
