"""Run the whole iris-fast benchmark suite and write bench/results/latest.{md,json}.

    python bench/run_all.py                 # full suite (several minutes)
    python bench/run_all.py --quick         # smoke version (< 2 minutes)
    python bench/run_all.py --only a,c      # some sections (letters or names)

Sections (each system section starts its own fresh server and stops it afterwards):

  a memory      bytes per logged-in idle connection at 10k / 50k / 100k connections
  b cpu         server CPU µs per delivered message, per-worker CPU balance, loss, latency
  c throughput  highest offered rate with ACK p99 < 10 ms (stepped offered rate)
  d burst       offline burst: durable msgs/s and messages per fsync (bench/offline_burst.py)
  e micro       pytest-benchmark micro benchmarks and bench/routing_cost.py
  f pair        pair replication: durable replicated msgs/s and ACK latency vs one node,
                failover time, catch-up rate (bench/pair.py)
  g tls         TLS vs plain TCP: memory per idle connection, CPU per message (bench/tls.py)

Figures are reported, never asserted: a section fails only when it could not produce its
figures (server did not start, a tool crashed, no JSON); the runner then goes on with the next
section and exits non-zero at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from iris_fast.ports import free_port
from iris_fast.scrape import fetch_health, fetch_metrics

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
NPROC = os.cpu_count() or 1
CONNS_PER_SERVER_WORKER = 15_000
CONNS_PER_LOAD_PROC = 15_000
# bind(addr, 0) takes the odd half of the ephemeral range first (~14k ports of 28k) and slows to
# milliseconds per bind beyond it (measured: ~10 µs → 3-12 ms), so stay below the loadgen's 25k.
CONNS_PER_SOURCE_IP = 12_000
SERVER_START_TIMEOUT_S = 90.0
SERVER_STOP_TIMEOUT_S = 30.0
SCRAPE_INTERVAL_S = 0.5
TIME_WAIT_DRAIN_S = 70.0

TARGET_BYTES_PER_CONN = 2048
TARGET_CPU_US_PER_MSG = 15.0
TARGET_WORKER_BALANCE = 0.75
TARGET_P99_MS = 10.0
STOP_P99_MS = 50.0

SECTIONS = {
    "a": "memory",
    "b": "cpu",
    "c": "throughput",
    "d": "burst",
    "e": "micro",
    "f": "pair",
    "g": "tls",
}
TITLES = {
    "a": "(a) Idle memory per connection",
    "b": "(b) Server CPU per message and worker balance",
    "c": "(c) Throughput at ACK p99 < 10 ms",
    "d": "(d) Offline burst (durable writes)",
    "e": "(e) Micro benchmarks and routing cost",
    "f": "(f) Pair replication",
    "g": "(g) TLS against plain TCP",
}

_T0 = time.monotonic()


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    """One progress line, prefixed with the seconds since the runner started."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", flush=True)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports below the ephemeral range (see iris_fast.ports)."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def iris_cmd() -> list[str]:
    """The installed ``iris-fast`` console script of this interpreter (else ``python -m``)."""
    beside = Path(sys.executable).with_name("iris-fast")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("iris-fast")
    return [found] if found else [sys.executable, "-m", "iris_fast"]


