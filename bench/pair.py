"""Pair replication figures: durable replicated msgs/s and ACK latency (vs replication off),
failover time, and catch-up rate after a gap.

Starts real nodes on free loopback ports with temporary data directories (real LMDB, real fsync
on both nodes) and drives them with pipelined SENDs to offline users.

    python bench/pair.py                        # everything, a few minutes
    python bench/pair.py --messages 20000 --gap 100000 --failovers 5 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import iris_native as N

from iris_fast.client import IrisClient
from iris_fast.ports import free_port
from iris_fast.scrape import fetch_health, fetch_metrics, wait_healthy


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_load(port: int, out: Path, args: list[str]) -> dict[str, Any]:
    """``iris-fast load --port PORT --json OUT ARGS...``; its JSON (quiet, 600 s at most)."""
    cmd = [sys.executable, "-m", "iris_fast", "load", "--port", str(port), "--json", str(out),
           *args]  # fmt: skip
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=600)  # fmt: skip
    return json.loads(out.read_text())


class Node:
    """One ``iris-fast serve`` process (its own process group, so kill -9 takes all of it)."""

    def __init__(self, data: str, name: str, workers: int, repl_port: int = 0,
                 peer_port: int = 0, extra: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.data = os.path.join(data, name)
        os.makedirs(self.data, exist_ok=True)
        self.name = name
        self.port, self.http = free_port(), free_port()
        self.args = [
            sys.executable, "-m", "iris_fast", "serve", "--port", str(self.port),
            "--http-port", str(self.http), "--data-dir", self.data, "--node-id", name,
            "--workers", str(workers), "--log-level", "WARNING", "--mailbox-limit", "1000000",
            "--mailbox-max-bytes", str(1 << 40), "--rate-msgs", "0", "--conn-rate-msgs", "0",
            "--rate-bytes", "0", "--conn-rate-bytes", "0",
            *extra,
        ]  # fmt: skip
        if repl_port:
            self.args += ["--repl-port", str(repl_port)]
        if peer_port:
            self.args += ["--peer", f"127.0.0.1:{peer_port}"]
        self.proc: subprocess.Popen | None = None

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self, accept: tuple[str, ...] = ("ok", "degraded")) -> Node:
        logf = open(os.path.join(self.data, "..", f"{self.name}.log"), "ab")
        self.proc = subprocess.Popen(self.args, cwd=self.data, stdout=logf, stderr=logf,
                                     start_new_session=True)  # fmt: skip
        if not wait_healthy("127.0.0.1", self.http, 60, accept):
            raise RuntimeError(f"node {self.name} did not come up")
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()

    def health(self) -> dict:
        return fetch_health("127.0.0.1", self.http)

    def metrics(self) -> dict[str, float]:
        return fetch_metrics("127.0.0.1", self.http)


def start_pair(data: str, workers: int) -> tuple[Node, Node]:
    ra, rb = free_port(), free_port()
    a = Node(data, "a", workers, ra, rb)
    b = Node(data, "b", workers, rb, ra)
    a.start()
    b.start()
    deadline = time.monotonic() + 30
    while not all(n.health()["status"] == "ok" for n in (a, b)):
        if time.monotonic() > deadline:
            raise RuntimeError("pair did not become healthy")
        time.sleep(0.05)
    return a, b


async def burst(addr: tuple[str, int], n: int, window: int, body: bytes, sender: str,
                rate: float = 0.0) -> dict[str, Any]:  # fmt: skip
    """Pipelined SENDs to offline users (a window in flight, optionally paced at ``rate``/s);
    per-message ACK latency."""
    reader, writer = await asyncio.open_connection(*addr)
    dec = N.Decoder(1 << 20)
    writer.write(N.encode((N.LOGIN, 1, sender, "")))
    sent_at: list[float] = [0.0] * n
    lat: list[float] = []
    flags_seen = 0
    sent = acked = 0
    logged_in = False
    started = last = time.perf_counter()
    while acked < n:
        if logged_in and sent < n and sent - acked < window:
            k = min(window - (sent - acked), n - sent)
            if rate:
                due = int((time.perf_counter() - started) * rate) + 1
                k = max(min(k, due - sent), 0)
            if k:
                now = time.perf_counter()
                frames = []
                for i in range(sent, sent + k):
                    sent_at[i] = now
                    frames.append((N.SEND, str(i), f"{sender}-r{i % 100}", body))
                writer.write(N.encode_batch(frames))
                sent += k
        try:
            data = await asyncio.wait_for(reader.read(1 << 16), 0.001 if rate else 30)
        except TimeoutError:
            continue
        if not data:
            raise RuntimeError("server closed the connection")
        now = time.perf_counter()
        for f in dec.feed(data):
            if f[0] == N.LOGIN_OK:
                logged_in = True
                started = time.perf_counter()
            elif f[0] == N.ACK:
                lat.append(now - sent_at[int(f[1])])
                flags_seen |= f[2]
                acked += 1
            elif f[0] == N.ERROR:
                raise RuntimeError(f"server error: {f}")
        if now - last > 2:
            log(f"    ... {acked:,}/{n:,} acked")
            last = now
    elapsed = time.perf_counter() - started
    writer.close()
    lat.sort()
    return {
        "messages": n,
        "seconds": round(elapsed, 3),
        "msgs_per_s": round(n / elapsed),
        "ack_p50_ms": round(lat[len(lat) // 2] * 1000, 2),
        "ack_p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 2),
        "degraded_acks": bool(flags_seen & N.ACK_DEGRADED),
    }


def fsync_figures(before: dict, after: dict) -> dict[str, Any]:
    fs = after["iris_lmdb_fsyncs_total"] - before["iris_lmdb_fsyncs_total"]
    ops = after["iris_lmdb_batch_size_sum"] - before["iris_lmdb_batch_size_sum"]
    return {"fsyncs": int(fs), "ops_per_fsync": round(ops / fs, 1) if fs else None}


def measure_throughput(args: argparse.Namespace, data: str) -> dict[str, Any]:
    body = b"x" * args.body
    out: dict[str, Any] = {}
    for mode in ("single", "pair"):
        sub = os.path.join(data, f"tp-{mode}")
        if mode == "single":
            nodes = [Node(sub, "solo", args.workers).start(("ok",))]
        else:
            nodes = list(start_pair(sub, args.workers))
        try:
            target = nodes[0]
            before = [n.metrics() for n in nodes]
            log(f"  {mode}: {args.messages:,} pipelined durable SENDs (window {args.window})")
            r = asyncio.run(burst(target.addr, args.messages, args.window, body, f"{mode}-burst"))
            after = [n.metrics() for n in nodes]
            r["fsync"] = [fsync_figures(b, a) for b, a in zip(before, after, strict=True)]
            log(f"  {mode}: paced at {args.rate:,} msg/s for latency")
            paced = asyncio.run(burst(target.addr, args.rate * 5, args.window, body,
                                      f"{mode}-paced", rate=args.rate))  # fmt: skip
            out[mode] = {"burst": r, "paced": paced}
        finally:
            for n in nodes:
                n.stop()
    return out


def measure_failover(args: argparse.Namespace, data: str) -> dict[str, Any]:
    a, b = start_pair(os.path.join(data, "failover"), args.workers)
    times = []
    try:
        for run in range(args.failovers):
            c = IrisClient(*a.addr, nodes=[b.addr], timeout=30)
            c.login(f"fo{run}")
            c.send_msg("someone", b"before")
            t0 = time.perf_counter()
            a.kill9()
            c.send_msg("someone", b"after")
            times.append(time.perf_counter() - t0)
            c.close()
            log(f"  run {run + 1}: first ACK through b {times[-1] * 1000:.0f} ms after kill -9")
            a.start()
            deadline = time.monotonic() + 30
            while a.health()["status"] != "ok" or b.health()["status"] != "ok":
                if time.monotonic() > deadline:
                    raise RuntimeError("pair did not heal")
                time.sleep(0.05)
    finally:
        a.stop()
        b.stop()
    return {
        "runs": len(times),
        "median_ms": round(statistics.median(times) * 1000, 1),
        "max_ms": round(max(times) * 1000, 1),
    }


def measure_catchup(args: argparse.Namespace, data: str) -> dict[str, Any]:
    a, b = start_pair(os.path.join(data, "catchup"), args.workers)
    try:
        b.kill9()
        log(f"  b killed; {args.gap:,} messages through a alone")
        asyncio.run(burst(a.addr, args.gap, args.window, b"x" * args.body, "gap"))
        lag = a.health()["replication"]["lag_records"]
        log(f"  a holds {lag:,} records for b; restarting b")
        t0 = time.perf_counter()
        b.start()
        up = time.perf_counter()
        first_seen = None
        while True:
            h = a.health()["replication"]
            if h["peer_up"] and first_seen is None:
                first_seen = time.perf_counter()
            if h["peer_up"] and not h["catching_up"] and h["lag_records"] == 0:
                break
            if time.perf_counter() - t0 > 600:
                raise RuntimeError("catch-up did not finish in 600 s")
            time.sleep(0.02)
        done = time.perf_counter()
        m = a.metrics()
    finally:
        a.stop()
        b.stop()
    start = first_seen or up
    took = max(done - start, 1e-3)
    return {
        "records": lag,
        "catchup_records_total": int(m.get("iris_repl_catchup_records_total", 0)),
        "seconds": round(took, 3),
        "records_per_s": round(lag / took),
        "restart_to_healthy_s": round(done - t0, 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workers", type=int, default=1, help="workers per node")
    ap.add_argument("--messages", type=int, default=20_000, help="burst size")
    ap.add_argument("--window", type=int, default=1000, help="SENDs in flight")
    ap.add_argument("--rate", type=int, default=2000, help="paced rate for latency, msg/s")
    ap.add_argument("--body", type=int, default=100)
    ap.add_argument("--failovers", type=int, default=5)
    ap.add_argument("--gap", type=int, default=100_000, help="records for the catch-up run")
    ap.add_argument("--only", choices=["throughput", "failover", "catchup"])
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    result: dict[str, Any] = {"workers_per_node": args.workers}
    with tempfile.TemporaryDirectory(prefix="iris-pair-") as data:
        if args.only in (None, "throughput"):
            log("durable replicated throughput and ACK latency (vs single node)")
            result["throughput"] = measure_throughput(args, data)
        if args.only in (None, "failover"):
            log(f"failover time over {args.failovers} runs")
            result["failover"] = measure_failover(args, data)
        if args.only in (None, "catchup"):
            log(f"catch-up after a {args.gap:,}-record gap")
            result["catchup"] = measure_catchup(args, data)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
