"""pmq.redis.scripts: every Lua script is one file, registered by name, used, and loads into
Redis."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pytest
import redis

from pmq.redis import scripts

PMQ = Path(scripts.__file__).parents[2]  # pmq/redis/scripts/__init__.py -> pmq


def lua_files() -> dict[str, str]:
    """Every .lua file shipped in pmq.redis.scripts, by name (without .lua)."""
    folder = resources.files(scripts)
    return {
        entry.name.removesuffix(".lua"): entry.read_text(encoding="utf-8")
        for entry in folder.iterdir()
        if entry.name.endswith(".lua")
    }


def test_every_registered_name_has_a_file_and_every_file_a_name() -> None:
    files = lua_files()
    pieces = {name for name in files if name.startswith("_")}
    assert set(files) - pieces == set(scripts.NAMES)
    included = {
        m
        for source in files.values()
        for m in re.findall(r"^--! include (\w+)$", source, re.MULTILINE)
    }
    assert included <= pieces, "an include names no file"
    assert pieces <= included, "a shared piece nobody includes"


def test_every_script_is_run_by_name_somewhere_in_pmq() -> None:
    code = "\n".join(
        path.read_text() for path in PMQ.rglob("*.py") if path.parent.name != "scripts"
    )
    used = set(re.findall(r'scripts\.register\(\w+, "(\w+)"\)', code))
    assert used == set(scripts.NAMES)


@pytest.mark.parametrize("name", sorted(scripts.NAMES))
def test_each_script_says_its_keys_and_loads_into_redis(
    redis_client: redis.Redis, name: str
) -> None:
    source = scripts.source(name)
    assert "--! include" not in source
    assert source.startswith("-- KEYS: "), "a script's header names its KEYS first"
    sha = redis_client.script_load(source)
    assert redis_client.script_exists(sha) == [True]


def test_an_unknown_name_is_refused() -> None:
    with pytest.raises(KeyError):
        scripts.source("no_such_script")
