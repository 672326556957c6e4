"""Dead letters: storage-queue items the writer could never write, kept with the reason.

Beside each storage queue, ``keys.store_dead(tag)`` is a LIST of entries, each a JSON object
``{"id", "error", "ts", "item"}``: a short id to name it by, why it could not be written (the
store's refusal, or why it is not a storage operation at all), when (unix ms), and the queue
item as it was (as text; ``item_b64`` instead when the bytes are not UTF-8). Nothing drops an
entry but an operator (``pmqctl dlq drop``); ``pmqctl dlq retry`` puts the item back at the
tail of its queue, e.g. after a schema fix. Their number is the ``dead`` queue depth of
``/metrics`` and ``pmqctl status``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import secrets
import time
from collections.abc import Iterable
from typing import Any, cast

import orjson
import redis
from redis.cluster import RedisCluster

from pmq.redis import scripts
from pmq.redis.keys import Keys

SyncRedis = redis.Redis | RedisCluster


def entry(item: bytes, error: str, ts_ms: int | None = None) -> bytes:
    """The encoded dead letter of queue ``item``, refused for ``error``."""
    letter: dict[str, Any] = {
        "id": secrets.token_hex(6),
        "error": error[:1000],
        "ts": int(time.time() * 1000) if ts_ms is None else ts_ms,
    }
    try:
        letter["item"] = item.decode()
    except UnicodeDecodeError:
        letter["item_b64"] = base64.b64encode(item).decode()
    return orjson.dumps(letter)


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """One entry of the dead list of queue ``tag``; ``raw`` is the entry as stored."""

    id: str
    tag: str
    error: str
    ts: int
    item: bytes
    raw: bytes

    @classmethod
    def parse(cls, tag: str, raw: bytes) -> DeadLetter:
        """An entry as :func:`entry` wrote it; one that is not (edited by hand) is still
        listed, with its whole text as the item, so it can be dropped."""
        try:
            letter = orjson.loads(raw)
            item = (
                letter["item"].encode()
                if "item" in letter
                else base64.b64decode(letter["item_b64"], validate=True)
            )
            return cls(str(letter["id"]), tag, str(letter["error"]), int(letter["ts"]), item, raw)
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
            return cls(raw.hex()[:12], tag, "not a dead-letter entry", 0, raw, raw)

    def view(self) -> dict[str, Any]:
        """The entry for ``pmqctl dlq list --json``."""
        return {
            "id": self.id,
            "queue": self.tag,
            "error": self.error,
            "ts": self.ts,
            "item": self.item.decode(errors="replace"),
        }


def read(client: SyncRedis, keys: Keys, limit: int = 0) -> list[DeadLetter]:
    """Every dead letter of every storage queue (``limit`` > 0: that many per queue), in
    the order they died within each queue."""
    found: list[DeadLetter] = []
    for tag in keys.store_tags():
        raws = cast(list[bytes], client.lrange(keys.store_dead(tag), 0, limit - 1))
        found += [DeadLetter.parse(tag, raw) for raw in raws]
    return found


def count(client: SyncRedis, keys: Keys) -> int:
    """How many dead letters all storage queues hold."""
    return sum(int(client.llen(keys.store_dead(tag))) for tag in keys.store_tags())


def retry(client: SyncRedis, keys: Keys, letters: Iterable[DeadLetter]) -> int:
    """Put the items of ``letters`` back at the tail of their queues (each at most once,
    even against a concurrent retry); returns how many moved."""
    script = scripts.register(client, "deadletter_retry")
    moved = 0
    for tag, group in _by_tag(letters).items():
        args = [part for letter in group for part in (letter.raw, letter.item)]
        lists = [keys.store_dead(tag), keys.store_queue(tag)]
        moved += int(cast(int, script(keys=lists, args=args)))
    return moved


def drop(client: SyncRedis, keys: Keys, letters: Iterable[DeadLetter]) -> int:
    """Delete ``letters`` for good; returns how many were still there."""
    dropped = 0
    for tag, group in _by_tag(letters).items():
        for letter in group:
            # redis-py sends bytes as they are; its hint says str only.
            dropped += int(client.lrem(keys.store_dead(tag), 1, letter.raw))  # type: ignore[arg-type]
    return dropped


def select(letters: list[DeadLetter], ids: Iterable[str]) -> tuple[list[DeadLetter], list[str]]:
    """The letters named by ``ids``, and the ids that name none."""
    wanted = list(dict.fromkeys(ids))
    chosen = [letter for letter in letters if letter.id in wanted]
    found = {letter.id for letter in chosen}
    return chosen, [i for i in wanted if i not in found]


def format_letters(letters: Iterable[DeadLetter]) -> str:
    """The text ``pmqctl dlq list`` prints: a line per letter, its item indented below."""
    lines = []
    for letter in letters:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(letter.ts / 1000))
        lines.append(f"{letter.id}  queue {letter.tag}  {when} UTC  {letter.error}")
        lines.append(f"    {letter.item[:300].decode(errors='replace')}")
    return "\n".join(lines)


def _by_tag(letters: Iterable[DeadLetter]) -> dict[str, list[DeadLetter]]:
    groups: dict[str, list[DeadLetter]] = {}
    for letter in letters:
        groups.setdefault(letter.tag, []).append(letter)
    return groups
