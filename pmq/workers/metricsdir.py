"""Where a node's processes keep their Prometheus samples (prometheus-client multiprocess).

prometheus-client chooses in-memory or file-backed samples when it is first imported, so
``pmqctl start`` calls :func:`use` before importing anything that records metrics; every
process forked afterwards inherits the choice and writes its own files there.
"""

from __future__ import annotations

import os
import shutil
import sys

ENV = "PROMETHEUS_MULTIPROC_DIR"


def use(path: str) -> None:
    """Empty ``path`` (a new master starts its counters at zero) and point this process and
    its children at it. Must run before prometheus_client is imported."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before its directory was set")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, mode=0o700)
    os.environ[ENV] = path