def quote(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def fmt(v: Any, digits: int = 0, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and digits:
        text = f"{v:,.{digits}f}"
    elif isinstance(v, (int, float)):
        text = f"{v:,.0f}"
    else:
        text = str(v)
    return f"{text}{unit}"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("meets" if ok else "**misses**")


class Recorder:
    """Commands a section ran, in order (for the report)."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    def add(self, cmd: list[str], cwd: Path | str | None = None) -> None:
        text = quote(cmd)
        if cwd is not None:
            text = f"(cd {shlex.quote(str(cwd))} && {text})"
        self.commands.append(text)
        log(f"  $ {text}")


# --------------------------------------------------------------------------- server


class Server:
    """A fresh ``iris-fast serve`` on free loopback ports, in its own session and temp dir."""

    def __init__(self, rec: Recorder, raw: Path, name: str, workers: int) -> None:
        self.rec = rec
        self.workers = workers
        self.port, self.http_port = free_ports(2)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"iris-bench-{name}-"))
        self.data = self.tmp / "data"
        self.log_path = raw / f"server-{name}.log"
        self.proc: subprocess.Popen | None = None
        self.stop_info: dict[str, Any] = {}

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def __enter__(self) -> Server:
        cmd = iris_cmd() + [
            "serve", "--port", str(self.port), "--http-port", str(self.http_port),
            "--data-dir", str(self.data), "--workers", str(self.workers),
            "--log-level", "WARNING",
        ]  # fmt: skip
        self.rec.add(cmd, cwd=self.tmp)
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=self.tmp, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode} during start-up:\n"
                    f"{tail(self.log_path)}"
                )
            try:
                h = fetch_health("127.0.0.1", self.http_port)
                if h.get("status") == "ok":
                    log(f"  server up: {self.workers} workers, port {self.port}, http {self.http}")
                    return
                last = f"status {h.get('status')!r}"
            except (OSError, ValueError) as exc:
                last = str(exc)
            time.sleep(0.1)
        raise RuntimeError(
            f"server not healthy after {SERVER_START_TIMEOUT_S:.0f} s ({last}):\n"
            f"{tail(self.log_path)}"
        )

    def stop(self) -> None:
        """SIGTERM, wait up to 30 s, then SIGKILL the whole process group."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        t0 = time.monotonic()
        info: dict[str, Any] = {"forced": False}
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                info["forced"] = True
                log("  ! server did not stop within 30 s of SIGTERM: killing its process group")
                self._killpg(proc.pid)
                proc.wait(timeout=10)
        # Workers that outlived the supervisor would keep the port and memory: reap them too.
        try:
            os.killpg(proc.pid, 0)
            time.sleep(1.0)
            os.killpg(proc.pid, 0)
            info["orphans_killed"] = True
            log("  ! server processes remained after the supervisor exited: killing them")
            self._killpg(proc.pid)
        except ProcessLookupError:
            pass
        info["exit_code"] = proc.returncode
        info["stop_seconds"] = round(time.monotonic() - t0, 2)
        self.stop_info = info
        log(f"  server stopped: exit {proc.returncode} in {info['stop_seconds']} s")
        shutil.rmtree(self.tmp, ignore_errors=True)

    @staticmethod
    def _killpg(pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Sampler:
    """Background /metrics scrapes: a list of (monotonic time, {sample: value})."""

    def __init__(self, http_port: int, interval: float = SCRAPE_INTERVAL_S) -> None:
        self.http_port = http_port
        self.interval = interval
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                m = fetch_metrics("127.0.0.1", self.http_port, timeout=5)
                self.samples.append((time.monotonic(), m))
            except (OSError, ValueError):
                self.errors += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def run_load(
    rec: Recorder, raw: Path, name: str, server: Server, args: list[str], duration: float
) -> dict[str, Any]:
    """``iris-fast load`` against ``server``; its JSON totals (plus ``_rc``)."""
    json_path = raw / f"load-{name}.json"
    log_path = raw / f"load-{name}.log"
    json_path.unlink(missing_ok=True)
    cmd = iris_cmd() + [
        "load", "--port", str(server.port), "--server-http", server.http,
        *args, "--json", str(json_path),
    ]  # fmt: skip
    rec.add(cmd, cwd=server.tmp)
    timeout = 120 + duration + 5 + 30 + 90  # connect cap + duration + grace + spawn + margin
    with open(log_path, "wb") as out:
        try:
            rc = subprocess.run(
                cmd, cwd=server.tmp, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"iris-fast load did not finish in {timeout:.0f} s:\n{tail(log_path)}"
            ) from None
    if not json_path.exists():
        raise RuntimeError(f"iris-fast load exited {rc} without JSON:\n{tail(log_path)}")
    totals = json.loads(json_path.read_text())
    totals["_rc"] = rc
    if rc != 0:
        log(f"  ! iris-fast load exited {rc} (lost/duplicated, no login or a worker failure)")
    return totals


def time_wait_count() -> int | None:
    """TCP sockets in TIME_WAIT (None when ``ss`` is missing)."""
    try:
        out = subprocess.run(
            ["ss", "-Htan", "state", "time-wait"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return sum(1 for line in out.splitlines() if line.strip())


def drain_time_wait(limit: int = 1000) -> None:
    """Wait (bounded) for the previous run's TIME_WAIT sockets: they hold source ports."""
    n = time_wait_count()
    if n is None or n <= limit:
        return
    log(f"  waiting for {n:,} TIME_WAIT sockets to expire (they hold source ports)")
    deadline = time.monotonic() + TIME_WAIT_DRAIN_S
    while time.monotonic() < deadline:
        time.sleep(5)
        n = time_wait_count() or 0
        if n <= limit:
            break
    log(f"  TIME_WAIT sockets now {n:,}")


def latency(totals: dict, key: str) -> dict[str, float | None]:
    lat = totals.get(key) or {}
    return {k: lat.get(k) for k in ("p50", "p99", "p99_9")}


def load_summary(totals: dict) -> dict[str, Any]:
    """The figures of a message run worth keeping in the report."""
    return {
        "offered_rate": totals.get("offered_rate"),
        "connections_ok": totals.get("connections", {}).get("ok"),
        "sent": totals.get("sent"),
        "acked": totals.get("acked"),
        "unacked": totals.get("unacked"),
        "send_failed": totals.get("send_failed"),
        "delivered": totals.get("delivered"),
        "lost": totals.get("lost"),
        "duplicated": totals.get("duplicated"),
        "errors": totals.get("errors"),
        "achieved_send_rate": totals.get("achieved_send_rate"),
        "delivered_msgs_per_s": totals.get("achieved_msgs_per_s"),
        "ack_latency_ms": latency(totals, "ack_latency_ms"),
        "delivery_latency_ms": latency(totals, "delivery_latency_ms"),
        "server_cpu_us_per_msg": totals.get("server_cpu_us_per_msg"),
        "loadgen_exit": totals.get("_rc"),
        "worker_failures": totals.get("worker_failures"),
    }


# --------------------------------------------------------------------------- sections


def section_memory(ctx: Context) -> dict[str, Any]:
    sizes = [10_000] if ctx.quick else [10_000, 50_000, 100_000]
    runs: list[dict[str, Any]] = []
    failures: list[str] = []
    for n in sizes:
        workers = max(NPROC, math.ceil(n / CONNS_PER_SERVER_WORKER))
        row: dict[str, Any] = {"connections": n, "server_workers": workers}
        runs.append(row)
        log(f"(a) {n:,} idle connections, {workers} server workers")
        try:
            if n > 25_000:
                drain_time_wait()
            extra: list[str] = []
            if n > 25_000:  # explicit split: <= 15k sockets per process, <= 20k per source IP
                procs = math.ceil(n / CONNS_PER_LOAD_PROC)
                ips = math.ceil(n / CONNS_PER_SOURCE_IP)
                extra = ["--procs", str(procs), "--source-ips", str(ips)]
            with Server(ctx.rec, ctx.raw, f"memory-{n}", workers) as srv:
                with Sampler(srv.http_port) as sampler:
                    totals = run_load(
                        ctx.rec, ctx.raw, f"memory-{n}", srv,
                        ["--idle", "--connections", str(n), "--duration", "5", *extra],
                        duration=5,
                    )  # fmt: skip
            conns = totals.get("connections", {})
            row.update(
                {
                    "load_procs": totals.get("procs"),
                    "load_source_ips": totals.get("source_ips"),
                    "connections_ok": conns.get("ok"),
                    "connections_failed": conns.get("failed"),
                    "connect_failures": conns.get("failures"),
                    "disconnected": conns.get("disconnected"),
                    "connect_wall_seconds": totals.get("connect_wall_seconds"),
                    "server_rss_before": totals.get("server_rss_before"),
                    "server_rss_after": totals.get("server_rss_after"),
                    "bytes_per_connection_loadgen": totals.get("bytes_per_connection"),
                    "loadgen_exit": totals.get("_rc"),
                    "server_stop": srv.stop_info,
                }
            )
            row.update(gauge_at_peak(sampler.samples))
            if (conns.get("ok") or 0) < n:
                raise RuntimeError(
                    f"only {conns.get('ok') or 0:,} of {n:,} connections logged in "
                    f"(connect wall {totals.get('connect_wall_seconds')} s; failures "
                    f"{conns.get('failures')}, disconnected {conns.get('disconnected')})"
                )
            log(
                f"  {conns.get('ok'):,} connected; loadgen RSS delta/conn "
                f"{fmt(row['bytes_per_connection_loadgen'])} B; server gauge "
                f"{fmt(row.get('gauge_bytes_per_connection'))} B at "
                f"{fmt(row.get('gauge_connections'))} connections"
            )
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            failures.append(f"{n:,} connections: {row['error']}")
            log(f"  ! {n:,} connections failed: {row['error'].splitlines()[0]}")
    worked = [r["connections"] for r in runs if "error" not in r]
    out = {"runs": runs, "largest_that_worked": max(worked, default=None)}
    if failures:
        out["error"] = "; ".join(failures)
    return out


def gauge_at_peak(samples: list[tuple[float, dict[str, float]]]) -> dict[str, Any]:
    """``iris_memory_per_connection_bytes`` scraped while the most connections were open."""
    rows = [
        (m.get("iris_connections", 0.0), m.get("iris_memory_per_connection_bytes"), m)
        for _, m in samples
    ]
    rows = [r for r in rows if r[1] is not None]
    if not rows:
        return {"gauge_bytes_per_connection": None, "gauge_samples": len(samples)}
    peak = max(r[0] for r in rows)
    at_peak = [r for r in rows if r[0] >= peak]
    conns, gauge, m = at_peak[-1]
    return {
        "gauge_bytes_per_connection": round(gauge, 1),
        "gauge_connections": int(conns),
        "gauge_rss_bytes": m.get("iris_rss_bytes"),
        "gauge_samples": len(samples),
        "gauge_samples_at_peak": len(at_peak),
    }


def worker_cpu(m: dict[str, float]) -> dict[str, float]:
    out = {}
    for key, value in m.items():
        if key.startswith('iris_worker_cpu_seconds_total{worker="'):
            out[key.split('"')[1]] = value
    return out


def send_window(samples: list[tuple[float, dict[str, float]]]) -> dict[str, Any]:
    """Per-worker CPU utilisation between the first and the last scrape that saw new messages."""
    key = "iris_messages_received_total"
    series = [(t, m) for t, m in samples if key in m]
    if len(series) < 3:
        return {"error": f"only {len(series)} usable /metrics scrapes"}
    base = series[0][1][key]
    start = next((i for i, (_, m) in enumerate(series) if m[key] > base), None)
    end = None
    for i in range(1, len(series)):
        if series[i][1][key] > series[i - 1][1][key]:
            end = i
    if start is None or end is None or end <= start:
        return {"error": "no send phase seen in the /metrics scrapes"}
    (t0, m0), (t1, m1) = series[start], series[end]
    wall = t1 - t0
    c0, c1 = worker_cpu(m0), worker_cpu(m1)
    util = {w: round((c1[w] - c0.get(w, 0.0)) / wall, 3) for w in sorted(c1, key=int)}
    values = list(util.values())
    ratio = round(min(values) / max(values), 3) if values and max(values) > 0 else None
    delivered = m1.get("iris_messages_delivered_total", 0.0) - m0.get(
        "iris_messages_delivered_total", 0.0
    )
    return {
        "window_seconds": round(wall, 2),
        "worker_utilisation": util,
        "utilisation_ratio_min_max": ratio,
        "server_delivered_per_s_in_window": round(delivered / wall, 1),
        "node_cpu_utilisation": round(sum(values), 3),
    }


def section_cpu(ctx: Context) -> dict[str, Any]:
    duration = 5 if ctx.quick else 20
    log(f"(b) 1,000 clients, 20,000 msg/s offered for {duration} s, {NPROC} server workers")
    with Server(ctx.rec, ctx.raw, "cpu", NPROC) as srv:
        with Sampler(srv.http_port) as sampler:
            totals = run_load(
                ctx.rec, ctx.raw, "cpu", srv,
                ["--connections", "1000", "--rate", "20000", "--duration", str(duration)],
                duration=duration,
            )  # fmt: skip
    stop_info = srv.stop_info
    out = load_summary(totals)
    out["duration_s"] = duration
    out["server_workers"] = NPROC
    out["balance"] = send_window(sampler.samples)
    out["server_stop"] = stop_info
    bal = out["balance"]
    log(
        f"  {fmt(out['server_cpu_us_per_msg'], 1)} µs/msg, delivered "
        f"{fmt(out['delivered_msgs_per_s'])} msg/s, lost {out['lost']}, dup {out['duplicated']}, "
        f"worker utilisation {bal.get('worker_utilisation')} (min/max "
        f"{bal.get('utilisation_ratio_min_max')})"
    )
    out["floor"] = floor_comparison(ctx, duration)
    if "error" in out["floor"]:
        out["error"] = out["floor"]["error"]
    return out


def floor_comparison(ctx: Context, duration: int) -> dict[str, Any]:
    """The same load on a fresh server and on the minimal relay (bench/floor.py)."""
    log("(b) the same load against the floor relay (bench/floor.py)")
    path = ctx.raw / "floor.json"
    # Two alternating rounds of half the duration: both servers see the machine's drift.
    rounds, each = (1, duration) if ctx.quick else (2, duration // 2)
    cmd = [sys.executable, "bench/floor.py", "--workers", str(NPROC), "--connections", "1000",
           "--rate", "20000", "--duration", str(each), "--rounds", str(rounds),
           "--json", str(path)]  # fmt: skip
    try:
        rc, data = run_script(ctx, "floor", cmd, path, timeout=600)
    except Exception as exc:
        log(f"  ! floor comparison failed: {str(exc).splitlines()[0]}")
        return {"error": f"floor comparison: {exc}"}
    if rc != 0:
        data["error"] = f"floor.py exited {rc}"
    for row in data.get("runs", []):
        log(
            f"  {row['server']}: {fmt(row['cpu_us_per_msg'], 1)} µs/msg (user "
            f"{fmt(row['user_us_per_msg'], 1)}, system {fmt(row['system_us_per_msg'], 1)})"
        )
    return data


def section_throughput(ctx: Context) -> dict[str, Any]:
    rates = [2_000, 5_000] if ctx.quick else [2_000, 5_000, 10_000, 15_000, 20_000, 30_000]
    duration = 3 if ctx.quick else 8
    steps: list[dict[str, Any]] = []
    log(f"(c) stepping {rates} msg/s, 1,000 clients, {duration} s each, one server")
    with Server(ctx.rec, ctx.raw, "throughput", NPROC) as srv:
        for rate in rates:
            log(f"  step {rate:,} msg/s")
            totals = run_load(
                ctx.rec, ctx.raw, f"throughput-{rate}", srv,
                ["--connections", "1000", "--rate", str(rate), "--duration", str(duration)],
                duration=duration,
            )  # fmt: skip
            step = load_summary(totals)
            steps.append(step)
            p99 = step["ack_latency_ms"]["p99"]
            log(
                f"  delivered {fmt(step['delivered_msgs_per_s'])} msg/s, ACK p50/p99 "
                f"{fmt(step['ack_latency_ms']['p50'], 2)} / {fmt(p99, 2)} ms, "
                f"lost {step['lost']}, dup {step['duplicated']}"
            )
            if p99 is None or p99 > STOP_P99_MS:
                log(f"  ACK p99 above {STOP_P99_MS:.0f} ms: stop stepping")
                break
    stop_info = srv.stop_info
    good = [
        s["offered_rate"]
        for s in steps
        if s["ack_latency_ms"]["p99"] is not None and s["ack_latency_ms"]["p99"] < TARGET_P99_MS
    ]
    best = max(good, default=None)
    log(f"  best offered rate with ACK p99 < {TARGET_P99_MS:.0f} ms: {fmt(best)} msg/s")
    return {
        "duration_s": duration,
        "server_workers": NPROC,
        "steps": steps,
        "best_rate_p99_under_10ms": best,
        "server_stop": stop_info,
    }


def run_script(
    ctx: Context, name: str, cmd: list[str], json_path: Path, timeout: float
) -> tuple[int, dict]:
    """A bench script or pytest from the repo root; (exit code, its JSON)."""
    json_path.unlink(missing_ok=True)
    log_path = ctx.raw / f"{name}.log"
    ctx.rec.add(cmd)
    with open(log_path, "wb") as out:
        try:
            rc = subprocess.run(
                cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"{name} did not finish in {timeout:.0f} s:\n{tail(log_path)}"
            ) from None
    if not json_path.exists():
        raise RuntimeError(f"{name} exited {rc} without JSON:\n{tail(log_path)}")
    if rc != 0:
        log(f"  ! {name} exited {rc} (see {log_path.relative_to(REPO)})")
    return rc, json.loads(json_path.read_text())


def section_burst(ctx: Context) -> dict[str, Any]:
    log("(d) offline burst, 10,000 messages")
    path = ctx.raw / "offline_burst.json"
    cmd = [sys.executable, "bench/offline_burst.py", "--messages", "10000", "--json", str(path)]
    rc, data = run_script(ctx, "offline_burst", cmd, path, timeout=180)
    data["exit_code"] = rc
    log(
        f"  {fmt(data.get('durable_msgs_per_s'))} durable msg/s, "
        f"{fmt(data.get('messages_per_fsync'), 1)} messages per fsync"
    )
    if rc != 0:
        data["error"] = f"offline_burst.py exited {rc} (stored {data.get('stored')})"
    return data


def section_pair(ctx: Context) -> dict[str, Any]:
    log("(f) pair replication: throughput vs one node, failover, catch-up")
    path = ctx.raw / "pair.json"
    cmd = [sys.executable, "bench/pair.py", "--json", str(path)]
    if ctx.quick:
        cmd += ["--messages", "5000", "--gap", "20000", "--failovers", "3", "--rate", "1000"]
    rc, data = run_script(ctx, "pair", cmd, path, timeout=900)
    data["exit_code"] = rc
    tp = data.get("throughput", {})
    single, pair = tp.get("single", {}).get("burst", {}), tp.get("pair", {}).get("burst", {})
    if single.get("msgs_per_s") and pair.get("msgs_per_s"):
        data["pair_to_single_ratio"] = round(pair["msgs_per_s"] / single["msgs_per_s"], 2)
    log(
        f"  replicated {fmt(pair.get('msgs_per_s'))} msg/s vs single "
        f"{fmt(single.get('msgs_per_s'))}"
        f"; failover median {fmt(data.get('failover', {}).get('median_ms'), 1)} ms; catch-up "
        f"{fmt(data.get('catchup', {}).get('records_per_s'))} records/s"
    )
    if rc != 0:
        data["error"] = f"pair.py exited {rc}"
    return data


def section_tls(ctx: Context) -> dict[str, Any]:
    log("(g) TLS vs plain: idle memory, CPU per message")
    path = ctx.raw / "tls.json"
    cmd = [sys.executable, "bench/tls.py", "--json", str(path)]
    if ctx.quick:
        cmd += ["--idle-connections", "1000", "--connections", "100", "--rate", "1000",
                "--duration", "3"]  # fmt: skip
    rc, data = run_script(ctx, "tls", cmd, path, timeout=900)
    data["exit_code"] = rc
    log(f"  idle B/conn plain {fmt(data.get('plain', {}).get('bytes_per_idle_connection'))} vs "
        f"TLS {fmt(data.get('tls', {}).get('bytes_per_idle_connection'))}; CPU ratio "
        f"{fmt(data.get('cpu_ratio'), 2)}")  # fmt: skip
    if rc != 0:
        data["error"] = f"tls.py exited {rc}"
    return data


def per_op_ns(bench: dict) -> tuple[float | None, str]:
    """ns per elementary operation (frame, check) from extra_info, else per call."""
    extra = bench.get("extra_info", {})
    for key in ("ns_per_frame", "ns_per_check"):
        if key in extra:
            return extra[key], key.removeprefix("ns_per_")
    mean_ns = bench["stats"]["mean"] * 1e9
    if "frames_per_call" in extra:
        return round(mean_ns / extra["frames_per_call"], 1), "frame"
    return round(mean_ns, 1), "call"


def section_micro(ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {}
    errors: list[str] = []
    log("(e) pytest-benchmark micro benchmarks")
    path = ctx.raw / "micro.json"
    pytest = shutil.which("pytest") or str(Path(sys.executable).with_name("pytest"))
    cmd = [
        pytest, "bench/test_bench_native.py", "bench/test_bench_connection.py",
        "bench/test_bench_auth.py",
        "--benchmark-only", "--benchmark-json", str(path), "-q", "-p", "no:cacheprovider",
    ]  # fmt: skip
    try:
        rc, data = run_script(ctx, "micro", cmd, path, timeout=600)
        rows = []
        for b in data.get("benchmarks", []):
            ns, unit = per_op_ns(b)
            rows.append(
                {
                    "name": b["name"],
                    "mean_ns_per_call": round(b["stats"]["mean"] * 1e9, 1),
                    "ns_per_op": ns,
                    "op": unit,
                    "rounds": b["stats"].get("rounds"),
                    "extra_info": b.get("extra_info", {}),
                }
            )
            log(f"  {b['name']}: {fmt(ns, 1)} ns/{unit}")
        out["benchmarks"] = rows
        out["pytest_exit"] = rc
        if rc != 0:
            errors.append(f"pytest exited {rc}")
    except Exception as exc:
        errors.append(f"micro benchmarks: {exc}")
        log(f"  ! micro benchmarks failed: {str(exc).splitlines()[0]}")
    log("(e) routing cost, same worker vs cross worker")
    path = ctx.raw / "routing_cost.json"
    messages = "5000" if ctx.quick else "20000"
    cmd = [sys.executable, "bench/routing_cost.py", "--messages", messages, "--json", str(path)]
    try:
        rc, data = run_script(ctx, "routing_cost", cmd, path, timeout=300)
        out["routing_cost"] = data
        for c in data.get("cases", []):
            log(f"  {c['case']}: {fmt(c['server_cpu_us_per_msg'], 2)} µs/msg")
        if rc != 0:
            errors.append(f"routing_cost.py exited {rc}")
    except Exception as exc:
        errors.append(f"routing cost: {exc}")
        log(f"  ! routing cost failed: {str(exc).splitlines()[0]}")
    if errors:
        out["error"] = "; ".join(errors)
    return out


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "a": section_memory,
    "b": section_cpu,
    "c": section_throughput,
    "d": section_burst,
    "e": section_micro,
    "f": section_pair,
    "g": section_tls,
}


class Context:
    def __init__(self, quick: bool, raw: Path) -> None:
        self.quick = quick
        self.raw = raw
        self.rec = Recorder()


# --------------------------------------------------------------------------- machine facts


def sh(cmd: list[str], strip: bool = True) -> str:
    try:
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.strip() if strip else out


def machine_facts() -> dict[str, Any]:
    mem_kib = 0
    cpu_model = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        port_range = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    except OSError:
        port_range = []
    porcelain = sh(["git", "status", "--porcelain"], strip=False)
    dirty = [line[3:] for line in porcelain.splitlines() if line]
    try:
        from importlib.metadata import version

        iris_version = version("iris-fast")
    except Exception:
        iris_version = None
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": NPROC,
        "cpu_model": cpu_model,
        "ram_gib": round(mem_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "kernel": platform.release(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "ephemeral_ports": "-".join(port_range),
        "git_commit": sh(["git", "rev-parse", "HEAD"]),
        "git_subject": sh(["git", "log", "-1", "--format=%s"]),
        "git_dirty_files": dirty,
        "iris_fast_version": iris_version,
        "iris_fast_command": quote(iris_cmd()),
    }


# --------------------------------------------------------------------------- report


def md_memory(r: dict) -> list[str]:
    lines = [
        f"Target: ≤ {TARGET_BYTES_PER_CONN:,} bytes per idle connection. *Loadgen* = server RSS "
        "delta / logged-in connections, computed by `iris-fast load` from /health before and "
        "after the connect phase; *gauge* = the server's own `iris_memory_per_connection_bytes` "
        "(RSS growth since start / open connections) scraped while the connections were held.",
        "",
        "| connections | server workers | load procs / source IPs | logged in | connect wall "
        "| RSS before → after | loadgen B/conn | gauge B/conn (at conns) | target |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in r.get("runs", []):
        if "error" in row and row.get("connections_ok") is None:
            lines.append(
                f"| {row['connections']:,} | {row['server_workers']} | - | failed | - | - | - "
                "| - | - |"
            )
            continue
        b = row.get("bytes_per_connection_loadgen")
        g = row.get("gauge_bytes_per_connection")
        ok = None if b is None else b <= TARGET_BYTES_PER_CONN
        rss = (
            f"{fmt((row.get('server_rss_before') or 0) / 2**20, 1)} → "
            f"{fmt((row.get('server_rss_after') or 0) / 2**20, 1)} MiB"
        )
        lines.append(
            f"| {row['connections']:,} | {row['server_workers']} | {row.get('load_procs')} / "
            f"{row.get('load_source_ips')} | {fmt(row.get('connections_ok'))} | "
            f"{fmt(row.get('connect_wall_seconds'), 1)} s | {rss} | {fmt(b)} | "
            f"{fmt(g)} ({fmt(row.get('gauge_connections'))}) | {verdict(ok)} |"
        )
    for row in r.get("runs", []):
        if "error" in row:
            lines += ["", f"{row['connections']:,} connections failed:", "", "```",
                      row["error"], "```"]  # fmt: skip
        if row.get("connect_failures"):
            lines += ["", f"{row['connections']:,}: connect failures {row['connect_failures']}"]
    lines += ["", f"Largest run that worked: {fmt(r.get('largest_that_worked'))} connections."]
    return lines


def md_latency(lat: dict) -> str:
    return " / ".join(fmt(lat.get(k), 2) for k in ("p50", "p99", "p99_9")) + " ms"


def md_cpu(r: dict) -> list[str]:
    bal = r.get("balance", {})
    cpu = r.get("server_cpu_us_per_msg")
    ratio = bal.get("utilisation_ratio_min_max")
    zero = r.get("lost") == 0 and r.get("duplicated") == 0
    util = bal.get("worker_utilisation") or {}
    lines = [
        f"1,000 clients, 20,000 msg/s offered for {r.get('duration_s')} s, "
        f"{r.get('server_workers')} server workers.",
        "",
        "| figure | value | target |",
        "|---|---:|---|",
        f"| server CPU per delivered message (loadgen `server_cpu_us_per_msg`) | "
        f"{fmt(cpu, 2)} µs | ≤ {TARGET_CPU_US_PER_MSG:g} µs: "
        f"{verdict(None if cpu is None else cpu <= TARGET_CPU_US_PER_MSG)} |",
    ]
    for w, u in util.items():
        lines.append(f"| worker {w} CPU utilisation during the send phase | {u * 100:.1f} % | |")
    lines += [
        f"| worker utilisation min/max | {fmt(ratio, 3)} | "
        f"≥ {TARGET_WORKER_BALANCE} (within 25 %): "
        f"{verdict(None if ratio is None else ratio >= TARGET_WORKER_BALANCE)} |",
        f"| sent / acked / delivered | {fmt(r.get('sent'))} / {fmt(r.get('acked'))} / "
        f"{fmt(r.get('delivered'))} | |",
        f"| delivered msgs/s (loadgen) | {fmt(r.get('delivered_msgs_per_s'))} | |",
        f"| lost / duplicated | {fmt(r.get('lost'))} / {fmt(r.get('duplicated'))} | zero: "
        f"{verdict(zero)} |",
        f"| unacked / send failed | {fmt(r.get('unacked'))} / {fmt(r.get('send_failed'))} | |",
        f"| ACK latency p50 / p99 / p99.9 | {md_latency(r.get('ack_latency_ms', {}))} | |",
        f"| delivery latency p50 / p99 / p99.9 | {md_latency(r.get('delivery_latency_ms', {}))} "
        "| |",
        f"| errors seen by the load generator | {r.get('errors') or 0} | |",
    ]
    lines += md_floor(r.get("floor") or {})
    if "error" in bal:
        lines += ["", f"Worker balance not computed: {bal['error']}"]
    else:
        lines += [
            "",
            f'Worker utilisation = Δ`iris_worker_cpu_seconds_total{{worker="i"}}` / wall time '
            f"between the first and last /metrics scrape (every {SCRAPE_INTERVAL_S} s) that saw "
            f"`iris_messages_received_total` grow: a {bal.get('window_seconds')} s window inside "
            f"the send phase; node total {fmt(bal.get('node_cpu_utilisation', 0) * 100, 1)} % of "
            "one core; server-counted deliveries "
            f"{fmt(bal.get('server_delivered_per_s_in_window'))} msg/s in that window.",
        ]
    return lines


def md_floor(f: dict) -> list[str]:
    """Section (b)'s second table: iris-fast against the floor relay under the same load."""
    runs = f.get("runs") or []
    if len(runs) != 2:
        return ["", f"Floor comparison not available: {f.get('error', 'no runs')}"]
    lines = [
        "",
        f"**Against the floor** (`bench/floor.py`): the same load ({fmt(f.get('connections'))} "
        f"clients, {fmt(f.get('rate'))} msg/s, {f.get('duration_s')} s, "
        f"{f.get('rounds', 1)} alternating round(s), pooled) on a fresh server and on "
        "`bench/floor_relay.py`, one uvloop process that only relays SEND → DELIVER and "
        "DELIVER_ACK → ACK (no storage, dedup, limits or second worker). CPU from `/proc` "
        "(user and system time of the server's whole process group) over the load run.",
        "",
        "| server | processes | CPU µs/msg | user | system | lost / dup | ACK p50 / p99 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in runs:
        lines.append(
            f"| {row['server']} | {row['processes']} | {fmt(row['cpu_us_per_msg'], 1)} | "
            f"{fmt(row['user_us_per_msg'], 1)} | {fmt(row['system_us_per_msg'], 1)} | "
            f"{fmt(row['lost'])} / {fmt(row['duplicated'])} | {fmt(row['ack_p50_ms'], 2)} / "
            f"{fmt(row['ack_p99_ms'], 2)} ms |"
        )
    sys_floor = f.get("floor_system_us_per_msg")
    lines += [
        "",
        f"iris-fast / floor: **{fmt(f.get('ratio_ours_to_floor'), 2)}×** (per round "
        f"{', '.join(fmt(x, 2) for x in f.get('ratio_per_round') or [])}) "
        f"(+{fmt(f.get('ours_above_floor_us'), 1)} µs/msg for storage, dedup, limits, routing "
        f"between workers). The floor's system time alone, {fmt(sys_floor, 1)} µs/msg, is what "
        "the kernel charged in this run for this traffic's two socket reads and two socket "
        "writes per message on loopback"
        + (f": above the {TARGET_CPU_US_PER_MSG:g} µs target by itself."
           if sys_floor is not None and sys_floor > TARGET_CPU_US_PER_MSG else "."),
    ]  # fmt: skip
    return lines


def md_throughput(r: dict) -> list[str]:
    lines = [
        f"1,000 clients, {r.get('duration_s')} s per step, one server with "
        f"{r.get('server_workers')} workers; stepping stops once ACK p99 > {STOP_P99_MS:g} ms.",
        "",
        "| offered msg/s | delivered msg/s | ACK p50 | ACK p99 | ACK p99.9 | delivery p99 "
        "| lost / dup | server µs/msg | p99 < 10 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in r.get("steps", []):
        a, d = s["ack_latency_ms"], s["delivery_latency_ms"]
        p99 = a.get("p99")
        lines.append(
            f"| {fmt(s['offered_rate'])} | {fmt(s['delivered_msgs_per_s'])} | "
            f"{fmt(a.get('p50'), 2)} ms | {fmt(p99, 2)} ms | {fmt(a.get('p99_9'), 2)} ms | "
            f"{fmt(d.get('p99'), 2)} ms | {fmt(s['lost'])} / {fmt(s['duplicated'])} | "
            f"{fmt(s.get('server_cpu_us_per_msg'), 1)} | "
            f"{verdict(None if p99 is None else p99 < TARGET_P99_MS)} |"
        )
    best = r.get("best_rate_p99_under_10ms")
    lines += ["", f"**Highest offered rate with ACK p99 < 10 ms: {fmt(best)} msg/s.**"]
    return lines


def md_burst(r: dict) -> list[str]:
    return [
        "| figure | value |",
        "|---|---:|",
        f"| messages sent / stored | {fmt(r.get('messages'))} / {fmt(r.get('stored'))} |",
        f"| seconds | {fmt(r.get('seconds'), 3)} |",
        f"| durable msgs/s | {fmt(r.get('durable_msgs_per_s'))} |",
        f"| fsyncs | {fmt(r.get('fsyncs'))} |",
        f"| messages per fsync | {fmt(r.get('messages_per_fsync'), 1)} |",
    ]


def md_pair(r: dict) -> list[str]:
    tp = r.get("throughput", {})
    lines = [
        "| mode | burst msgs/s | burst ACK p50 / p99 ms | paced rate | paced ACK p50 / p99 ms "
        "| ops per fsync (each node) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for mode, label in (("single", "one node (no replication)"),
                        ("pair", "pair, both nodes fsync")):  # fmt: skip
        b, p = tp.get(mode, {}).get("burst", {}), tp.get(mode, {}).get("paced", {})
        per = ", ".join(fmt(f.get("ops_per_fsync"), 1) for f in b.get("fsync", []))
        lines.append(
            f"| {label} | {fmt(b.get('msgs_per_s'))} | {fmt(b.get('ack_p50_ms'), 2)} / "
            f"{fmt(b.get('ack_p99_ms'), 2)} | {fmt(p.get('msgs_per_s'))} | "
            f"{fmt(p.get('ack_p50_ms'), 2)} / {fmt(p.get('ack_p99_ms'), 2)} | {per} |"
        )
    fo, cu = r.get("failover", {}), r.get("catchup", {})
    lines += [
        "",
        f"Replicated / single throughput: **{fmt(r.get('pair_to_single_ratio'), 2)}**.",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| failover: kill -9 to first ACK through the survivor, median / max over "
        f"{fmt(fo.get('runs'))} runs | {fmt(fo.get('median_ms'), 1)} / {fmt(fo.get('max_ms'), 1)}"
        " ms |",
        f"| catch-up after a {fmt(cu.get('records'))}-record gap | {fmt(cu.get('records_per_s'))}"
        f" records/s ({fmt(cu.get('seconds'), 2)} s) |",
        f"| restart of the peer to pair healthy | {fmt(cu.get('restart_to_healthy_s'), 2)} s |",
    ]
    return lines


def md_tls(r: dict) -> list[str]:
    lines = [
        "| transport | bytes per idle connection | server CPU µs/msg | ACK p50 / p99 ms "
        "| delivered / lost / dup |",
        "|---|---:|---:|---:|---|",
    ]
    for mode in ("plain", "tls"):
        x = r.get(mode, {})
        lines.append(
            f"| {mode} | {fmt(x.get('bytes_per_idle_connection'))} | "
            f"{fmt(x.get('server_cpu_us_per_msg'), 1)} | {fmt(x.get('ack_p50_ms'), 2)} / "
            f"{fmt(x.get('ack_p99_ms'), 2)} | {fmt(x.get('delivered'))} / {x.get('lost')} / "
            f"{x.get('duplicated')} |"
        )
    lines += ["", f"TLS / plain: memory ×{fmt(r.get('idle_memory_ratio'), 1)}, CPU per message "
              f"×{fmt(r.get('cpu_ratio'), 2)} ({r.get('workers')} workers)."]  # fmt: skip
    return lines


def md_micro(r: dict) -> list[str]:
    lines = [
        "| benchmark | mean per call | ns per op | extra_info |",
        "|---|---:|---:|---|",
    ]
    for b in r.get("benchmarks", []):
        extra = ", ".join(f"{k}={v}" for k, v in b["extra_info"].items())
        lines.append(
            f"| `{b['name']}` | {fmt(b['mean_ns_per_call'], 1)} ns | "
            f"{fmt(b['ns_per_op'], 1)} /{b['op']} | {extra} |"
        )
    sizes = {
        b["name"]: b["extra_info"]["bytes_per_idle_connection_object"]
        for b in r.get("benchmarks", [])
        if "bytes_per_idle_connection_object" in b["extra_info"]
    }
    if sizes:
        lines += [
            "",
            "Bytes per idle connection object (object + decoder): "
            + ", ".join(f"{k.split('[')[-1].rstrip(']')} {v} B" for k, v in sizes.items())
            + ".",
        ]
    rc = r.get("routing_cost")
    if rc:
        lines += [
            "",
            "Routing cost (`bench/routing_cost.py`, 2 workers, live messages):",
            "",
            "| case | messages | msgs/s | server CPU µs/msg |",
            "|---|---:|---:|---:|",
        ]
        for c in rc.get("cases", []):
            lines.append(
                f"| {c['case']} worker | {fmt(c['messages'])} | {fmt(c['msgs_per_s'])} | "
                f"{fmt(c['server_cpu_us_per_msg'], 2)} |"
            )
        lines += ["", f"Worker-link cost: {fmt(rc.get('link_cost_us_per_msg'), 2)} µs/msg."]
    return lines


MD = {
    "a": md_memory,
    "b": md_cpu,
    "c": md_throughput,
    "d": md_burst,
    "e": md_micro,
    "f": md_pair,
    "g": md_tls,
}


def render_md(report: dict) -> str:
    m = report["machine"]
    dirty = m["git_dirty_files"]
    out = [
        "# iris-fast benchmark report",
        "",
        f"Generated by `{report['invocation']}` on {m['date']} "
        f"({'quick' if report['quick'] else 'full'} run, {report['total_seconds']:.0f} s).",
        "",
        "## Machine",
        "",
        f"- {m['nproc']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM, kernel {m['kernel']}",
        f"- Python {m['python']} (`{m['python_executable']}`), iris-fast {m['iris_fast_version']} "
        f"(`{m['iris_fast_command']}`)",
        f"- open files limit {m['open_files_limit']:,}, ephemeral ports {m['ephemeral_ports']}, "
        f"load average at start {m.get('load_average_at_start')} (1/5/15 min; anything well "
        "above 0 means other processes shared the machine)",
        f"- git commit `{m['git_commit'][:12]}` ({m['git_subject']})"
        + (f"; working tree dirty: {', '.join(dirty)}" if dirty else "; clean working tree"),
        "",
        f"**The load generator and the server share the same {m['nproc']} cores** (loopback "
        "only): CPU-bound figures (µs/msg, latency, throughput) include that contention, and "
        "the server's CPU per message is measured from its own counters, not from the machine.",
        "",
        "## Summary",
        "",
        "| section | status | headline |",
        "|---|---|---|",
    ]
    for key, sec in report["sections"].items():
        status = "**FAILED**" if sec["status"] == "failed" else sec["status"]
        out.append(f"| {TITLES[key]} | {status} | {headline(key, sec.get('result', {}))} |")
    for key, sec in report["sections"].items():
        out += ["", f"## {TITLES[key]}", ""]
        if sec["status"] == "failed":
            out += ["**Section failed:**", "", "```", sec["error"].strip(), "```", ""]
        res = sec.get("result")
        if res:
            try:
                out += MD[key](res)
            except Exception as exc:  # a report bug must not hide the raw figures
                out += [f"(could not render: {exc!r}; see latest.json)"]
        load = sec.get("load_average_at_end")
        out += ["", f"Duration {sec['seconds']:.0f} s; load average at its end {load}. Commands:"]
        out += ["", "```"]
        out += sec["commands"] or ["(none)"]
        out += ["```"]
    out += [
        "",
        "Raw outputs (load generator JSON and logs, server logs) of this run are in "
        "`bench/results/raw/`; every figure above is also in `bench/results/latest.json`.",
        "",
    ]
    return "\n".join(out)


def headline(key: str, r: dict) -> str:
    try:
        if key == "a":
            parts = [
                f"{row['connections'] // 1000}k: {fmt(row.get('bytes_per_connection_loadgen'))}"
                f" B/conn (gauge {fmt(row.get('gauge_bytes_per_connection'))})"
                if "error" not in row
                else f"{row['connections'] // 1000}k: failed"
                for row in r.get("runs", [])
            ]
            return "; ".join(parts) + f" (target ≤ {TARGET_BYTES_PER_CONN:,})"
        if key == "b":
            bal, floor = r.get("balance", {}), r.get("floor") or {}
            return (
                f"{fmt(r.get('server_cpu_us_per_msg'), 1)} µs/msg (target ≤ 15); worker "
                f"min/max {fmt(bal.get('utilisation_ratio_min_max'), 2)} (≥ 0.75); lost "
                f"{r.get('lost')}, dup {r.get('duplicated')}; ×"
                f"{fmt(floor.get('ratio_ours_to_floor'), 2)} the floor relay, whose kernel "
                f"time alone is {fmt(floor.get('floor_system_us_per_msg'), 1)} µs/msg"
            )
        if key == "c":
            return f"{fmt(r.get('best_rate_p99_under_10ms'))} msg/s at ACK p99 < 10 ms"
        if key == "d":
            return (
                f"{fmt(r.get('durable_msgs_per_s'))} durable msg/s, "
                f"{fmt(r.get('messages_per_fsync'), 1)} msgs/fsync"
            )
        if key == "g":
            return (
                f"idle B/conn TLS {fmt(r.get('tls', {}).get('bytes_per_idle_connection'))} vs "
                f"plain {fmt(r.get('plain', {}).get('bytes_per_idle_connection'))}; CPU/msg "
                f"×{fmt(r.get('cpu_ratio'), 2)}"
            )
        if key == "f":
            return (
                f"replicated/single {fmt(r.get('pair_to_single_ratio'), 2)}; failover median "
                f"{fmt(r.get('failover', {}).get('median_ms'), 1)} ms; catch-up "
                f"{fmt(r.get('catchup', {}).get('records_per_s'))} records/s"
            )
        if key == "e":
            rc = r.get("routing_cost", {})
            return (
                f"{len(r.get('benchmarks', []))} micro benchmarks; routing link cost "
                f"{fmt(rc.get('link_cost_us_per_msg'), 2)} µs/msg"
            )
    except Exception:
        pass
    return ""


# --------------------------------------------------------------------------- main


def first_line(error: str) -> str:
    """The line that says what went wrong (a traceback's last line, else the first)."""
    lines = [line for line in error.strip().splitlines() if line.strip()] or ["?"]
    return lines[-1] if lines[0].startswith("Traceback") else lines[0]


def parse_only(text: str | None) -> list[str]:
    if not text:
        return list(SECTIONS)
    by_name = {v: k for k, v in SECTIONS.items()}
    keys = []
    for part in text.split(","):
        part = part.strip().lower()
        key = part if part in SECTIONS else by_name.get(part)
        if key is None:
            raise SystemExit(
                f"unknown section {part!r}; pick from "
                + ", ".join(f"{k}/{v}" for k, v in SECTIONS.items())
            )
        if key not in keys:
            keys.append(key)
    return sorted(keys)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="short smoke version (< 2 minutes)")
    ap.add_argument("--only", help="comma-separated sections: a,b,c,d,e or their names")
    ap.add_argument(
        "--out", default=str(BENCH / "results"), help="report directory (latest.md, latest.json)"
    )
    args = ap.parse_args()
    keys = parse_only(args.only)
    out_dir = Path(args.out).resolve()
    raw = out_dir / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for old in raw.iterdir():
        if old.is_file():
            old.unlink()

    invocation = "python bench/run_all.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    log(f"iris-fast bench suite: sections {', '.join(SECTIONS[k] for k in keys)}"
        f"{' (quick)' if args.quick else ''}")  # fmt: skip
    machine = machine_facts()
    log(
        f"machine: {machine['nproc']} CPUs, {machine['ram_gib']} GiB, Python "
        f"{machine['python']}, kernel {machine['kernel']}, commit {machine['git_commit'][:12]}"
    )
    report: dict[str, Any] = {
        "invocation": invocation,
        "quick": args.quick,
        "machine": machine,
        "sections": {},
        "total_seconds": 0.0,
    }
    interrupted = False
    for key in keys:
        ctx = Context(args.quick, raw)
        t0 = time.monotonic()
        log(f"=== {TITLES[key]}")
        sec: dict[str, Any] = {"name": SECTIONS[key]}
        try:
            result = RUNNERS[key](ctx)
            sec["result"] = result
            if "error" in result:
                sec["status"] = "failed"
                sec["error"] = result["error"]
            else:
                sec["status"] = "ok"
        except KeyboardInterrupt:
            sec["status"] = "failed"
            sec["error"] = "interrupted"
            interrupted = True
        except RuntimeError as exc:  # raised by this runner: the message says what happened
            sec["status"] = "failed"
            sec["error"] = str(exc)
        except Exception:
            sec["status"] = "failed"
            sec["error"] = traceback.format_exc(limit=4)
        sec["seconds"] = round(time.monotonic() - t0, 1)
        sec["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        sec["commands"] = ctx.rec.commands
        report["sections"][key] = sec
        mark = "ok" if sec["status"] == "ok" else "FAILED: " + first_line(sec["error"])
        log(f"=== {TITLES[key]}: {mark} ({sec['seconds']:.0f} s)")
        if interrupted:
            break
    report["total_seconds"] = round(time.monotonic() - _T0, 1)
    (out_dir / "latest.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / "latest.md").write_text(render_md(report))
    failed = [SECTIONS[k] for k, s in report["sections"].items() if s["status"] != "ok"]
    log(f"wrote {out_dir / 'latest.md'} and latest.json")
    if failed:
        log(f"failed sections: {', '.join(failed)}")
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
