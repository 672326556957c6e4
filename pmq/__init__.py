"""PMQ: a unified message push service (WebSocket delivery, durable inbox, chat). Its
packages are floors, lowest first: the base modules here at the root (config, configload,
errors, log, metrics, cancel), wire, redis, store, domain, handlers, reactor beside tasks,
workers, and ctl on top, here again; a module imports only from its floor and below
(docs/architecture.md, tests/test_layers.py).
"""

__version__ = "0.1.0"
