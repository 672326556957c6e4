"""A plain websockets server, for a floor to compare PMQ's connection figures with.

    python -m bench.plain_server --workers 4

Forks N processes after the imports (as PMQ's master does), each serving ``/ws`` on one
SO_REUSEPORT port on uvloop with PMQ's WebSocket settings (ping every 25 s, no compression,
max_queue 4) and sending one small hello; no auth, no Redis, no bookkeeping. The processes
are titled ``pmq: plain #i [NODE]`` so bench.connections measures them like a node. Prints
a config path for ``bench.connections --config`` and runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Coroutine
from typing import Any

import setproctitle
import uvloop
import websockets
from websockets.asyncio.server import ServerConnection

from bench.run_node import free_port


async def handler(ws: ServerConnection) -> None:
    await ws.send('{"type":"hello"}')
    async for _ in ws:
        pass


async def serve(port: int, interval: float) -> None:
    await serve_websockets(handler, port, interval)


async def serve_websockets(handler: Any, port: int, interval: float) -> None:
    """Serve ``handler`` on 127.0.0.1:``port`` (SO_REUSEPORT) with PMQ's WebSocket settings
    (ping every ``interval``, no compression, max_queue 4) until SIGTERM/SIGINT."""
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.cancel)
    async with websockets.serve(
        handler,
        "127.0.0.1",
        port,
        reuse_port=True,
        ping_interval=interval,
        ping_timeout=interval,
        max_queue=4,
        compression=None,
        server_header=None,
    ):
        try:
            await stop
        except asyncio.CancelledError:
            pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--heartbeat", type=float, default=25.0)
    args = parser.parse_args()
    port = args.port or free_port()
    node = f"plain{os.getpid()}"
    path = os.path.join(tempfile.mkdtemp(prefix="pmq-plain-"), "plain.toml")
    with open(path, "w") as f:
        f.write(f'[server]\nport = {port}\nnode = "{node}"\n[auth]\njwt_secret = "plain"\n')
    return run_forked(
        "plain",
        node,
        args.workers,
        lambda i: serve(port, args.heartbeat),
        {"config": path, "node": node, "ws_port": port},
    )


def run_forked(
    name: str,
    node: str,
    workers: int,
    serve: Callable[[int], Coroutine[Any, Any, None]],
    info: Any,
) -> int:
    """Fork ``workers`` processes running ``serve(i)`` on uvloop, titled ``pmq: NAME #i
    [NODE]`` as the benches find a node's processes; print ``info`` as one JSON line; stop
    them all on SIGINT/SIGTERM (which the caller blocked before anything started)."""
    setproctitle.setproctitle(f"pmq: {name} master [{node}]")
    children = []
    for i in range(workers):
        pid = os.fork()
        if pid == 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
            setproctitle.setproctitle(f"pmq: {name} #{i + 1} [{node}]")
            uvloop.run(serve(i))
            os._exit(0)
        children.append(pid)
    print(json.dumps(info), flush=True)
    signal.sigwait({signal.SIGINT, signal.SIGTERM})
    for pid in children:
        os.kill(pid, signal.SIGTERM)
    for pid in children:
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
