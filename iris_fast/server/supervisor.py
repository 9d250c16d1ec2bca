"""``iris-fast serve``: the supervisor of one node.

It starts ``--workers`` worker processes (each a uvloop loop binding the client port with
``SO_REUSEPORT``), restarts any that dies, stops them all on SIGTERM, and serves the node's
aggregated ``/health`` and ``/metrics``. It never touches a client connection or a message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import time

import uvloop

from iris_fast import __version__
from iris_fast.config import ServerConfig
from iris_fast.server.aggregate import merge_health, merge_metrics
from iris_fast.server.http import HttpEndpoint
from iris_fast.server.links import connect_unix, socket_name
from iris_fast.server.worker_process import CONFIG_ENV, raise_nofile_limit

log = logging.getLogger("iris_fast.supervisor")

RESTART_BACKOFF_MAX_S = 5.0
WORKER_QUERY_TIMEOUT_S = 2.0
READY_POLL_S = 0.02
READY_WARN_S = 30.0


class Supervisor:
    """Starts, watches and stops the worker processes of one node."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.restarts: dict[int, int] = {}
        self.stopping = False
        self.started = time.time()

    async def spawn(self, index: int) -> None:
        cfg = dataclasses.replace(self.config, worker_index=index)
        env = dict(os.environ)
        env[CONFIG_ENV] = json.dumps(dataclasses.asdict(cfg))
        env["IRIS_FAST_LOG_LEVEL"] = logging.getLevelName(logging.getLogger().level)
        # -P: do not put the working directory first on sys.path. Run from a source checkout
        # (the README's quick start), it would shadow the installed package, whose compiled
        # extension the source tree does not contain.
        self.procs[index] = await asyncio.create_subprocess_exec(
            sys.executable, "-P", "-m", "iris_fast.server.worker_process", env=env
        )

    async def watch(self, index: int) -> None:
        """Restart worker ``index`` whenever it exits, unless the node is stopping."""
        backoff = 0.05
        while True:
            proc = self.procs[index]
            started = time.monotonic()
            code = await proc.wait()
            if self.stopping:
                return
            self.restarts[index] = self.restarts.get(index, 0) + 1
            log.error("worker %d (pid %d) exited with %s; restarting", index, proc.pid, code)
            # A worker that dies right after start is crash-looping: back off.
            backoff = (
                0.05 if time.monotonic() - started > 10 else min(backoff * 2, RESTART_BACKOFF_MAX_S)
            )
            await asyncio.sleep(backoff)
            if self.stopping:
                return
            await self.spawn(index)

    async def query(self, index: int, path: str) -> str | None:
        """GET ``path`` from a worker's private HTTP socket (None if it does not answer)."""
        name = socket_name(self.config.data_dir, "http", index)
        try:
            async with asyncio.timeout(WORKER_QUERY_TIMEOUT_S):
                reader, writer = await asyncio.open_unix_connection(sock=connect_unix(name))
                writer.write(f"GET {path} HTTP/1.1\r\nHost: worker\r\n\r\n".encode())
                data = await reader.read()
                writer.close()
        except (OSError, TimeoutError):
            return None
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            return None
        return body.decode()

    async def gather(self, path: str) -> dict[int, str | None]:
        indexes = range(self.config.workers)
        answers = await asyncio.gather(*(self.query(i, path) for i in indexes))
        return dict(zip(indexes, answers, strict=True))

    async def health(self) -> dict:
        answers = await self.gather("/health")
        workers = {i: json.loads(a) if a else None for i, a in answers.items()}
        return merge_health(
            self.config.node_id, __version__, workers, self.restarts, self.started, time.time()
        )

    async def metrics(self) -> str:
        answers = await self.gather("/metrics")
        texts = {i: a for i, a in answers.items() if a is not None}
        return merge_metrics(texts, {i: a is not None for i, a in answers.items()})

    async def wait_ready(self) -> None:
        """Return once every worker serves: its client port is bound (the private HTTP socket
        that answers here is opened after it), it is not draining, and its links to all the
        other workers are up, so a client can log in on any worker and message anyone.
        """
        want_links = self.config.workers - 1
        waited_since = time.monotonic()
        warned = False
        while True:
            answers = await self.gather("/health")
            late = []
            for index, text in answers.items():
                try:
                    health = json.loads(text) if text else None
                except ValueError:
                    health = None
                if not isinstance(health, dict) or health.get("status") != "ok":
                    late.append(index)
                elif health.get("links_up", 0) < want_links:
                    late.append(index)
            if not late:
                return
            if not warned and time.monotonic() - waited_since > READY_WARN_S:
                warned = True
                log.warning("workers %s are not serving yet; still waiting", late)
            await asyncio.sleep(READY_POLL_S)

    async def stop(self) -> int:
        """SIGTERM every worker and wait: each drains, stores pending deliveries and flushes."""
        self.stopping = True
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        codes = []
        for index, proc in self.procs.items():
            try:
                codes.append(await asyncio.wait_for(proc.wait(), self.config.shutdown_grace + 40))
            except TimeoutError:
                log.error("worker %d did not stop; killing it", index)
                proc.kill()
                codes.append(await proc.wait())
        return 0 if all(c == 0 for c in codes) else 1


async def _supervise(config: ServerConfig) -> int:
    loop = asyncio.get_running_loop()
    sup = Supervisor(config)

    async def health_body() -> tuple[str, bytes]:
        return "application/json", json.dumps(await sup.health()).encode() + b"\n"

    async def metrics_body() -> tuple[str, bytes]:
        return "text/plain; version=0.0.4; charset=utf-8", (await sup.metrics()).encode()

    http = await loop.create_server(
        lambda: HttpEndpoint({"/health": health_body, "/metrics": metrics_body}),
        config.http_host,
        config.http_port,
        reuse_address=True,
    )
    # Workers start only once the public port is ours: a taken port fails before anything runs.
    for index in range(config.workers):
        await sup.spawn(index)
    watchers = [loop.create_task(sup.watch(i)) for i in range(config.workers)]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # "ready" promises that clients can connect: wait for the workers to serve (or a stop).
    ready = loop.create_task(sup.wait_ready())
    stopped = loop.create_task(stop.wait())
    await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        ready.cancel()
    log.info(
        "iris-fast %s node %s: %d workers on %s:%d, http %s:%d, data in %s",
        __version__,
        config.node_id,
        config.workers,
        config.host,
        config.port,
        config.http_host,
        config.http_port,
        config.data_dir,
    )
    if ready.done() and not ready.cancelled():
        print(f"iris-fast ready on {config.host}:{config.port}", flush=True)
    await stopped
    log.info("stopping %d workers", config.workers)
    code = await sup.stop()
    for w in watchers:
        w.cancel()
    http.close()
    log.info("stopped %s", "cleanly" if code == 0 else "with worker errors")
    return code


def serve(config: ServerConfig) -> int:
    """Run a node until SIGTERM/SIGINT; returns the process exit code."""
    config.check()
    raise_nofile_limit()
    return uvloop.run(_supervise(config))
