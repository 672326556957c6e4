"""Floor 4, the domain on Redis: what PMQ decides and keeps. Message ids, tokens and who
may connect (``ids``, ``auth``, ``jwtauth``, ``usercentre``, ``authmode``, ``kicks``); the
durable inbox and its marks (``inbox``, ``epochs``, ``journal``); unread counts,
broadcasts and the customer-service chat (``unread``, ``broadcast``, ``chat``,
``chatreads``, ``chattrim``); the connection registry (``routing``), a push to one user
(``messaging``) and the cluster view (``cluster``). It imports only the floors below (the
base modules, pmq.wire, pmq.redis, pmq.store), never handlers, the reactor, tasks or
workers: it decides and stores, and the reactor delivers to sockets.
"""
