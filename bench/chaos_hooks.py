"""The chaos suite's events to the site (docs/webhooks.md): the node under chaos runs with
webhooks on, POSTing to a receiver the harness runs (bench.receiver), and each phase checks
that its fault lost no event.

After the phase, once the site has had up to ``--drain`` seconds to get them, the events of
the phase's users are read from the receiver and held against what the load saw:

- ``message.acked``: every message id whose ``msg.ack`` the load saw answered 200 is in a
  message.acked of its user (``hooks_acked_missing`` lists when each missing ack was
  answered);
- ``user.online``: every online user of the phase has one (``hooks_online_missing``);
- ``message.undelivered``: none names a message whose ack had been answered before the event
  was made (``hooks_undelivered_acked``, with those answers' times).

At least once: an event taken again (an id seen before) is counted (``hooks_duplicates``),
not a failure. The outbox lives in Redis, so the accounting (bench.chaos_report) forgives
what Redis itself lost: the last second before a crash with durability "none", and every
event still waiting when Redis was emptied.
"""

from __future__ import annotations

import collections
from typing import Any

from bench.chaos_load import Plan

# Quick timers, so that a short phase sees them fire; retries quick after a fault.
SETTINGS = {"offline_grace": 1.0, "undelivered_after": 3.0, "timeout": 5.0, "max_backoff": 2.0}


def node_settings(url: str, secret: str) -> dict[str, Any]:
    """The node's ``[webhooks]`` section, every event type on."""
    return {"url": url, "secret": secret, **SETTINGS}


def hooks_check(
    plan: Plan, users: dict[int, dict[str, Any]], events: list[dict[str, Any]],
    uids: range,
) -> dict[str, Any]:
    """The books of the phase's events (module docstring): ``users`` the load's reports
    (each with ``acked``: [message id, when its ack was answered]), ``events`` everything the
    receiver took, of which those of ``uids`` (the phase's) count."""
    mine = [e for e in events if int(e["data"].get("uid") or e["data"].get("user") or 0) in uids]
    acked: dict[int, set[str]] = collections.defaultdict(set)
    online: set[int] = set()
    undelivered: list[tuple[int, str, int]] = []
    for event in mine:
        data = event["data"]
        if event["type"] == "message.acked":
            acked[int(data["uid"])].update(data["ids"])
        elif event["type"] == "user.online":
            online.add(int(data["uid"]))
        elif event["type"] == "message.undelivered":
            undelivered.append((int(data["uid"]), data["id"], int(event["ts"])))
    confirmed = {uid: dict(user.get("acked", [])) for uid, user in users.items()}
    missing = [when for uid, done in confirmed.items() for mid, when in done.items()
               if mid not in acked[uid]]
    too_late = [confirmed[uid][mid] for uid, mid, ts in undelivered
                if uid in confirmed and confirmed[uid].get(mid, ts / 1000) < ts / 1000]
    counts = collections.Counter(e["type"] for e in mine)
    return {
        "events": len(mine),
        "by_type": dict(counts),
        "duplicates": len(mine) - len({e["id"] for e in mine}),
        "acks_confirmed": sum(len(done) for done in confirmed.values()),
        "acked_missing": missing,
        "online_missing": sorted(set(plan.online) - online),
        "undelivered_acked": too_late,
    }


def all_arrived(plan: Plan, users: dict[int, dict[str, Any]], events: list[dict[str, Any]],
                uids: range) -> bool:
    """Whether every event the phase is owed came (what the harness waits for)."""
    books = hooks_check(plan, users, events, uids)
    return not books["acked_missing"] and not books["online_missing"]
