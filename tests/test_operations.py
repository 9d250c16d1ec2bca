"""What an operator and a script author touch: /health, /metrics, the CLI, the seed scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.timeout(60)


def test_health_reports_the_node(server):
    h = server.health()
    assert h["status"] == "ok"
    assert h["node"] == "test-node"
    assert h["cores"] == ["test-node"]
    assert h["connections"] == 0
    assert h["uptime_s"] >= 0


def test_metrics_expose_the_efficiency_gauges(server):
    m = server.metrics()
    for name in (
        "iris_connections",
        "iris_logins_total",
        "iris_messages_received_total",
        "iris_messages_delivered_total",
        "iris_messages_stored_total",
        "iris_messages_deduplicated_total",
        "iris_lmdb_fsyncs_total",
        "iris_lmdb_batch_size_count",
        "iris_write_batch_avg",
        "iris_rss_bytes",
    ):
        assert name in m, name


def test_unknown_http_path_is_404(server):
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/nope", timeout=2)
    assert exc.value.code == 404


def test_token_command_mints_a_verifiable_token(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "iris_fast", "token", "--secret", "s" * 32, "--user", "u1"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout.strip()
    from iris_fast.server.auth import verify_token

    assert verify_token(out, "u1", "s" * 32)["sub"] == "u1"


def run_script(body: str, port: int) -> str:
    code = textwrap.dedent(body).replace("PORT", str(port))
    # cwd "/" so that the installed package is imported, as a user's script would.
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_design_document_scripts_run_unchanged_but_for_the_import(server):
    # The kill test of the design document we come from, with only the import line changed.
    run_script(
        """
        from iris_fast.client import IrisClient
        c = IrisClient('127.0.0.1', PORT)
        c.login('kill_sender')
        for i in range(100):
            c.send_msg('kill_receiver', f'KILL_{i}')
        c.close()
        """,
        server.port,
    )
    server.kill9()
    server.restart()
    out = run_script(
        """
        from iris_fast.client import IrisClient
        c = IrisClient('127.0.0.1', PORT)
        c.login('kill_receiver')
        count = 0
        while True:
            try:
                msg = c.recv_msg(timeout=3)
                if b'KILL_' in msg: count += 1
            except: break
        print(count)
        c.close()
        """,
        server.port,
    )
    assert out.strip() == "100"


def test_idle_connection_releases_its_read_buffer(server_factory):
    import iris_native as N
    from rawclient import RawClient

    srv = server_factory("--hibernate-after", "0.3")
    c = RawClient(srv.addr)
    c.login("sleepy")
    # A large frame split in two makes the decoder buffer grow to hold it...
    data = N.encode((N.SEND, "big", "someone", b"x" * 60_000))
    c.send_raw(data[:30_000])
    import time

    time.sleep(0.2)
    c.send_raw(data[30_000:])
    assert c.expect(N.ACK)[1] == "big"
    # ...and once idle, the sweep gives the buffer back.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and srv.metrics()["iris_hibernations_total"] < 1:
        time.sleep(0.1)
    assert srv.metrics()["iris_hibernations_total"] >= 1
    c.send((N.PING, 7))
    assert c.expect(N.PONG) == (N.PONG, 7)


def _tcp_timer_of(local_port: int, remote_port: int) -> int:
    """The ``tr`` (timer kind) column of a socket in /proc/net/tcp: 2 = keepalive timer."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            cols = line.split()
            local, remote = cols[1], cols[2]
            if (
                int(local.split(":")[1], 16) == local_port
                and int(remote.split(":")[1], 16) == remote_port
            ):
                return int(cols[5].split(":")[0], 16)
    raise LookupError("socket not found")


@pytest.mark.parametrize("keepalive,timer", [("30", 2), ("0", 0)])
def test_client_sockets_get_tcp_keepalive(server_factory, keepalive, timer):
    from rawclient import RawClient

    srv = server_factory("--keepalive", keepalive)
    c = RawClient(srv.addr)
    c.login("kept-alive")
    client_port = c.sock.getsockname()[1]
    time.sleep(0.1)  # let the last segments be acknowledged (no retransmit timer pending)
    # The server's end of this connection (local = server port, remote = our port).
    assert _tcp_timer_of(srv.port, client_port) == timer


def test_status_shows_up_and_down_nodes(server, tmp_path):
    from iris_fast.ports import free_port

    dead = f"127.0.0.1:{free_port()}"
    endpoints = f"127.0.0.1:{server.http_port},{dead}"
    r = subprocess.run(
        [sys.executable, "-m", "iris_fast", "status", "--http", endpoints, "--json"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 1  # one node is down
    rows = {row["endpoint"]: row for row in json.loads(r.stdout)}
    up = rows[f"127.0.0.1:{server.http_port}"]
    assert up["up"] and up["status"] == "ok" and up["node"] == "test-node"
    assert up["workers_up"] == up["workers"] >= 1
    assert rows[dead]["up"] is False and rows[dead]["error"]
    table = subprocess.run(
        [sys.executable, "-m", "iris_fast", "status", "--http", f"127.0.0.1:{server.http_port}"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    assert table.returncode == 0
    assert "test-node" in table.stdout and "ok" in table.stdout


def test_serve_works_from_a_directory_that_shadows_the_package(tmp_path):
    """``iris-fast serve`` run inside a source checkout (the README's quick start): the workers
    must import the installed package, not the ``iris_fast/`` folder of the working directory."""
    import sysconfig

    from iris_fast.ports import free_port
    from iris_fast.scrape import wait_healthy

    shadow = tmp_path / "iris_fast"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('shadowing source tree imported')\n")
    exe = os.path.join(sysconfig.get_path("scripts"), "iris-fast")
    port, http_port = free_port(), free_port()
    proc = subprocess.Popen(
        [exe, "serve", "--port", str(port), "--http-port", str(http_port), "--workers", "2"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert wait_healthy("127.0.0.1", http_port, timeout=20), "workers never came up"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert proc.returncode == 0, out
    assert "shadowing source tree imported" not in out
