"""Floor 6, the socket worker's servers: the WebSocket gateway, ingest HTTP, the local
connection table, the relay from Redis to local sockets, replay and presence. It imports
only the floors below (up to pmq.handlers); never pmq.tasks, beside it on this floor (the
two meet in Redis), nor pmq.workers: the worker main (pmq.workers.socket) assembles these
parts and hands them what they need.
"""
