"""Floor 6, the task workers' jobs: blocking work kept off the socket workers' loops
(batched storage writes, the broadcast fan-out, sweeps and retention, recovery after a
Redis data loss, dead letters, the owners of queues). It imports only the floors below (up
to pmq.handlers, in practice the domain and below); never pmq.reactor, beside it on this
floor (the two meet in Redis), nor pmq.workers: the worker main (pmq.workers.task)
assembles the jobs.
"""
