"""A cancellation that redis-py swallowed still stops a forever-loop."""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Raise CancelledError if the current task was asked to stop but is still running.

    redis-py (8 on Python 3.11) can swallow a cancellation that lands while it opens a new
    connection: the command then goes on as if nothing happened, or fails with a RedisError
    instead. The supervisor of every loop calls this before it restarts a failed loop; a loop
    that waits between turns without an error calls it at each turn, so such a task still
    stops, one turn late."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
