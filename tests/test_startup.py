"""Promises made at start: "ready" means clients can connect, keys that are too weak are
refused, and the HTTP port does not let a silent client hold it."""

from __future__ import annotations

import selectors
import socket
import subprocess
import sys
import time

import iris_native as N
import pytest
from rawclient import RawClient

from iris_fast.config import ServerConfig
from iris_fast.loadgen.plan import PlanError, make_plan
from iris_fast.ports import free_port
from iris_fast.server.http import HTTP_TIMEOUT_S
from iris_fast.server.links import home_of

pytestmark = pytest.mark.timeout(120)


def _user_on(home: int, workers: int, prefix: str) -> str:
    i = 0
    while home_of(f"{prefix}-{i}", workers) != home:
        i += 1
    return f"{prefix}-{i}"


def _read_line_with(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    """Lines of ``proc``'s stdout until one contains ``needle``; fails on timeout or exit."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        if not sel.select(max(0.0, deadline - time.monotonic())):
            continue
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no {needle!r} line from the server; got {seen}")


def test_ready_means_every_worker_takes_clients(tmp_path):
    port, http_port = free_port(), free_port()
    workers = 3
    proc = subprocess.Popen(
        [sys.executable, "-m", "iris_fast", "serve", "--workers", str(workers),
         "--port", str(port), "--http-port", str(http_port), "--data-dir", str(tmp_path / "d")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tmp_path,
        start_new_session=True,
    )  # fmt: skip
    try:
        _read_line_with(proc, "ready on", 60)
        # At once, no retry: a user homed on each worker logs in (hand-offs included) and
        # messages cross every link.
        users = [_user_on(w, workers, "r") for w in range(workers)]
        clients = []
        for user in users:
            c = RawClient(("127.0.0.1", port), timeout=10)
            c.login(user)
            clients.append(c)
        for i, c in enumerate(clients):
            to = users[(i + 1) % workers]
            c.send((N.SEND, f"m{i}", to, b"hello"))
        for i, c in enumerate(clients):
            frames = c.collect(N.DELIVER, 1)
            assert frames and frames[0][3] == users[(i - 1) % workers], frames
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_http_port_closes_a_client_that_sends_nothing(server):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as s:
        s.settimeout(HTTP_TIMEOUT_S + 15)
        got = b""
        while True:
            data = s.recv(4096)  # TimeoutError here: the server held the connection
            if not data:
                break
            got += data
    elapsed = time.monotonic() - started
    assert got.startswith(b"HTTP/1.1 408 "), got
    assert elapsed >= HTTP_TIMEOUT_S - 1, elapsed
    # The port still serves everyone else.
    assert server.health()["status"] == "ok"


def test_http_port_closes_a_slowloris_request(server):
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as s:
        deadline = time.monotonic() + HTTP_TIMEOUT_S + 15
        closed = False
        for ch in b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 200:
            if time.monotonic() > deadline:
                break
            try:
                s.sendall(bytes([ch]))
            except OSError:
                closed = True
                break
            s.settimeout(0.5)
            try:
                data = s.recv(4096)
            except TimeoutError:
                continue
            if not data or data.startswith(b"HTTP/1.1 408 "):
                closed = True
                break
    assert closed, "a request trickled in byte by byte kept the HTTP connection open"


def test_http_port_bounds_its_open_connections(server):
    from iris_fast.server.http import MAX_HTTP_CONNECTIONS

    held = []
    try:
        for _ in range(MAX_HTTP_CONNECTIONS + 8):
            held.append(socket.create_connection(("127.0.0.1", server.http_port), timeout=5))
        # The connections past the bound are answered 503 and closed at once, not held.
        turned_away = 0
        for s in held[MAX_HTTP_CONNECTIONS:]:
            s.settimeout(5)
            try:
                data = s.recv(4096)
            except TimeoutError:
                continue
            if data.startswith(b"HTTP/1.1 503 "):
                turned_away += 1
        assert turned_away == 8
    finally:
        for s in held:
            s.close()
    # Once they are gone the port serves again.
    deadline = time.monotonic() + 10
    while True:
        try:
            assert server.health()["status"] == "ok"
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_short_hs256_secret_is_refused_at_start(tmp_path):
    short = "x" * 31
    r = subprocess.run(
        [sys.executable, "-m", "iris_fast", "serve", "--data-dir", str(tmp_path / "d"),
         "--auth-secret", f"k1={short}"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "--auth-secret #1 is 31 bytes" in r.stderr and "at least 32 bytes" in r.stderr
    # 32 bytes is enough.
    ServerConfig(data_dir=str(tmp_path / "d"), auth_secret=["x" * 32]).check()
    # Nothing of ours signs with a key no server would take.
    t = subprocess.run(
        [sys.executable, "-m", "iris_fast", "token", "--secret", short, "--user", "u"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    assert t.returncode == 2 and "at least 32 bytes" in t.stderr
    with pytest.raises(PlanError, match="--token-secret"):
        make_plan(
            host="127.0.0.1", port=8085, connections=10, procs=None, source_ips=None,
            connect_rate=1000.0, idle=True, rate=1.0, duration=1.0, body_size=64, grace=1.0,
            user_prefix=None, token_secret=short, server_http=None,
        )  # fmt: skip
