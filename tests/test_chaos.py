"""The chaos suite's short form, one fault per test: under steady load (100 online users,
100 offline, 200 messages/s, a multicast and a broadcast every few seconds) the fault is
injected once, and afterwards every message answered 2xx reached its user and is stored
exactly once, no connection saw an id twice, no ingest request hung past 5 s or was answered
other than 2xx or 503, every client was connected again within the bound, and the site's
webhook receiver got every event the fault could have lost (a message.acked for each ack
answered, a user.online for each user, message.undelivered only for unacked messages).

Each test runs ``python -m bench.chaos --short --faults NAME`` for real: its own
redis-server, its own MariaDB database (so it needs the MariaDB of the test setup: it fails,
not skips, without it), proxies it cuts, and a node it kills and restarts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FAULTS = ["socket-worker", "task-worker", "master", "redis-kill", "redis-empty", "mysql-cut",
          "redis-cut"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.e2e
@pytest.mark.mysql
@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", FAULTS)
def test_fault_under_load_loses_nothing(fault: str, tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--short", "--faults", fault, "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=280,
    )
    assert out.exists(), f"no result (exit {done.returncode}):\n{done.stderr[-4000:]}"
    row = json.loads(out.read_text())["faults"][0]
    table = done.stderr[-3000:]
    assert row["fault"] == fault
    assert "error" not in row, table
    assert row["accepted"] > 0, table
    tolerated = row["lost_last_second"] if fault == "redis-kill" else 0
    assert row["lost"] <= tolerated, table
    assert row["stored_duplicates"] == 0, table
    assert row["dup_same_connection"] == 0, table
    assert row["double_applied"] == 0, table
    assert row["broadcast_misses"] == 0, table
    assert row["ingest"]["hung"] == 0, table
    assert row["ingest"]["other"] == {}, table
    assert row["recover_s"] is not None, table
    assert row["centre_retracted"] > 0 and row["centre_read"] > 0, table
    assert row["centre_retracted_back"] == 0 and row["centre_read_unread"] == 0, table
    assert row["hooks_acks_confirmed"] > 0 and row["hooks_online_missing"] == 0, table
    hooks_lost = row["hooks_acked_missing"] + row["hooks_undelivered_acked"]
    assert hooks_lost <= row["hooks_forgiven"], table
    assert row["failed"] == [], table
    assert done.returncode == 0, table


def test_books_name_every_broken_promise() -> None:
    """The accounting itself, on made-up observations: a message answered 202 and never
    seen is lost, one request stored under two ids is a stored duplicate, an id twice on
    one connection and a hung request are named, and a client still away is no recovery."""
    from bench.chaos_load import HUNG, Plan, Record
    from bench.chaos_report import Books, Fault, account

    plan = Plan(phase=3, run_id="r", ws_port=1, ingest_port=2, secret="s", online=(10, 11),
                offline=(20, 22), rate=1, offline_share=0.5, seconds=10, multicast_every=5,
                multicast_size=2, broadcast_every=5, connections=4)
    records = [
        Record(100.0, 100.1, "n", 1, (10,), 202, {"ids": ["501"]}),
        Record(100.0, 100.1, "n", 2, (11,), 202, {"ids": ["502"]}),  # never seen: lost
        Record(100.0, 100.1, "n", 3, (20,), 202, {"ids": ["503"]}),
        Record(101.0, 106.0, "n", 4, (21,), HUNG, None),
        Record(100.0, 100.1, "b", 0, (), 202, {"id": "600"}),
    ]
    seen = {"same_conn_dups": 0, "again_dups": 0, "double_applied": [], "dup_sample": [],
            "errors": {}, "connected": True}
    users = {
        10: {**seen, "keys": [("n", 1), ("b", 0)], "same_conn_dups": 1, "outages": []},
        11: {**seen, "keys": [("b", 0)], "outages": [(101.0, 103.0)], "connected": False},
    }
    row = [("503", 20), ("504", 20)]  # one request (n=3) stored under two ids
    stored = [(int(mid), uid, '{"ph": 3, "n": 3}', 0) for mid, uid in row]
    stored += [(501, 10, '{"ph": 3, "n": 1}', 2), (502, 11, '{"ph": 3, "n": 2}', 3)]
    books = Books(plan, Fault("socket-worker", 100.5, 100.5), records, users,
                  {20: {("n", 3)}}, 0, stored, 1, [])
    result = account(books, "none", reconnect_bound=15)
    assert (result["accepted"], result["delivered"], result["stored"]) == (3, 2, 3)
    assert (result["lost"], result["undelivered"], result["unstored"]) == (1, 1, 0)
    assert result["stored_duplicates"] == 1
    assert result["dup_same_connection"] == 1
    assert result["ingest"]["hung"] == 1
    assert result["recover_s"] is None
    assert len(result["failed"]) == 5, result["failed"]


def test_books_name_a_read_or_retraction_that_did_not_hold() -> None:
    """The centre's books (bench.chaos_centre), on made-up observations: a retraction that
    came back and a read that came back unread break the phase; with a Redis crash and
    durability "none", not when they were answered in the second before the crash."""
    from bench.chaos_load import Plan
    from bench.chaos_report import Books, Fault, account

    plan = Plan(phase=1, run_id="r", ws_port=1, ingest_port=2, secret="s", online=(), offline=(
        20, 21), rate=1, offline_share=1, seconds=10, multicast_every=5, multicast_size=2,
        broadcast_every=5, connections=4)
    centre = {"retracted": 4, "read": 4, "retracted_back": [99.5], "read_unread": [90.0]}
    for fault, failed in (("socket-worker", 1), ("redis-kill", 1)):
        books = Books(plan, Fault(fault, 100.0, 100.0), [], {}, {}, 0, [], 0, [], centre)
        row = account(books, "none", reconnect_bound=15)
        assert (row["centre_retracted_back"], row["centre_read_unread"]) == (1, 1)
        assert row["centre_last_second"] == 1
        assert [f for f in row["failed"] if f.startswith("centre:")] == [
            "centre: 1 retracted came back, 1 read came back unread"
        ] * failed
    books = Books(plan, Fault("redis-kill", 100.0, 100.0), [], {}, {}, 0, [], 0, [],
                  {**centre, "read_unread": []})
    assert not [f for f in account(books, "none", 15)["failed"] if f.startswith("centre:")]


def test_books_name_an_event_the_site_did_not_get() -> None:
    """The events' books (bench.chaos_hooks), on made-up observations: an ack answered with
    no message.acked, a user with no user.online and a message.undelivered of a message
    acked before it break the phase; duplicates are counted, not failures; with Redis
    emptied, what was answered before it came back is forgiven."""
    from bench.chaos_hooks import hooks_check
    from bench.chaos_load import Plan
    from bench.chaos_report import Books, Fault, account

    plan = Plan(phase=1, run_id="r", ws_port=1, ingest_port=2, secret="s", online=(10, 11),
                offline=(20, 22), rate=1, offline_share=1, seconds=10, multicast_every=5,
                multicast_size=2, broadcast_every=5, connections=4)

    def event(eid: str, type_: str, ts: int, **data: object) -> dict[str, object]:
        return {"id": eid, "type": type_, "ts": ts, "data": data}

    events = [
        event("e1", "user.online", 99_000, uid="10"),
        event("e1", "user.online", 99_000, uid="10"),  # taken again
        event("e2", "message.acked", 100_200, uid="10", ids=["501"]),
        event("e3", "message.undelivered", 103_000, uid="10", id="502", kind="notice"),
        event("e4", "user.online", 99_000, uid="99"),  # another phase's user
    ]
    users = {
        10: {"acked": [["501", 100.1], ["502", 101.0], ["503", 104.0]]},  # 503: no event
        11: {"acked": []},  # no user.online
    }
    hooks = hooks_check(plan, users, events, range(0, 50))
    assert hooks["events"] == 4 and hooks["duplicates"] == 1
    assert hooks["acked_missing"] == [101.0, 104.0] and hooks["online_missing"] == [11]
    assert hooks["undelivered_acked"] == [101.0]  # acked at 101 s, undelivered made at 103 s
    for fault, forgiven in (("socket-worker", 0), ("redis-empty", 2)):
        books = Books(plan, Fault(fault, 102.0, 102.0), [], {}, {}, 0, [], 0, [],
                      hooks=hooks)
        row = account(books, "none", reconnect_bound=15)
        assert row["hooks_forgiven"] == forgiven
        assert [f for f in row["failed"] if f.startswith("events")] == [
            "events to the site: 2 acks with no message.acked, 1 users with no user.online, "
            f"1 message.undelivered of acked messages ({forgiven} forgiven: lost with Redis)"
        ]
