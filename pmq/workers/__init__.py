"""Floor 7, processes: the master (supervisor: ``master`` with ``spawn``, ``boot``,
``rollout``, ``control``, ``channel``), the worker base (``base``), the two worker mains
(``socket``: SocketWorker; ``task``: TaskWorker), the pid file, sd_notify, the heap
freezer, the metrics directory and the start checks (``startcheck``). It may import every
floor below. The master never imports pmq.reactor, pmq.tasks, pmq.handlers nor the two
mains: the forked child imports its main (``spawn.WORKER_MODULES``) after fork.
"""
