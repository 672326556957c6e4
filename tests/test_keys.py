"""Pure unit tests of pmq/redis/keys.py: every key is under the prefix and names one thing."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable

import pytest

from pmq.redis.keys import Keys


def key_methods() -> list[str]:
    """Every public Keys method that returns a key (a str), found by reflection."""
    names = []
    for name, member in inspect.getmembers(Keys, inspect.isfunction):
        if not name.startswith("_") and typing.get_type_hints(member).get("return") is str:
            names.append(name)
    return names


def arity(method: Callable[..., str]) -> int:
    return len(inspect.signature(method).parameters)


def call(keys: Keys, name: str, arg: str) -> str:
    method = getattr(keys, name)
    return str(method(*[arg] * arity(method)))


METHODS = key_methods()


def test_methods_found() -> None:
    assert {"user_conns", "worker_conns", "workers", "worker_channel", "inbox"} <= set(METHODS)


def test_default_prefix() -> None:
    assert Keys().prefix == "pmq:"
    assert Keys().user_conns("7") == "pmq:{b0}:u:7:conns"
    assert Keys("pmq:", 16).user_conns("7") == "pmq:{b7}:u:7:conns"


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("prefix", ["pmq:", "test-1234:"])
def test_every_key_is_under_the_prefix(name: str, prefix: str) -> None:
    assert call(Keys(prefix), name, "1001").startswith(prefix)


@pytest.mark.parametrize("name", METHODS)
def test_different_prefixes_give_different_keys(name: str) -> None:
    assert call(Keys("a:"), name, "1001") != call(Keys("b:"), name, "1001")


@pytest.mark.parametrize("name", [n for n in METHODS if arity(getattr(Keys(), n)) > 0])
def test_different_arguments_give_different_keys(name: str) -> None:
    keys = Keys()
    assert call(keys, name, "1001") != call(keys, name, "1002")
    assert "1001" in call(keys, name, "1001")


def test_methods_do_not_collide() -> None:
    keys = Keys()
    produced = [call(keys, name, "1001") for name in METHODS]
    assert len(set(produced)) == len(produced)


def test_user_and_worker_keys_differ_for_the_same_id() -> None:
    keys = Keys()
    assert keys.user_conns("5") != keys.worker_conns("5")
    assert keys.worker_conns("5") != keys.worker_channel("5")


def test_auth_cache_is_namespaced() -> None:
    keys = Keys("p:")
    assert keys.auth_cache("abc") == "p:auth:abc"
    assert keys.auth_cache("abc") != keys.auth_cache("abd")


def test_by_bucket_groups_positions_in_order() -> None:
    uids = ["7", "12", "3", "8", "17"]
    assert Keys("p:", 5).by_bucket(uids) == {2: [0, 1, 4], 3: [2, 3]}
    assert Keys("p:", 1).by_bucket(uids) == {0: [0, 1, 2, 3, 4]}


@pytest.mark.parametrize("buckets", [1, 16])
def test_publish_keys_are_the_users_keys(buckets: int) -> None:
    keys = Keys("p:", buckets)
    assert keys.publish_keys("42") == (
        keys.inbox("42"),
        keys.inbox_bodies("42"),
        keys.unread("42"),
        keys.user_conns("42"),
        keys.last_read("42"),
    )
