"""Hot reload of pmq.handlers: import afresh into a new registry, or keep the old one."""

from __future__ import annotations

import importlib
import sys

from pmq.handlers.base import Handler

PACKAGE = "pmq.handlers"


def _handler_modules() -> dict[str, object]:
    return {n: m for n, m in sys.modules.items() if n == PACKAGE or n.startswith(PACKAGE + ".")}


def load_handlers() -> dict[str, Handler]:
    """Re-import every handler module and build a fresh registry.

    On any error (a syntax error in a module, say) the previously imported modules are put
    back in sys.modules untouched and the error is raised: the caller keeps its registry.
    """
    old = _handler_modules()
    for name in old:
        del sys.modules[name]
    importlib.invalidate_caches()
    try:
        package = importlib.import_module(PACKAGE)
        registry: dict[str, Handler] = package.build_registry()
    except BaseException:
        for name in _handler_modules():
            del sys.modules[name]
        sys.modules.update(old)  # type: ignore[arg-type]
        raise
    return registry
