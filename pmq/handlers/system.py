"""Connection-level actions: ping."""

from __future__ import annotations

import time
from typing import Any

from pmq.handlers.base import App, Caller, Handler


async def ping(app: App, caller: Caller, data: dict[str, Any]) -> dict[str, Any]:
    """Round trip check; answers the server's clock in unix ms."""
    return {"ts": int(time.time() * 1000)}


ACTIONS: dict[str, Handler] = {"ping": ping}
