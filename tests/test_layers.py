"""The floors of pmq/ and their walls, read from the source (no import runs).

Each package of pmq/ is a floor (docs/architecture.md); a module imports only from its own
floor and the floors below. The reactor and the task workers stand side by side on one
floor and never import each other: they meet in Redis. The client library (pmq/client/)
stands apart from the server: it imports only the client wire format and the back-off
policy, and nothing of the server imports it. docs/architecture.md lists every module,
and every module it lists exists.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PMQ = Path(__file__).resolve().parent.parent / "pmq"
ARCHITECTURE = PMQ.parent / "docs" / "architecture.md"

# Floor of each top-level part of pmq, lowest first. A module at pmq/NAME.py is its own part.
FLOORS: dict[str, int] = {
    "errors": 0,
    "config": 0,
    "configload": 0,
    "log": 0,
    "metrics": 0,
    "cancel": 0,
    "backoff": 0,
    "wire": 1,
    "redis": 2,
    "store": 3,
    "domain": 4,
    "handlers": 5,
    "reactor": 6,
    "tasks": 6,
    "workers": 7,
    "ctl": 8,
}
# Parts on one floor that must still not import each other.
APART = {frozenset({"reactor", "tasks"})}
# The client library: a part of its own, beside the server's floors.
CLIENT = "client"
CLIENT_IMPORTS = {"pmq.wire.client", "pmq.backoff"}  # all it may use of the server's code


def modules() -> list[Path]:
    return sorted(p for p in PMQ.rglob("*.py"))


def part_of(module: str) -> str:
    """``pmq.domain.inbox`` -> ``domain``; ``pmq.config`` -> ``config``."""
    return module.split(".")[1]


def imported(path: Path) -> set[str]:
    """The pmq modules ``path`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pmq."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "pmq":  # from pmq import metrics (not __version__: no module)
                found.update(f"pmq.{a.name}" for a in node.names if not a.name.startswith("__"))
            elif node.module.startswith("pmq."):
                found.add(node.module)
                # from pmq.redis import conn: the module pmq.redis.conn too
                names = (f"{node.module}.{a.name}" for a in node.names)
                found.update(name for name in names if is_module(name))
    return found


def is_module(name: str) -> bool:
    base = PMQ.parent / name.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def name_of(path: Path) -> str:
    parts = path.relative_to(PMQ.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_part_has_a_floor() -> None:
    parts = {part_of(name_of(p)) for p in modules() if name_of(p) != "pmq"}
    floors = {*FLOORS, CLIENT}
    assert parts <= floors, f"parts without a floor: {sorted(parts - floors)}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PMQ.parent)))
def test_imports_point_down(path: Path) -> None:
    module = name_of(path)
    if module == "pmq":
        return
    mine = part_of(module)
    for target in imported(path):
        theirs = part_of(target)
        if mine == CLIENT:
            assert theirs == CLIENT or target in CLIENT_IMPORTS, f"the client imports {target}"
            continue
        assert theirs != CLIENT, f"{module} imports the client library ({target})"
        assert FLOORS[theirs] <= FLOORS[mine], f"{module} imports {target}, a floor above"
        assert frozenset({mine, theirs}) not in APART, f"{module} imports {target}"


def test_the_master_never_imports_what_loads_after_fork() -> None:
    # What the master imports, and what those import in turn: the worker code must not be
    # among them (it is imported in the child, after the fork).
    seen, todo = set(), ["pmq.workers.master"]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = PMQ.parent / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = PMQ.parent / module.replace(".", "/") / "__init__.py"
        if path.exists():
            todo.extend(imported(path))
    after_fork = {m for m in seen if part_of(m) in {"reactor", "tasks", "handlers"}}
    after_fork |= seen & {"pmq.workers.socket", "pmq.workers.task"}
    assert not after_fork, f"the master imports {sorted(after_fork)}"


def test_the_module_map_matches_the_code() -> None:
    listed = set(re.findall(r"`(pmq/[\w/]+\.py)`", ARCHITECTURE.read_text()))
    present = {str(p.relative_to(PMQ.parent)) for p in modules()}
    required = {p for p in present if not p.endswith("__init__.py")}  # packages: optional
    assert not required - listed, f"modules missing from the map: {sorted(required - listed)}"
    assert not listed - present, f"listed modules that do not exist: {sorted(listed - present)}"
