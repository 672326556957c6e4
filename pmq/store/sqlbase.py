"""What the store's SQL is written against: a DB-API cursor, and the part of a
:class:`~pmq.store.base.Store` its SQL mixins (pmq.store.chatsql, pmq.store.feed) use.

The engines fill in the class variables and ``_session``; the mixins only write SQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Protocol


class Cursor(Protocol):
    """The part of a DB-API cursor the shared SQL uses."""

    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> object: ...

    def fetchall(self) -> Sequence[Any]: ...


class Sql:
    """The store's SQL basics: its engine's words, its shards, a transaction."""

    engine: ClassVar[str]  # "sqlite" or "mysql", for error messages
    placeholder: ClassVar[str]  # "?" or "%s"
    insert_ignore: ClassVar[str]  # "INSERT OR IGNORE" or "INSERT IGNORE"
    shards: int
    owned: tuple[int, ...]  # the message shards this database holds
    primary: bool  # holds the tables other than the message shards

    def _session(self, op: str, write: bool) -> AbstractContextManager[Cursor]:
        """A cursor inside one transaction (each engine's; see pmq.store.base)."""
        raise NotImplementedError

    def table(self, uid: int) -> str:
        """The message table holding ``uid``'s messages."""
        return f"pmq_msg_{uid % self.shards}"

    def marks(self, count: int) -> str:
        """``count`` placeholders, comma-separated, for an ``IN (...)`` or a VALUES row."""
        return ", ".join([self.placeholder] * count)

    def upsert(self, table: str, columns: str, rows: int, key: str, updates: str) -> str:
        """An INSERT of ``rows`` rows of ``columns`` that, on a row whose ``key`` exists,
        applies ``updates`` instead: SET clauses where ``NEW(col)`` names the value the
        INSERT brought and ``GREATEST(`` the larger of two."""
        values = ", ".join([f"({self.marks(len(columns.split(',')))})"] * rows)
        if self.engine == "sqlite":
            sets = updates.replace("NEW(", "(excluded.").replace("GREATEST(", "MAX(")
            tail = f"ON CONFLICT ({key}) DO UPDATE SET {sets}"
        else:
            tail = f"ON DUPLICATE KEY UPDATE {updates.replace('NEW(', 'VALUES(')}"
        return f"INSERT INTO {table} ({columns}) VALUES {values} {tail}"
