"""PMQ: a unified message push service (WebSocket delivery, durable inbox, chat)."""

__version__ = "0.1.0"
