"""Storage-queue items as the storage writer reads them: each parsed (pmq.wire.storeops) into a
store row, an ack or a last-read time, and a batch of them sorted by what the store does with
each. An item that is not a storage operation is named in :attr:`Batch.malformed` with the
reason, never raised.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from pmq.store import StoredMessage
from pmq.store.rows import (
    LastRead,
    ReadRows,
    StoredBroadcast,
    StoredCsMessage,
    StoredCsSession,
)
from pmq.wire import storeops
from pmq.wire.storeops import (
    AckOp,
    AmendOp,
    BroadcastOp,
    BroadcastRevokeOp,
    CsMessageOp,
    CsSessionOp,
    LastReadOp,
    MessageOp,
    OpName,
    ReadOp,
)

Ack = tuple[int, list[int]]


@dataclasses.dataclass(slots=True)
class Batch:
    """Queue items parsed for the store: rows to insert, then acks as (uid, ids)."""

    rows: list[StoredMessage] = dataclasses.field(default_factory=list)
    acks: list[Ack] = dataclasses.field(default_factory=list)
    last_reads: list[LastRead] = dataclasses.field(default_factory=list)
    cs_messages: list[StoredCsMessage] = dataclasses.field(default_factory=list)
    cs_sessions: list[StoredCsSession] = dataclasses.field(default_factory=list)
    broadcasts: list[StoredBroadcast] = dataclasses.field(default_factory=list)
    # The notification centre's (pmq.store.feed): read state, retractions and edits, written
    # after the rows above, so that a retraction or edit finds its row when it is there.
    reads: list[ReadRows] = dataclasses.field(default_factory=list)
    revoked: list[StoredMessage] = dataclasses.field(default_factory=list)
    edited: list[StoredMessage] = dataclasses.field(default_factory=list)
    revoked_broadcasts: list[StoredBroadcast] = dataclasses.field(default_factory=list)
    malformed: dict[int, str] = dataclasses.field(default_factory=dict)  # position: reason

    def add(self, op: storeops.StoreOp) -> None:
        """Sort one parsed op into the rows the store writes (an ack of no ids is none)."""
        if isinstance(op, MessageOp):
            self.rows.append(StoredMessage(*op))
        elif isinstance(op, AckOp):
            if op.ids:
                self.acks.append((op.uid, op.ids))
        elif isinstance(op, LastReadOp):
            self.last_reads.append(LastRead(*op))
        elif isinstance(op, CsMessageOp):
            self.cs_messages.append(StoredCsMessage(*op))
        elif isinstance(op, CsSessionOp):
            self.cs_sessions.append(
                StoredCsSession(
                    id=op.id,
                    uid=op.uid,
                    agent=op.agent,
                    status="closed",
                    opened_at=op.opened_at,
                    closed_at=op.closed_at,
                    last_msg_id=op.last_msg_id,
                )
            )
        elif isinstance(op, BroadcastOp):
            self.broadcasts.append(StoredBroadcast(*op))
        else:
            self.add_centre(op)

    def add_centre(self, op: ReadOp | AmendOp | BroadcastRevokeOp) -> None:
        if isinstance(op, ReadOp):
            self.reads.append(ReadRows(op.uid, op.ids, op.marks))
        elif isinstance(op, AmendOp):
            rows = self.revoked if op.name == OpName.REVOKE else self.edited
            rows.append(StoredMessage(*op.message))
        else:
            self.revoked_broadcasts.append(StoredBroadcast(*op.broadcast))


def parse_batch(items: Sequence[bytes]) -> Batch:
    """Parse every item; the malformed ones are left out and named in ``malformed``."""
    batch = Batch()
    for position, raw in enumerate(items):
        try:
            op = storeops.parse(raw)
        except ValueError as exc:
            batch.malformed[position] = f"malformed: {exc}"
            continue
        batch.add(op)
    return batch
