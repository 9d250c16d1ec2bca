"""One worker process: client listener (``SO_REUSEPORT``), links, storage, on a uvloop loop.

Started by the supervisor (``iris_fast.server.supervisor``) as
``python -m iris_fast.server.worker_process`` with its settings as JSON in ``IRIS_FAST_CONFIG``.
Its ``/health`` and ``/metrics`` are served on an abstract Unix socket that only the supervisor
reads; the supervisor aggregates all workers on the public HTTP port.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import json
import logging
import os
import resource
import signal
import sys
import time

import uvloop

from iris_fast.config import ServerConfig
from iris_fast.connection import Connection, monotonic
from iris_fast.replication.replicator import Replicator
from iris_fast.server.http import HttpEndpoint, json_route
from iris_fast.server.links import Handoff, Links, PeerAuth, socket_name
from iris_fast.server.metrics import NodeMetrics, rss_bytes
from iris_fast.server.tls import server_context
from iris_fast.server.worker import Worker
from iris_fast.storage.mailbox import MailboxStore

log = logging.getLogger("iris_fast.worker")

SWEEP_INTERVAL_S = 1.0
DEDUP_PRUNE_INTERVAL_S = 60.0
# Stale LMDB reader slots (a worker killed during a read) pin old pages until cleared.
READER_CHECK_INTERVAL_S = 5.0
CONFIG_ENV = "IRIS_FAST_CONFIG"


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this worker when the supervisor dies (Linux prctl).

    A node is the supervisor and its workers: ``kill -9`` of the supervisor must not leave
    orphans serving the port and holding the LMDB environment.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        os._exit(1)


async def run_worker(config: ServerConfig) -> int:
    loop = asyncio.get_running_loop()
    started = time.time()
    metrics = NodeMetrics()
    store = MailboxStore(
        f"{config.data_dir}/mailbox",
        loop,
        map_size=config.lmdb_map_size,
        on_commit=metrics.on_commit,
        writer_id=config.worker_index,
        node_id=config.node_id,
        replicated=config.peer is not None,
    )
    worker = Worker(config, store, loop)
    metrics.attach(worker, started)
    repl = None
    if config.peer or config.repl_port:
        repl = Replicator(config, worker, store)
        worker.repl = repl
    links = handoff = None
    if config.workers > 1:
        # One check of who may use our hand-off and link sockets, for both (links.PeerAuth).
        peers = PeerAuth(worker.stats)
        links = Links(worker, config.data_dir, config.worker_index, config.workers, peers)
        handoff = Handoff(config.data_dir, config.worker_index, worker.adopt, peers)
        worker.links, worker.handoff = links, handoff
        await links.start()
        handoff.start()

    max_frame = config.max_frame
    tls = server_context(config.tls_cert, config.tls_key) if config.tls_cert else None
    server = await loop.create_server(
        lambda: Connection(worker, max_frame),
        config.host,
        config.port,
        reuse_port=True,
        backlog=4096,
        ssl=tls,
        # A handshake that does not finish counts against the same bound as a missing LOGIN.
        ssl_handshake_timeout=config.login_timeout if tls else None,
    )
    if repl is not None:
        await repl.start()

    def health() -> dict:
        return {
            "status": "draining" if worker.draining else "ok",
            "index": config.worker_index,
            "pid": os.getpid(),
            "connections": len(worker.connections),
            "sessions": worker.session_count(),
            "uptime_s": round(time.time() - started, 3),
            "rss_bytes": rss_bytes(),
            "rss_baseline_bytes": metrics.rss_baseline,
            "links_up": len(links.out) if links else 0,
            "replication": repl.health() if repl is not None else None,
            "storage": store.unavailable or "ok",
        }

    routes = {
        "/health": json_route(health),
        "/metrics": lambda: ("text/plain; version=0.0.4; charset=utf-8", metrics.render()),
    }
    http = await loop.create_unix_server(
        lambda: HttpEndpoint(routes), socket_name(config.data_dir, "http", config.worker_index)
    )
    metrics.rss_baseline = rss_bytes()

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def housekeeping() -> None:
        last_prune = last_reader_check = time.monotonic()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            worker.sweep(monotonic())
            worker.sweep_expired(int(time.time() * 1000))
            worker.sweep_devices(int(time.time() * 1000))
            metrics.tick()
            if time.monotonic() - last_prune > DEDUP_PRUNE_INTERVAL_S:
                last_prune = time.monotonic()
                worker.prune_dedup()
            if time.monotonic() - last_reader_check > READER_CHECK_INTERVAL_S:
                last_reader_check = time.monotonic()
                store.reader_check()

    sweeper = loop.create_task(housekeeping())
    log.info(
        "worker %d/%d (pid %d) serving %s:%d",
        config.worker_index,
        config.workers,
        os.getpid(),
        config.host,
        config.port,
    )

    await stop.wait()
    log.info("worker %d draining %d connections", config.worker_index, len(worker.connections))
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
    if repl is not None:
        # What was stored while draining goes to the peer before we exit, if it is there.
        await repl.close(config.shutdown_grace)
    if links is not None:
        links.close()
    if handoff is not None:
        handoff.close()
    http.close()
    store.close()
    log.info("worker %d stopped cleanly", config.worker_index)
    return 0


def config_to_env(config: ServerConfig) -> str:
    return json.dumps(dataclasses.asdict(config))


def main() -> int:
    """Entry point of a worker process (the supervisor passes the settings in the environment)."""
    config = ServerConfig(**json.loads(os.environ[CONFIG_ENV]))
    die_with_parent()
    logging.basicConfig(
        level=os.environ.get("IRIS_FAST_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s %(levelname)s w{config.worker_index} %(name)s: %(message)s",
        stream=sys.stderr,
    )
    raise_nofile_limit()
    return uvloop.run(run_worker(config))


if __name__ == "__main__":
    sys.exit(main())
