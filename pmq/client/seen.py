"""The ids a client has handed on, kept in bounded memory to drop duplicates."""

from __future__ import annotations

import collections


class Seen:
    """The last ``size`` message ids seen, the least recently seen forgotten first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ids: collections.OrderedDict[str, None] = collections.OrderedDict()

    def add(self, message_id: str) -> bool:
        """True when ``message_id`` is new (and now remembered), False for a duplicate."""
        if message_id in self._ids:
            self._ids.move_to_end(message_id)
            return False
        self._ids[message_id] = None
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._ids)
