"""Floor 5, client actions, one module per group, gathered into a registry by
:func:`build_registry`. This package is the hot-reload target: a socket worker re-imports
it on HUP and swaps the new registry in with one assignment (pmq.reactor.reload). Every
module lists its actions in a module-level ``ACTIONS`` dict; add a module here to ship a
new group. It imports only the floors below (up to pmq.domain), never the reactor, tasks
or workers.
"""

from __future__ import annotations

import importlib

from pmq.handlers.base import Handler

MODULES = (
    "pmq.handlers.system",
    "pmq.handlers.msg",
    "pmq.handlers.centre",
    "pmq.handlers.unread",
    "pmq.handlers.cs",
)


def build_registry() -> dict[str, Handler]:
    """Import every handler module and return action name -> handler."""
    registry: dict[str, Handler] = {}
    for name in MODULES:
        module = importlib.import_module(name)
        for action, handler in module.ACTIONS.items():
            if action in registry:
                raise RuntimeError(f"action {action!r} defined twice (in {name})")
            registry[action] = handler
    return registry
