"""The chaos suite's books: what one phase accepted, delivered and stored, what it lost,
how long it took to recover, and which promise it broke.

Messages are matched by (uid, n), the request number every body carries, not by id: a
request applied twice shows as one key under two ids. A key is *delivered* when its user
saw it (pushed live, or replayed after a reconnect; offline users are replayed once the
load stops), *stored* when a row of the message tables holds it, and *lost* when it was
answered 2xx and is not both.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from bench.chaos_load import HUNG, REFUSED, SHED, Plan, Record

LAST_SECOND = 1.0  # what AOF everysec may lose in a Redis crash


@dataclass
class Fault:
    """A fault as injected: its name, when it began and when its cause was removed (the
    kill, the proxy restored, Redis started again), in time.time() seconds."""

    name: str
    began: float
    ended: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Books:
    """Everything one phase observed, gathered by the harness."""

    plan: Plan
    fault: Fault
    records: list[Record]
    users: dict[int, dict[str, Any]]
    offline_seen: dict[int, set[tuple[str, int]]]
    offline_failed: int
    stored_rows: list[tuple[int, int, str, int]]
    stored_broadcasts: int
    log_errors: list[str]  # the node's log lines of this phase naming an error
    centre: dict[str, Any] = field(default_factory=dict)  # bench.chaos_centre.centre_check
    hooks: dict[str, Any] = field(default_factory=dict)  # bench.chaos_hooks.hooks_check


def accepted_keys(records: list[Record]) -> tuple[dict[tuple[int, int], float], dict[int, int]]:
    """(uid, n) -> when its 2xx came, for messages; broadcast number -> its id."""
    messages: dict[tuple[int, int], float] = {}
    broadcasts: dict[int, int] = {}
    for r in records:
        if not 200 <= r.outcome < 300:
            continue
        if r.what == "b":
            broadcasts[r.number] = int((r.data or {}).get("id", 0))
        else:
            for uid in r.uids:
                messages[(uid, r.number)] = r.answered
    return messages, broadcasts


def stored_counts(books: Books) -> tuple[collections.Counter[tuple[int, int]], int]:
    """How many rows hold each (uid, n) of this phase; and how many rows are duplicates
    (a key in more than one row, by id or by request)."""
    counts: collections.Counter[tuple[int, int]] = collections.Counter()
    for _mid, uid, body, _shard in books.stored_rows:
        data = orjson.loads(body)
        if isinstance(data, dict) and data.get("ph") == books.plan.phase and "n" in data:
            counts[(uid, int(data["n"]))] += 1
    return counts, sum(c - 1 for c in counts.values() if c > 1)


def delivered(books: Books, uid: int, n: int) -> bool:
    user = books.users.get(uid)
    if user is not None:
        return ("n", n) in user["key_set"]
    return ("n", n) in books.offline_seen.get(uid, set())


def recovery(books: Books) -> dict[str, float | None]:
    """Seconds from the fault's end until every user was connected again, and until the
    ingest answered 2xx again (0 if it never failed); None when it never did."""
    f = books.fault
    ups = [up for u in books.users.values() for down, up in u["outages"] if down >= f.began - 1]
    clients: float | None = max([0.0, *(up - f.ended for up in ups)])
    if not all(u["connected"] for u in books.users.values()):
        clients = None
    after = sorted((r for r in books.records if r.sent >= f.began and r.outcome != SHED),
                   key=lambda r: r.sent)
    failing = [r for r in after if not 200 <= r.outcome < 300]
    ingest: float | None = 0.0
    if failing:
        last = failing[-1]
        good = [r.answered for r in after if r.sent > last.sent and 200 <= r.outcome < 300]
        ingest = max(0.0, min(good) - f.ended) if good else None
    both = None if clients is None or ingest is None else max(clients, ingest)
    return {"clients_s": rnd(clients), "ingest_s": rnd(ingest), "recover_s": rnd(both)}


def lost_detail(books: Books, messages: dict[tuple[int, int], float],
                key: tuple[int, int]) -> dict[str, Any]:
    """A lost message, with times relative to the fault's start: its 2xx, and its user's
    outages (online users) or whether its replay check connected (offline users)."""
    began = books.fault.began
    uid, n = key
    user = books.users.get(uid)
    return {
        "uid": uid, "n": n, "answered": round(messages[key] - began, 3),
        "online": user is not None,
        "outages": [(round(d - began, 3), round(u - began, 3)) for d, u in user["outages"]]
        if user else None,
    }


def commonest(lines: list[str], top: int = 5) -> list[tuple[str, int]]:
    """The most frequent log lines, told apart by their text once time, pid and numbers are
    taken out."""
    shapes = collections.Counter(
        re.sub(r"\d+", "N", line.split(" ", 2)[-1])[:160] for line in lines
        if line[:4].isdigit()
    )
    return shapes.most_common(top)


def by_second(offsets: Iterable[float]) -> dict[str, int]:
    """How many of ``offsets`` (seconds from the fault's start) fall in each whole second."""
    counts = collections.Counter(math.floor(x) for x in offsets)
    return {str(second): counts[second] for second in sorted(counts)}


def rnd(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def account(books: Books, durability: str, reconnect_bound: float) -> dict[str, Any]:
    """The phase's row: counts, recovery, and the list of invariants it broke."""
    for user in books.users.values():
        user["key_set"] = {tuple(k) for k in user["keys"]}
    messages, broadcasts = accepted_keys(books.records)
    stored, stored_dups = stored_counts(books)
    undelivered = {k for k in messages if not delivered(books, *k)}
    unstored = {k for k in messages if not stored[k]}
    lost = undelivered | unstored
    f = books.fault
    last_second = {k for k in lost if f.began - LAST_SECOND <= messages[k] <= f.began}
    outcomes = collections.Counter(r.outcome for r in books.records)
    answered_2xx = sum(v for k, v in outcomes.items() if 200 <= k < 300)
    statuses: dict[str, Any] = {
        "2xx": answered_2xx,
        "503": outcomes[503],
        "refused": outcomes[REFUSED],
        "hung": outcomes[HUNG],
        "shed": outcomes[SHED],
        "other": {str(k): v for k, v in outcomes.items()
                  if (k >= 300 or 0 <= k < 200) and k != 503},
    }
    missed_broadcasts = sum(
        len(set(broadcasts) - {k[1] for k in u["key_set"] if k[0] == "b"})
        for u in books.users.values()
    )
    stored_unaccepted = sum(1 for k in stored if k not in messages)
    row: dict[str, Any] = {
        "fault": f.name,
        "accepted": len(messages),
        "delivered": len(messages) - len(undelivered),
        "stored": sum(1 for k in messages if stored[k]),
        "stored_duplicates": stored_dups,
        "undelivered": len(undelivered),
        "unstored": len(unstored),
        "lost": len(lost),
        "lost_last_second": len(last_second),
        "broadcasts_accepted": len(broadcasts),
        "broadcasts_stored": books.stored_broadcasts,
        "broadcast_misses": missed_broadcasts,
        "dup_same_connection": sum(u["same_conn_dups"] for u in books.users.values()),
        "dup_after_reconnect": sum(u["again_dups"] for u in books.users.values()),
        "double_applied": sum(len(u["double_applied"]) for u in books.users.values()),
        "stored_without_2xx": stored_unaccepted,
        "ingest": statuses,
        "users_dropped": sum(
            1 for u in books.users.values() if any(d >= f.began - 1 for d, _ in u["outages"])
        ),
        "client_errors": dict(sum((collections.Counter(u["errors"])
                                   for u in books.users.values()), collections.Counter())),
        "offline_checked": len(books.offline_seen),
        "offline_check_failed": books.offline_failed,
        "node_log_errors": len(books.log_errors),
        "node_log_top": commonest(books.log_errors),
        **recovery(books),
        "fault_detail": {"began": f.began, "ended": f.ended, **f.detail},
        "lost_by_second": by_second(messages[k] - f.began for k in lost),
        "lost_sample": [lost_detail(books, messages, k) for k in sorted(lost)[:10]],
        "rate_achieved": round(answered_2xx / books.plan.seconds, 1),
        "dup_same_connection_sample": [k for u in books.users.values()
                                       for k in u["dup_sample"]][:10],
    }
    row.update(centre_row(books))
    row.update(hooks_row(books, durability))
    row["failed"] = broken(row, durability, reconnect_bound)
    return row


def centre_row(books: Books) -> dict[str, Any]:
    """The notification centre's books (bench.chaos_centre): reads and retractions done, and
    those that did not hold, with how many of those were done in the last second before
    the fault."""
    c, f = books.centre, books.fault
    if not c:
        return {}

    def last_second(times: list[float]) -> int:
        return sum(1 for t in times if f.began - LAST_SECOND <= t <= f.began)

    return {
        "centre_retracted": c["retracted"],
        "centre_read": c["read"],
        "centre_retracted_back": len(c["retracted_back"]),
        "centre_read_unread": len(c["read_unread"]),
        "centre_last_second": last_second(c["retracted_back"]) + last_second(c["read_unread"]),
    }


def hooks_row(books: Books, durability: str) -> dict[str, Any]:
    """The events to the site (bench.chaos_hooks): how many came, taken again, and lost;
    an ack's or an undelivered event's loss forgiven (``hooks_forgiven``) when Redis itself
    lost it: answered in the last second before a crash with durability "none", or any time
    before Redis was emptied (the outbox was in it)."""
    h, f = books.hooks, books.fault
    if not h:
        return {}

    def forgiven(times: list[float]) -> int:
        if f.name == "redis-empty":
            return sum(1 for t in times if t <= f.ended)
        if loses_last_second(f.name, durability):
            return sum(1 for t in times if f.began - LAST_SECOND <= t <= f.ended)
        return 0

    return {
        "hooks_events": h["events"],
        "hooks_by_type": h["by_type"],
        "hooks_duplicates": h["duplicates"],
        "hooks_acks_confirmed": h["acks_confirmed"],
        "hooks_acked_missing": len(h["acked_missing"]),
        "hooks_online_missing": len(h["online_missing"]),
        "hooks_undelivered_acked": len(h["undelivered_acked"]),
        "hooks_forgiven": forgiven(h["acked_missing"]) + forgiven(h["undelivered_acked"]),
        "hooks_online_missing_sample": h["online_missing"][:10],
    }


def broken(row: dict[str, Any], durability: str, reconnect_bound: float) -> list[str]:
    """The promises this phase did not keep, each named with its numbers."""
    out = []
    tolerated = row["lost_last_second"] if loses_last_second(row["fault"], durability) else 0
    if row["lost"] - tolerated:
        out.append(f"lost {row['lost']} accepted messages "
                   f"({row['undelivered']} undelivered, {row['unstored']} unstored; "
                   f"{row['lost_last_second']} of them in the last second before the fault)")
    for key in ("stored_duplicates", "dup_same_connection", "double_applied",
                "broadcast_misses", "offline_check_failed"):
        if row[key]:
            out.append(f"{key} = {row[key]}")
    if row["broadcasts_stored"] < row["broadcasts_accepted"]:
        out.append(f"broadcasts stored {row['broadcasts_stored']} of "
                   f"{row['broadcasts_accepted']}")
    ingest = row["ingest"]
    centre = row.get("centre_retracted_back", 0) + row.get("centre_read_unread", 0)
    forgiven = row.get("centre_last_second", 0)
    if not loses_last_second(row["fault"], durability):
        forgiven = 0
    if centre - forgiven:
        out.append(f"centre: {row['centre_retracted_back']} retracted came back, "
                   f"{row['centre_read_unread']} read came back unread")
    hooks = row.get("hooks_acked_missing", 0) + row.get("hooks_undelivered_acked", 0)
    if hooks - row.get("hooks_forgiven", 0) or row.get("hooks_online_missing"):
        out.append(f"events to the site: {row['hooks_acked_missing']} acks with no "
                   f"message.acked, {row['hooks_online_missing']} users with no user.online, "
                   f"{row['hooks_undelivered_acked']} message.undelivered of acked messages "
                   f"({row['hooks_forgiven']} forgiven: lost with Redis)")
    if ingest["hung"]:
        out.append(f"{ingest['hung']} ingest requests hung past the publisher's timeout")
    if ingest["other"]:
        out.append(f"ingest answered neither 2xx nor 503: {ingest['other']}")
    if ingest["refused"] and row["fault"] not in REFUSAL_FAULTS:
        out.append(f"{ingest['refused']} ingest requests refused with the node up")
    if row["recover_s"] is None:
        out.append("did not recover (clients not all connected, or no 2xx after the fault)")
    elif row["clients_s"] is not None and row["clients_s"] > reconnect_bound:
        out.append(f"clients reconnected in {row['clients_s']} s, over the bound of "
                   f"{reconnect_bound:g} s")
    return out


REFUSAL_FAULTS = frozenset({"master", "socket-worker"})  # the ingest port itself goes away


def loses_last_second(fault: str, durability: str) -> bool:
    """Whether the fault may lose what was accepted in its last second: a Redis crash with
    durability "none" (AOF everysec). Redis emptied loses nothing: what had not reached
    storage yet is queued again by the socket workers that accepted it (pmq.domain.journal)."""
    return fault == "redis-kill" and durability != "aof"


COLUMNS = [
    ("fault", "fault", 13), ("accepted", "accepted", 8), ("delivered", "deliv", 8),
    ("stored", "stored", 8), ("stored_duplicates", "st.dup", 6),
    ("dup_after_reconnect", "cl.dup", 6), ("dup_same_connection", "conn.dup", 8),
    ("lost", "lost", 6), ("lost_last_second", "lost1s", 6), ("broadcast_misses", "bc.miss", 7),
    ("users_dropped", "dropped", 7), ("clients_s", "reconn.s", 8), ("ingest_s", "ingest.s", 8),
]


def table(rows: list[dict[str, Any]]) -> str:
    """The per-fault table, one line per phase, then each phase's broken promises."""
    lines = [" ".join(f"{title:>{width}}" for _, title, width in COLUMNS)
             + "  ingest 2xx/503/refused/hung/shed"]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['fault']:>13} {row['error']}")
            continue
        ingest = row["ingest"]
        lines.append(
            " ".join(f"{fmt(row[key]):>{width}}" for key, _, width in COLUMNS)
            + f"  {ingest['2xx']}/{ingest['503']}/{ingest['refused']}/{ingest['hung']}"
            f"/{ingest['shed']}"
        )
    for row in rows:
        for failure in row["failed"]:
            lines.append(f"FAILED {row['fault']}: {failure}")
    return "\n".join(lines)


def fmt(value: Any) -> str:
    if value is None:
        return "never"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.1f}"
    return str(value)


def markdown(result: dict[str, Any]) -> str:
    """A results file's per-fault table in Markdown, for docs/reliability.md."""
    head = ("| fault | accepted | delivered | stored | stored twice | dup. after reconnect "
            "| dup. on one connection | lost (in last s) | broadcasts missed | users dropped "
            "| clients back (s) | ingest 2xx again (s) | ingest 2xx / 503 / refused / hung |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for row in result["faults"]:
        if "error" in row:
            lines.append(f"| {row['fault']} | {row['error']} |")
            continue
        i = row["ingest"]
        lines.append(
            f"| {row['fault']} | {row['accepted']} | {row['delivered']} | {row['stored']} "
            f"| {row['stored_duplicates']} | {row['dup_after_reconnect']} "
            f"| {row['dup_same_connection']} | {row['lost']} ({row['lost_last_second']}) "
            f"| {row['broadcast_misses']} | {row['users_dropped']} | {fmt(row['clients_s'])} "
            f"| {fmt(row['ingest_s'])} | {i['2xx']} / {i['503']} / {i['refused']} / {i['hung']} |"
        )
    return "\n".join(lines)
