"""Every Lua script PMQ runs on Redis, one ``NAME.lua`` file each in this package.

A module asks for a script by name (``scripts.register(client, "inbox_publish")``) and
calls what it gets like redis-py's own registered scripts (EVALSHA, then EVAL once when
Redis does not know the script yet). The files are package data: a non-editable install
ships them (setup.cfg, ``[options.package_data]``).

Each file opens with a header comment that names its KEYS and ARGV and what it returns.
A script touches only the keys passed in KEYS (Redis Cluster sends the call to their slot),
except where its header says which key it reaches from inside, and that key shares the
hash tag, hence the slot, of the declared ones.

A line ``--! include _NAME`` is replaced by the file ``_NAME.lua``: a piece shared by
several scripts (``_now``: Redis's clock; ``_chat``: the chat's helpers). Files whose name
starts with ``_`` are such pieces, never scripts of their own.

This is Redis plumbing: it imports nothing of PMQ's.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from typing import Protocol, TypeVar

T_co = TypeVar("T_co", covariant=True)

# Every script, by the module that runs it.
NAMES = frozenset(
    {
        # pmq.redis.locks: leases and compare-and-delete
        "lease_hold",
        "lease_renew",
        "lease_release",
        # pmq.domain: inbox, unread, epochs, routing, cluster
        "inbox_publish",
        "inbox_ack",
        "unread_counters",
        "unread_clear",
        "epochs_advance",
        "epochs_begin",
        "epochs_establish",
        "routing_refresh",
        "routing_forget_conns",
        "cluster_sweep",
        # pmq.domain.broadcast
        "broadcast_publish",
        "broadcast_trim",
        "broadcast_raise_mark",
        "broadcast_revoke",
        # pmq.domain.reads and pmq.domain.amend: the notification centre
        "centre_read",
        "centre_load",
        "centre_revoke",
        "centre_edit",
        # pmq.domain.events and pmq.tasks.webhooks: events to the site
        "hooks_online",
        "hooks_left",
        "hooks_offline",
        "hooks_undelivered",
        "hooks_trim",
        # pmq.domain.chat
        "chat_open",
        "chat_drain",
        "chat_close",
        "chat_send",
        "chat_trim_history",
        # pmq.tasks
        "owners_renew",
        "owners_expired",
        "owners_give_back",
        "owners_take_one",
        "owners_adopt",
        "writer_top_up",
        "writer_finish",
        "sweep_evict",
        "deadletter_retry",
    }
)

_INCLUDE = re.compile(r"^--! include (_\w+)$", re.MULTILINE)


class ScriptRegistry(Protocol[T_co]):
    """A redis-py client, sync or asyncio, single or cluster."""

    def register_script(self, script: str) -> T_co: ...


def _read(filename: str) -> str:
    return importlib.resources.files(__name__).joinpath(filename).read_text(encoding="utf-8")


@functools.cache
def source(name: str) -> str:
    """The Lua source of script ``name`` with its includes in place; KeyError for a name not
    in NAMES."""
    if name not in NAMES:
        raise KeyError(f"no Lua script named {name!r}")
    return _INCLUDE.sub(lambda m: _read(f"{m.group(1)}.lua").rstrip("\n"), _read(f"{name}.lua"))


def register(client: ScriptRegistry[T_co], name: str) -> T_co:
    """Script ``name`` registered on ``client``: call it with ``keys=[...]``, ``args=[...]``."""
    return client.register_script(source(name))
