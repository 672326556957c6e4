"""The chat's tables (``pmq_cs_message``, ``pmq_cs_session``): what pmq.store.base's Store
writes and reads of them, on the primary."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from pmq.store.rows import (
    CS_MESSAGE_COLUMNS,
    CS_ROWS_PER_INSERT,
    CS_SESSION_COLUMNS,
    StoredCsMessage,
    StoredCsSession,
)
from pmq.store.sqlbase import Sql
from pmq.wire.client import MAX_ID


class ChatSql(Sql):
    """The chat's part of a Store."""

    def write_cs(
        self, messages: Sequence[StoredCsMessage], sessions: Sequence[StoredCsSession]
    ) -> int:
        """Insert chat messages and sessions in one transaction; ids already stored are
        skipped, so a retried batch never duplicates. Returns the rows newly inserted."""
        tables = [
            ("pmq_cs_message", CS_MESSAGE_COLUMNS, [dataclasses.astuple(m) for m in messages]),
            ("pmq_cs_session", CS_SESSION_COLUMNS, [dataclasses.astuple(s) for s in sessions]),
        ]
        inserted = 0
        with self._session("write_cs", write=True) as cur:
            for table, columns, rows in tables:
                for start in range(0, len(rows), CS_ROWS_PER_INSERT):
                    chunk = rows[start : start + CS_ROWS_PER_INSERT]
                    one_row = "(" + ", ".join([self.placeholder] * len(chunk[0])) + ")"
                    cur.execute(
                        f"{self.insert_ignore} INTO {table} ({columns}) "
                        f"VALUES {', '.join([one_row] * len(chunk))}",
                        [v for row in chunk for v in row],
                    )
                    inserted += cur.rowcount
        return inserted

    def cs_session(self, session_id: int) -> StoredCsSession | None:
        """The stored session ``session_id``, or None."""
        with self._session("cs_session", write=False) as cur:
            cur.execute(
                f"SELECT {CS_SESSION_COLUMNS} FROM pmq_cs_session WHERE id = {self.placeholder}",
                (session_id,),
            )
            rows = cur.fetchall()
        return StoredCsSession(*rows[0]) if rows else None

    def cs_messages(
        self, session_id: int, before_id: int = 0, limit: int = 50
    ) -> list[StoredCsMessage]:
        """The session's stored messages with ids below ``before_id`` (0: no bound), newest
        first, at most ``limit``. Page by passing the last id returned as ``before_id``."""
        p = self.placeholder
        with self._session("cs_messages", write=False) as cur:
            cur.execute(
                f"SELECT {CS_MESSAGE_COLUMNS} FROM pmq_cs_message "
                f"WHERE session_id = {p} AND id < {p} ORDER BY id DESC LIMIT {p}",
                (session_id, before_id or MAX_ID, limit),
            )
            return [StoredCsMessage(*row) for row in cur.fetchall()]

    def cs_messages_between(
        self, uid: int, agent: int, before_id: int = 0, limit: int = 50
    ) -> list[StoredCsMessage]:
        """The stored messages of the closed sessions between user ``uid`` and ``agent``
        (sessions are stored once closed) with ids below ``before_id`` (0: no bound), newest
        first, at most ``limit``."""
        p = self.placeholder
        with self._session("cs_messages_between", write=False) as cur:
            cur.execute(
                f"SELECT {', '.join('m.' + c for c in CS_MESSAGE_COLUMNS.split(', '))} "
                "FROM pmq_cs_message m JOIN pmq_cs_session s ON m.session_id = s.id "
                f"WHERE s.uid = {p} AND s.agent = {p} AND m.id < {p} "
                f"ORDER BY m.id DESC LIMIT {p}",
                (uid, agent, before_id or MAX_ID, limit),
            )
            return [StoredCsMessage(*row) for row in cur.fetchall()]

