"""``iris-fast serve``: start one node (listener, HTTP endpoints, storage) on a uvloop loop."""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import socket
import time

import uvloop

from iris_fast import __version__
from iris_fast.config import ServerConfig
from iris_fast.connection import Connection, monotonic
from iris_fast.server.http import HttpEndpoint, json_route
from iris_fast.server.metrics import NodeMetrics, rss_bytes
from iris_fast.server.worker import Worker
from iris_fast.storage.mailbox import MailboxStore

log = logging.getLogger("iris_fast.serve")

SWEEP_INTERVAL_S = 1.0
DEDUP_PRUNE_INTERVAL_S = 60.0


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def _serve(config: ServerConfig) -> int:
    loop = asyncio.get_running_loop()
    started = time.time()
    metrics = NodeMetrics()
    store = MailboxStore(
        f"{config.data_dir}/mailbox",
        loop,
        map_size=config.lmdb_map_size,
        on_commit=metrics.on_commit,
    )
    worker = Worker(config, store, loop)
    metrics.attach(worker, started)
    max_frame = config.max_frame

    server = await loop.create_server(
        lambda: Connection(worker, max_frame),
        config.host,
        config.port,
        reuse_port=True,
        backlog=4096,
    )

    def health() -> dict:
        return {
            "status": "draining" if worker.draining else "ok",
            "node": config.node_id,
            "version": __version__,
            "connections": len(worker.connections),
            "sessions": len(worker.sessions),
            "uptime_s": round(time.time() - started, 3),
            "rss_bytes": rss_bytes(),
            "cores": [config.node_id],
            "degraded": False,
        }

    routes = {
        "/health": json_route(health),
        "/metrics": lambda: ("text/plain; version=0.0.4; charset=utf-8", metrics.render()),
    }
    http = await loop.create_server(
        lambda: HttpEndpoint(routes), config.http_host, config.http_port, reuse_address=True
    )

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def housekeeping() -> None:
        last_prune = time.monotonic()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            worker.sweep(monotonic())
            if time.monotonic() - last_prune > DEDUP_PRUNE_INTERVAL_S:
                last_prune = time.monotonic()
                worker.prune_dedup()

    sweeper = loop.create_task(housekeeping())
    bound = [
        s.getsockname() for s in server.sockets if s.family in (socket.AF_INET, socket.AF_INET6)
    ]
    log.info(
        "iris-fast %s node %s listening on %s (http %s:%d), data in %s",
        __version__,
        config.node_id,
        bound,
        config.http_host,
        config.http_port,
        config.data_dir,
    )
    print(f"iris-fast ready on {config.host}:{config.port}", flush=True)

    await stop.wait()
    log.info("shutting down: draining %d connections", len(worker.connections))
    sweeper.cancel()
    server.close()
    worker.drain()
    # Let the drained connections flush their last frames and run connection_lost.
    deadline = time.monotonic() + config.shutdown_grace
    while worker.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    done = asyncio.Event()
    store.barrier(done.set)
    await asyncio.wait_for(done.wait(), timeout=30)
    http.close()
    store.close()
    log.info("stopped cleanly")
    return 0


def serve(config: ServerConfig) -> int:
    """Run one node until SIGTERM/SIGINT; returns the process exit code."""
    config.check()
    raise_nofile_limit()
    return uvloop.run(_serve(config))
