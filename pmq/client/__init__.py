"""PMQ's Python asyncio client library (docs/client-python.md).

It stands apart from the server: it imports only the client wire format
(``pmq.wire.client``) and the back-off policy (``pmq.backoff``), and nothing of the server
imports it.
"""

from pmq.backoff import Backoff
from pmq.client.client import Client
from pmq.client.errors import ClientError, ConnectionLost, RequestError, RequestTimeout, Stopped

__all__ = [
    "Backoff",
    "Client",
    "ClientError",
    "ConnectionLost",
    "RequestError",
    "RequestTimeout",
    "Stopped",
]
