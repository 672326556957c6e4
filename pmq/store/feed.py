"""The notification centre's SQL (docs/notification-centre.md): a user's feed read newest
first, retractions and edits, and read state.

- A retracted message or broadcast keeps its row with ``revoked = 1`` (a tombstone): every read
  leaves it out, and the message's own INSERT IGNORE, should it come after the retraction
  (several writers drain one queue), finds the row there and changes nothing.
- An edit writes the whole message with its new body the same way: an upsert.
- Read state: ``pmq_read`` (uid, id, ts) holds the items a user read one by one,
  ``pmq_read_mark`` (uid, kind, mark) the id up to which every item of a kind ("*": of
  every kind) is read; a mark only rises. Both live on the primary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pmq.store.rows import MSG_COLUMNS, ReadRows, StoredBroadcast, StoredMessage
from pmq.store.sqlbase import Cursor, Sql

BROADCAST_COLUMNS = "id, grp, kind, body, ts"
REVOKED = "TINYINT NOT NULL DEFAULT 0"  # the column schema version 4 adds to older tables


class FeedSql(Sql):
    """The notification centre's part of a Store."""

    def added_columns(self) -> list[tuple[str, str, str]]:
        """(table, column, definition) schema version 4 added to tables an older PMQ made:
        init_schema() adds those missing."""
        tables = [f"pmq_msg_{n}" for n in self.owned]
        if self.primary:
            tables.append("pmq_broadcast")
        return [(table, "revoked", REVOKED) for table in tables]

    def added_indexes(self) -> list[tuple[str, str]]:
        """(table, columns) schema version 4 indexes: a user's messages by id, so a page of
        the feed reads only its rows, newest first."""
        return [(f"pmq_msg_{n}", "uid, id") for n in self.owned]

    def feed(
        self, uid: int, before: int, after: int, kind: str | None, limit: int
    ) -> list[StoredMessage]:
        """``uid``'s messages, acked or not, not retracted, with ``after`` < id < ``before``
        (of ``kind`` only, when given), newest first, at most ``limit``."""
        rows = self._newest(
            "feed", MSG_COLUMNS, self.table(uid), f"uid = {self.placeholder}", [uid],
            before, after, kind, limit,
        )
        return [StoredMessage(*row) for row in rows]

    def feed_broadcasts(
        self, groups: Sequence[str], before: int, after: int, kind: str | None, limit: int
    ) -> list[StoredBroadcast]:
        """Broadcasts to ``groups``, not retracted, with ``after`` < id < ``before`` (of
        ``kind`` only, when given), newest first, at most ``limit``."""
        rows = self._newest(
            "feed_broadcasts", BROADCAST_COLUMNS, "pmq_broadcast",
            f"grp IN ({self.marks(len(groups))})", [*groups], before, after, kind, limit,
        )
        return [StoredBroadcast(*row) for row in rows]

    def _newest(
        self,
        op: str,
        columns: str,
        table: str,
        owner: str,
        params: list[object],
        before: int,
        after: int,
        kind: str | None,
        limit: int,
    ) -> list[tuple[Any, ...]]:
        """The rows of ``table`` matching ``owner`` (its ``params``), not retracted, with
        ``after`` < id < ``before`` (of ``kind`` only, when given), newest first."""
        p = self.placeholder
        where = f"{owner} AND revoked = 0 AND id < {p} AND id > {p}"
        params = [*params, before, after]
        if kind is not None:
            where += f" AND kind = {p}"
            params.append(kind)
        with self._session(op, write=False) as cur:
            cur.execute(
                f"SELECT {columns} FROM {table} WHERE {where} ORDER BY id DESC LIMIT {p}",
                (*params, limit),
            )
            return list(cur.fetchall())

    def messages_by_ids(self, uid: int, ids: Sequence[int]) -> list[StoredMessage]:
        """Those of ``ids`` that are ``uid``'s messages, not retracted."""
        if not ids:
            return []
        p = self.placeholder
        with self._session("messages_by_ids", write=False) as cur:
            cur.execute(
                f"SELECT {MSG_COLUMNS} FROM {self.table(uid)} "
                f"WHERE uid = {p} AND revoked = 0 AND id IN ({self.marks(len(ids))})",
                (uid, *ids),
            )
            return [StoredMessage(*row) for row in cur.fetchall()]

    def broadcasts_by_ids(self, ids: Sequence[int]) -> list[StoredBroadcast]:
        """Those of ``ids`` that are broadcasts, not retracted."""
        if not ids:
            return []
        with self._session("broadcasts_by_ids", write=False) as cur:
            cur.execute(
                f"SELECT {BROADCAST_COLUMNS} FROM pmq_broadcast "
                f"WHERE revoked = 0 AND id IN ({self.marks(len(ids))})",
                tuple(ids),
            )
            return [StoredBroadcast(*row) for row in cur.fetchall()]

    def find_message(self, message_id: int) -> tuple[StoredMessage, bool] | None:
        """The message ``message_id`` of any user in the owned shards, and whether it was
        retracted; None when no shard holds it (one primary-key look per shard)."""
        with self._session("find_message", write=False) as cur:
            for n in self.owned:
                cur.execute(
                    f"SELECT {MSG_COLUMNS}, revoked FROM pmq_msg_{n} WHERE id = {self.placeholder}",
                    (message_id,),
                )
                found = cur.fetchall()
                if found:
                    return StoredMessage(*found[0][:6]), bool(found[0][6])
        return None

    def find_broadcast(self, broadcast_id: int) -> tuple[StoredBroadcast, bool] | None:
        """The broadcast ``broadcast_id`` and whether it was retracted, or None."""
        with self._session("find_broadcast", write=False) as cur:
            cur.execute(
                f"SELECT {BROADCAST_COLUMNS}, revoked FROM pmq_broadcast "
                f"WHERE id = {self.placeholder}",
                (broadcast_id,),
            )
            found = cur.fetchall()
        return (StoredBroadcast(*found[0][:5]), bool(found[0][5])) if found else None

    def read_state(self, uid: int, since_ms: int) -> ReadRows:
        """``uid``'s read marks, and the items read one by one at or after ``since_ms``."""
        p = self.placeholder
        with self._session("read_state", write=False) as cur:
            cur.execute(f"SELECT kind, mark FROM pmq_read_mark WHERE uid = {p}", (uid,))
            marks = {str(kind): int(mark) for kind, mark in cur.fetchall()}
            cur.execute(
                f"SELECT id, ts FROM pmq_read WHERE uid = {p} AND ts >= {p}", (uid, since_ms)
            )
            ids = [(int(i), int(ts)) for i, ts in cur.fetchall()]
        return ReadRows(uid, ids, marks)

    def write_centre(
        self,
        reads: Sequence[ReadRows],
        revoked: Sequence[StoredMessage],
        edited: Sequence[StoredMessage],
        revoked_broadcasts: Sequence[StoredBroadcast],
    ) -> None:
        """Write read state, retractions and edits in one transaction (idempotent: a retried
        batch changes nothing more)."""
        with self._session("write_centre", write=True) as cur:
            for row in revoked:
                cur.execute(*self._message_upsert(row, "revoked = 1", revoked=1))
            for row in edited:
                cur.execute(*self._message_upsert(row, "body = NEW(body)", revoked=0))
            for b in revoked_broadcasts:
                cur.execute(
                    self.upsert(
                        "pmq_broadcast", f"{BROADCAST_COLUMNS}, revoked", 1, "id", "revoked = 1"
                    ),
                    (b.id, b.group, b.kind, b.body, b.ts, 1),
                )
            for read in reads:
                self._write_reads(cur, read)

    def _message_upsert(
        self, row: StoredMessage, updates: str, revoked: int
    ) -> tuple[str, tuple[object, ...]]:
        sql = self.upsert(self.table(row.uid), f"{MSG_COLUMNS}, revoked", 1, "id", updates)
        return sql, (row.id, row.uid, row.kind, row.from_uid, row.body, row.ts, revoked)

    def _write_reads(self, cur: Cursor, read: ReadRows) -> None:
        execute = cur.execute
        p = self.placeholder
        if read.ids:
            execute(
                f"{self.insert_ignore} INTO pmq_read (uid, id, ts) VALUES "
                + ", ".join([f"({p}, {p}, {p})"] * len(read.ids)),
                [v for i, ts in read.ids for v in (read.uid, i, ts)],
            )
        if read.marks:
            execute(
                self.upsert(
                    "pmq_read_mark", "uid, kind, mark", len(read.marks), "uid, kind",
                    "mark = GREATEST(mark, NEW(mark))",
                ),
                [v for kind, mark in sorted(read.marks.items()) for v in (read.uid, kind, mark)],
            )
