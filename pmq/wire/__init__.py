"""Every format PMQ speaks, sans I/O: bytes in, values out, and back.

- :mod:`pmq.wire.client`: the client WebSocket protocol (requests, replies, events, the
  push frame around a :class:`~pmq.wire.client.Message`) and the uid and kind checks.
- :mod:`pmq.wire.relay`: what one socket worker relays to another through its Redis
  channel (an :class:`~pmq.wire.relay.Op` per operation, a new message's
  :class:`~pmq.wire.relay.UnreadState`).
- :mod:`pmq.wire.storeops`: the storage queue's items, as producers (Python and Lua
  callers) write them and the storage writer reads them.

Nothing here touches a socket or Redis; the layers above import from here, never the
reverse.
"""
