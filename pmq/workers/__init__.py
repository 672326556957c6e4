"""Process management: the master (supervisor), the worker base, pid file, sd_notify.

The master imports only this package and the layers below it; the socket and task worker
code (pmq.reactor, pmq.tasks, pmq.handlers) is imported in the child after fork.
"""
