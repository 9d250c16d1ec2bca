"""Fixtures that run real iris-fast server processes on free loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iris_fast.ports import free_port
from iris_fast.scrape import fetch_health, fetch_metrics

sys.path.insert(0, str(Path(__file__).parent))


class ServerProcess:
    """One ``iris-fast serve`` child process with its own ports and data directory."""

    def __init__(self, data_dir: Path, node_id: str = "test-node", *extra: str) -> None:
        self.data_dir = data_dir
        self.node_id = node_id
        self.extra = list(extra)
        self.port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen | None = None
        # Extra environment variables of the server process (e.g. test-only clock offsets).
        self.env: dict[str, str] = {}
        self.log_path = data_dir.parent / f"{node_id}-{self.port}.log"

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self, timeout: float = 20.0, accept: tuple[str, ...] = ("ok",)) -> ServerProcess:
        """Start and wait until ``/health`` says a status in ``accept``."""
        cmd = [
            sys.executable,
            "-m",
            "iris_fast",
            "serve",
            "--port",
            str(self.port),
            "--http-port",
            str(self.http_port),
            "--data-dir",
            str(self.data_dir),
            "--node-id",
            self.node_id,
            *self.extra,
        ]
        log = open(self.log_path, "ab")
        # cwd outside the source tree: ``-m iris_fast`` must import the installed package,
        # which holds the compiled extension, not the source checkout.
        self.proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(self.data_dir.parent),
            start_new_session=True,
            env={**os.environ, **self.env} if self.env else None,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.health()["status"] in accept:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not become healthy:\n{self.log()}")

    def full_log(self) -> str:
        """Everything the node logged (``log`` is only the tail, for error messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def health(self) -> dict:
        return fetch_health("127.0.0.1", self.http_port)

    def metrics(self) -> dict[str, float]:
        """``/metrics`` parsed into {sample name with labels: value}."""
        return fetch_metrics("127.0.0.1", self.http_port)

    def kill9(self) -> None:
        """``kill -9`` of the whole node: supervisor and every worker at once."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        # The workers die with the process group; wait until the port is free again.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(self.addr, timeout=0.2):
                    pass
            except OSError:
                return
            time.sleep(0.05)

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def restart(self) -> ServerProcess:
        return self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def server_factory(tmp_path):
    """Start servers with extra command-line options; all are stopped after the test."""
    started: list[ServerProcess] = []

    def make(*extra: str, node_id: str = "test-node", start: bool = True) -> ServerProcess:
        data = tmp_path / f"data-{node_id}-{len(started)}"
        data.mkdir()
        s = ServerProcess(data, node_id, *extra)
        started.append(s)
        return s.start() if start else s

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def server(server_factory) -> ServerProcess:
    """A default single-node server."""
    return server_factory()


os.environ.setdefault("PYTHONUNBUFFERED", "1")
