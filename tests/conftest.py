"""Shared fixtures: private Redis prefixes and real PMQ nodes (see tests.helpers)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import settings

from tests.helpers import REDIS_URL, Node, RedisServer, UserCentre

# Hypothesis profiles for the fuzz targets (tests/test_fuzz_*.py). "ci", the default, keeps
# them under a minute together and draws the same examples every run; "long" is what
# `python -m bench.fuzz --examples N` runs: N examples per target (PMQ_FUZZ_EXAMPLES), a
# fresh seed each time, and a reproduction blob printed for any failure.
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True)
settings.register_profile(
    "long",
    max_examples=int(os.environ.get("PMQ_FUZZ_EXAMPLES", "2000")),
    deadline=None,
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A private Redis key prefix, its keys deleted afterwards."""
    prefix = f"pmqtest:{secrets.token_hex(6)}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def make_node(tmp_path: Path, redis_prefix: str) -> Iterator[Callable[..., Node]]:
    """Factory of nodes sharing this test's Redis prefix; all are killed at teardown."""
    nodes: list[Node] = []

    def make(**sections: dict[str, Any]) -> Node:
        node_dir = tmp_path / f"node{len(nodes)}"
        node_dir.mkdir()
        node = Node(node_dir, redis_prefix, **sections)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.kill_all()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server (no persistence but explicit SAVEs) a test may kill, cut off
    or flush without touching other tests' Redis."""
    data = tmp_path / "redis"
    data.mkdir()
    server = RedisServer(data).start()
    yield server
    server.stop()


@pytest.fixture
def centre() -> Iterator[UserCentre]:
    """A user centre (tests.helpers.UserCentre) for nodes and authenticators in http mode."""
    uc = UserCentre()
    yield uc
    uc.close()
