"""``iris-fast load`` (iris_fast.loadgen): unit checks and runs against real server processes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from iris_fast.config import ServerConfig
from iris_fast.loadgen import report
from iris_fast.loadgen.pacing import TokenBucket
from iris_fast.loadgen.plan import PlanError, make_plan
from iris_fast.loadgen.worker import _set_bit, new_histogram

PLAN_DEFAULTS = dict(
    host="127.0.0.1",
    port=8085,
    connections=1000,
    procs=None,
    source_ips=None,
    connect_rate=5000.0,
    idle=False,
    rate=1000.0,
    duration=10.0,
    body_size=64,
    grace=5.0,
    user_prefix=None,
    token_secret=None,
    server_http=None,
)


def run_load(cwd: Path, *args: str, timeout: float = 60) -> tuple[int, dict | None, str]:
    """Run ``python -m iris_fast.loadgen --json``; return (status, JSON or None, output)."""
    out = cwd / "load.json"
    p = subprocess.run(
        [sys.executable, "-m", "iris_fast.loadgen", *args, "--json", str(out)],
        cwd=str(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    data = json.loads(out.read_text()) if out.exists() else None
    return p.returncode, data, p.stderr + p.stdout


# -- units -----------------------------------------------------------------------------------


def test_token_bucket_paces_and_caps_bursts():
    # Binary fractions keep the float arithmetic exact.
    b = TokenBucket(rate=8, burst=4, now=0.0)
    assert b.take(0.0) == 0
    assert b.take(0.25) == 2
    assert b.take(0.3125) == 0  # half a token stays credited
    assert b.take(0.375) == 1
    assert b.take(0.5, limit=0) == 0  # a limit leaves the credit for later
    assert b.take(0.5) == 1
    assert b.take(100.0) == 4  # a long stall does not turn into an 800-message burst
    assert b.take(100.0) == 0


def test_plan_defaults_split_work():
    plan = make_plan(**{**PLAN_DEFAULTS, "connections": 100_000})
    assert plan.procs == 7  # <= 15,000 connections per process
    assert plan.source_ips == 10  # <= 10,000 connections per source address
    assert plan.user_prefix.startswith("load-") and len(plan.user_prefix) == 11
    assert list(plan.local_users(2))[:3] == [2, 9, 16]
    assert plan.source_ip(0) == "127.0.0.1" and plan.source_ip(12) == "127.0.0.3"
    one = make_plan(**{**PLAN_DEFAULTS, "source_ips": 1})
    assert one.source_ip(7) is None  # one address: let the kernel pick, no bind


@pytest.mark.parametrize("connections", [1, 999, 10_000, 10_001, 21_000, 100_000, 1_000_000])
@pytest.mark.parametrize("workers", [1, 2, 6, 16])
def test_default_spread_fits_the_servers_default_per_address_limit(connections, workers):
    """``iris-fast load`` with default flags against ``iris-fast serve`` with default flags.

    The server enforces --max-conns-per-ip per worker (split evenly); SO_REUSEPORT and hand-offs
    spread one address only roughly evenly, so the load generator must stay well below it.
    """
    limit = ServerConfig().max_conns_per_ip
    plan = make_plan(**{**PLAN_DEFAULTS, "connections": connections, "idle": True})
    per_source = max(
        sum(1 for i in range(s, connections, plan.source_ips)) for s in range(plan.source_ips)
    )
    assert per_source <= limit // 2, (plan.source_ips, per_source, limit)
    # Per worker: the share of one address, with the same factor 2 of room for unevenness.
    assert 2 * math.ceil(per_source / workers) <= math.ceil(limit / workers)
    # And within one address's ephemeral ports (32768-60999 here: 28,232).
    assert per_source <= 28_000


@pytest.mark.parametrize(
    "override",
    [{"host": "8.8.8.8"}, {"server_http": "10.0.0.1:9085"}, {"connections": 1}, {"body_size": 4}],
)
def test_plan_rejects_bad_options(override):
    with pytest.raises(PlanError):
        make_plan(**{**PLAN_DEFAULTS, **override})


def _result(proc: int, acked: list[int], delivered: dict[int, list[int]]) -> dict:
    def bitmap(seqs: list[int]) -> bytes:
        b = bytearray()
        for s in seqs:
            _set_bit(b, s)
        return bytes(b)

    h = new_histogram().encode()
    return {
        "proc": proc, "conn_ok": 1, "conn_failed": 0, "connect_failures": {}, "disconnects": 0,
        "sent": len(acked), "acked": len(acked), "ack_stored": 0, "ack_duplicate": 0,
        "ack_unknown": 0, "send_failed": 0, "connect_retries": 0, "delivered": 0,
        "duplicated": 0, "foreign": 0, "errors": {}, "acked_bits": bitmap(acked),
        "delivered_bits": {p: bitmap(s) for p, s in delivered.items()},
        "ack_hist": h, "deliver_hist": h, "connect_seconds": 0.1, "send_seconds": 1.0,
    }  # fmt: skip


def test_merge_finds_lost_and_cross_process_duplicates():
    plan = make_plan(**{**PLAN_DEFAULTS, "connections": 4, "procs": 2})
    results = [
        # proc 0 sent and got ACKs for 0.0..0.4, proc 1 for 1.0..1.1. Message 0.3 reached both
        # processes (a duplicate); 0.4 reached nobody (lost).
        _result(0, [0, 1, 2, 3, 4], {0: [0, 1, 3], 1: [0]}),
        _result(1, [0, 1], {0: [2, 3], 1: [1]}),
    ]
    totals = report.merge(plan, results, {"send_seconds": 1.0})
    assert totals["lost"] == 1 and totals["lost_examples"] == ["0.4"]
    assert totals["duplicated"] == 1
    assert totals["delivered"] == 6  # unique: 0.0-0.3 and 1.0-1.1
    assert totals["ack_latency_ms"] == {"p50": None, "p99": None, "p99_9": None}


# -- against a server ------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_message_run_delivers_everything_once(server, tmp_path):
    rc, data, log = run_load(
        tmp_path,
        "--port", str(server.port), "--connections", "50", "--procs", "2",
        "--rate", "500", "--duration", "2", "--grace", "5",
        "--server-http", f"127.0.0.1:{server.http_port}",
    )  # fmt: skip
    assert rc == 0, log
    assert data is not None
    assert data["connections"]["ok"] == 50 and data["connections"]["failed"] == 0
    assert data["sent"] == 1000  # 500/s for 2 s, paced exactly
    assert data["acked"] == data["delivered"] == data["sent"]
    assert data["lost"] == 0 and data["duplicated"] == 0
    assert data["errors"] == {}
    for key in ("ack_latency_ms", "delivery_latency_ms"):
        lat = data[key]
        assert 0 < lat["p50"] <= lat["p99"] <= lat["p99_9"] < 60_000, (key, lat)
    assert data["achieved_msgs_per_s"] > 0
    assert data["server_cpu_us_per_msg"] > 0


@pytest.mark.timeout(90)
def test_idle_run_logs_everyone_in_and_reports_memory(server, tmp_path):
    rc, data, log = run_load(
        tmp_path,
        "--port", str(server.port), "--connections", "200", "--idle", "--duration", "1",
        "--server-http", f"127.0.0.1:{server.http_port}",
    )  # fmt: skip
    assert rc == 0, log
    assert data is not None
    conns = data["connections"]
    assert (conns["ok"], conns["failed"], conns["disconnected"]) == (200, 0, 0), conns
    assert data["server_connections_after"] == 200
    assert data["sent"] == 0
    assert data["bytes_per_connection"] > 0


@pytest.mark.timeout(240)
def test_default_flags_log_in_more_than_one_address_limit(server, tmp_path):
    """21,000 connections: more than the server's default limit for one address (20,000).

    Before issue 10 the load generator put up to 25,000 on one address by default, and this
    run lost over a thousand logins to ``too_many_connections``.
    """
    n = 21_000
    assert n > ServerConfig().max_conns_per_ip
    rc, data, log = run_load(
        tmp_path, "--port", str(server.port), "--connections", str(n), "--idle",
        "--duration", "1", timeout=200,
    )  # fmt: skip
    assert data is not None, log
    conns = data["connections"]
    assert (conns["ok"], conns["failed"]) == (n, 0), conns["failures"]
    assert rc == 0, log
    assert server.metrics().get("iris_conn_limit_rejected_total", 0) == 0


@pytest.mark.benchmark_long
@pytest.mark.timeout(600)
def test_100k_idle_connections_with_default_flags(server_factory, tmp_path):
    """The issue's run: ``serve --workers 6`` and ``load --connections 100000 --idle``.

    A benchmark (run with ``-m benchmark_long``): it prints the connect time; no time is
    asserted here, the figure is recorded in docs/architecture.md.
    """
    srv = server_factory("--workers", "6")
    n = 100_000
    rc, data, log = run_load(
        tmp_path, "--port", str(srv.port), "--connections", str(n), "--idle", timeout=500
    )
    assert data is not None, log
    conns = data["connections"]
    print(f"100,000 connections: connect wall {data['connect_wall_seconds']:.1f} s")
    assert (conns["ok"], conns["failed"]) == (n, 0), conns["failures"]
    assert rc == 0, log


@pytest.mark.timeout(90)
def test_no_server_fails_clearly(tmp_path):
    from iris_fast.ports import free_port

    port = free_port()
    rc, data, log = run_load(tmp_path, "--port", str(port), "--connections", "10")
    assert rc != 0
    assert f"cannot connect to the iris-fast server at 127.0.0.1:{port}" in log
    assert data is None


def test_floor_relay_carries_the_load_generators_traffic_end_to_end(tmp_path):
    """bench/floor_relay.py (the floor of bench section (b)) must relay exactly what it is
    sent: every SEND delivered once and ACKed after the recipient's DELIVER_ACK."""
    from iris_fast.ports import free_port

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from floor_relay import running

    port = free_port()
    with running(port, timeout=20):
        rc, data, out = run_load(tmp_path, "--port", str(port), "--connections", "20",
                                 "--rate", "400", "--duration", "1")  # fmt: skip
    assert rc == 0, out
    assert data is not None
    assert data["sent"] > 300
    assert data["acked"] == data["sent"] == data["delivered"]
    assert data["lost"] == 0 and data["duplicated"] == 0
