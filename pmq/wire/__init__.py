"""Floor 1, every format PMQ speaks, sans I/O: bytes in, values out, and back. The client
WebSocket protocol (:mod:`pmq.wire.client`: requests, replies, events, the push frame
around a :class:`~pmq.wire.client.Message`, the uid and kind checks); what one socket
worker relays to another through its Redis channel (:mod:`pmq.wire.relay`: an
:class:`~pmq.wire.relay.Op` per operation, a new message's
:class:`~pmq.wire.relay.UnreadState`); the storage queue's items as producers (Python and
Lua callers) write them and the storage writer reads them (:mod:`pmq.wire.storeops`).
Nothing here touches a socket or Redis; it imports only the base modules at pmq/'s root,
and every floor above imports from here.
"""
