"""The socket worker: WebSocket gateway, ingest HTTP, local connection table, relay."""
