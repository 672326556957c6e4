"""A cancellation that redis-py swallowed still stops a task worker's loop, one turn late."""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Raise CancelledError if the current task was asked to stop but is still running.

    redis-py (8.1 on Python 3.11) can swallow a cancellation that lands while it opens a new
    connection; the command then goes on as if nothing happened. Loops call this at each
    turn so such a task still stops, one turn late."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
