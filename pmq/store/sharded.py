"""Message shards on several MySQL servers (``storage.shard_map``).

A :class:`ShardedStore` looks like one :class:`Store`: every call about one user's messages
goes to the database holding ``pmq_msg_{uid % shards}``, a batch of rows is split by
database (one transaction in each; a failure of one is retried as a whole, which the
idempotent inserts make safe), retention and counts visit every database, and the other
tables (broadcasts, last-read times, chat) stay on the primary, ``storage.url``, which also
holds every shard the map does not name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager

from pmq.store.base import CATCH_UP_ROWS, Cursor, Store
from pmq.store.rows import (
    LastRead,
    Mark,
    ReadRows,
    StoredBroadcast,
    StoredCsMessage,
    StoredCsSession,
    StoredMessage,
)


class ShardedStore(Store):
    """``primary`` owns the unmapped shards and the other tables; ``others`` each own the
    shards of their ``owned``. Every store must be made for the same ``shards``."""

    def __init__(self, primary: Store, others: Sequence[Store]) -> None:
        super().__init__(primary.shards)
        self.engine = primary.engine  # type: ignore[misc]
        self.placeholder = primary.placeholder  # type: ignore[misc]
        self.insert_ignore = primary.insert_ignore  # type: ignore[misc]
        self.replace_into = primary.replace_into  # type: ignore[misc]
        self.keep_higher_mark = primary.keep_higher_mark  # type: ignore[misc]
        self.main = primary
        self.stores = [primary, *others]
        self.by_shard: dict[int, Store] = {}
        for store in self.stores:
            for n in store.owned:
                self.by_shard[n] = store
        for store in others:
            store.primary = False
        missing = set(range(self.shards)) - set(self.by_shard)
        if missing:
            raise ValueError(f"no database holds message shards {sorted(missing)}")

    def store_of(self, uid: int) -> Store:
        return self.by_shard[uid % self.shards]

    # What an engine provides: the primary's (used only by the primary's own tables).
    def _session(self, op: str, write: bool) -> AbstractContextManager[Cursor]:
        return self.main._session(op, write)

    def _schema_statements(self) -> list[str]:
        return self.main._schema_statements()

    def _schema_table(self) -> str:
        return self.main._schema_table()

    def _add_index(self, cur: Cursor, table: str, column: str) -> None:
        self.main._add_index(cur, table, column)

    def _delete_chunk(self, table: str, column: str, limit: int) -> str:
        return self.main._delete_chunk(table, column, limit)

    def _add_column(self, cur: Cursor, table: str, column: str, definition: str) -> None:
        self.main._add_column(cur, table, column, definition)

    def table(self, uid: int) -> str:
        return self.store_of(uid).table(uid)

    # Every database -----------------------------------------------------------------
    def init_schema(self) -> None:
        """Create the tables on every database (message shards where they live)."""
        for store in self.stores:
            store.init_schema()

    def ping(self) -> None:
        for store in self.stores:
            store.ping()

    def close(self) -> None:
        for store in self.stores:
            store.close()

    def delete_before(self, ts_ms: int) -> int:
        return sum(store.delete_before(ts_ms) for store in self.stores)

    def count_messages(self) -> int:
        return sum(store.count_messages() for store in self.stores)

    # One user's messages: their shard's database ------------------------------------
    def write_messages(self, rows: Sequence[StoredMessage]) -> int:
        by_store: dict[int, list[StoredMessage]] = {}
        for row in rows:
            by_store.setdefault(id(self.store_of(row.uid)), []).append(row)
        return sum(
            store.write_messages(by_store[id(store)])
            for store in self.stores
            if id(store) in by_store
        )

    def unacked(self, uid: int, after_id: int = 0, limit: int = 200) -> list[StoredMessage]:
        return self.store_of(uid).unacked(uid, after_id, limit)

    def unacked_of(
        self, uids: Iterable[int], after_id: int, limit: int = CATCH_UP_ROWS
    ) -> list[StoredMessage]:
        by_store: dict[int, list[int]] = {}
        for uid in uids:
            by_store.setdefault(id(self.store_of(uid)), []).append(uid)
        found = [
            row
            for store in self.stores
            if id(store) in by_store
            for row in store.unacked_of(by_store[id(store)], after_id, limit)
        ]
        return sorted(found, key=lambda row: row.id)

    def ack(self, uid: int, ids: Iterable[int]) -> int:
        return self.store_of(uid).ack(uid, ids)

    def existing(self, uid: int, ids: Iterable[int]) -> set[int]:
        return self.store_of(uid).existing(uid, ids)

    def unacked_users(self, shard: int, after_uid: int = 0, limit: int = 1000) -> list[int]:
        return self.by_shard[shard].unacked_users(shard, after_uid, limit)

    def feed(
        self, uid: int, before: int, after: int, kind: str | None, limit: int
    ) -> list[StoredMessage]:
        return self.store_of(uid).feed(uid, before, after, kind, limit)

    def messages_by_ids(self, uid: int, ids: Sequence[int]) -> list[StoredMessage]:
        return self.store_of(uid).messages_by_ids(uid, ids)

    def find_message(self, message_id: int) -> tuple[StoredMessage, bool] | None:
        for store in self.stores:
            found = store.find_message(message_id)
            if found is not None:
                return found
        return None

    def write_centre(
        self,
        reads: Sequence[ReadRows],
        revoked: Sequence[StoredMessage],
        edited: Sequence[StoredMessage],
        revoked_broadcasts: Sequence[StoredBroadcast],
    ) -> None:
        for store in self.stores:
            mine = [r for r in (*revoked, *edited) if self.store_of(r.uid) is store]
            if store is self.main:
                store.write_centre(
                    reads,
                    [r for r in revoked if r in mine],
                    [r for r in edited if r in mine],
                    revoked_broadcasts,
                )
            elif mine:
                store.write_centre(
                    [], [r for r in revoked if r in mine], [r for r in edited if r in mine], []
                )

    # The primary's tables -----------------------------------------------------------
    def redis_marks(self) -> dict[int, Mark]:
        return self.main.redis_marks()

    def raise_redis_marks(self, marks: Mapping[int, Mark]) -> dict[int, Mark]:
        return self.main.raise_redis_marks(marks)

    def write_broadcasts(self, rows: Sequence[StoredBroadcast]) -> int:
        return self.main.write_broadcasts(rows)

    def set_last_reads(self, rows: Sequence[LastRead]) -> None:
        self.main.set_last_reads(rows)

    def last_read(self, uid: int, kind: str) -> int | None:
        return self.main.last_read(uid, kind)

    def feed_broadcasts(
        self, groups: Sequence[str], before: int, after: int, kind: str | None, limit: int
    ) -> list[StoredBroadcast]:
        return self.main.feed_broadcasts(groups, before, after, kind, limit)

    def broadcasts_by_ids(self, ids: Sequence[int]) -> list[StoredBroadcast]:
        return self.main.broadcasts_by_ids(ids)

    def find_broadcast(self, broadcast_id: int) -> tuple[StoredBroadcast, bool] | None:
        return self.main.find_broadcast(broadcast_id)

    def read_state(self, uid: int, since_ms: int) -> ReadRows:
        return self.main.read_state(uid, since_ms)

    def write_cs(
        self, messages: Sequence[StoredCsMessage], sessions: Sequence[StoredCsSession]
    ) -> int:
        return self.main.write_cs(messages, sessions)

    def cs_session(self, session_id: int) -> StoredCsSession | None:
        return self.main.cs_session(session_id)

    def cs_messages(
        self, session_id: int, before_id: int = 0, limit: int = 50
    ) -> list[StoredCsMessage]:
        return self.main.cs_messages(session_id, before_id, limit)

    def cs_messages_between(
        self, uid: int, agent: int, before_id: int = 0, limit: int = 50
    ) -> list[StoredCsMessage]:
        return self.main.cs_messages_between(uid, agent, before_id, limit)
