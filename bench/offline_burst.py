"""Offline burst: N messages to an offline user, pipelined; durable messages/s and per fsync.

Starts its own server on free loopback ports with a temporary data directory (real LMDB, real
fsync), sends N SENDs as fast as one pipelined connection allows (a window of in-flight SENDs),
waits for every ACK, then reads the server's own counters from /metrics.

    python bench/offline_burst.py --messages 10000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

import iris_native as N

from iris_fast.ports import free_port
from iris_fast.scrape import fetch_metrics, wait_healthy


def metrics(http_port: int) -> dict[str, float]:
    return fetch_metrics("127.0.0.1", http_port, timeout=5)


async def burst(port: int, n: int, window: int, body: bytes) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    dec = N.Decoder(1 << 20)
    writer.write(N.encode((N.LOGIN, 1, "burst-sender", "")))
    acked = 0
    sent = 0
    got_login = False
    started = time.perf_counter()
    last_report = started
    while acked < n:
        if got_login and sent < n and sent - acked < window:
            k = min(window - (sent - acked), n - sent)
            writer.write(
                N.encode_batch(
                    [(N.SEND, f"b{i}", "burst-receiver", body) for i in range(sent, sent + k)]
                )
            )
            sent += k
        data = await reader.read(1 << 16)
        if not data:
            raise RuntimeError("server closed the connection")
        for f in dec.feed(data):
            if f[0] == N.LOGIN_OK:
                got_login = True
                started = time.perf_counter()
            elif f[0] == N.ACK:
                acked += 1
            elif f[0] == N.ERROR:
                raise RuntimeError(f"server error: {f}")
        now = time.perf_counter()
        if now - last_report > 1.0:
            print(f"  ... {acked}/{n} acked", file=sys.stderr)
            last_report = now
    elapsed = time.perf_counter() - started
    writer.close()
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--window", type=int, default=1000, help="SENDs in flight")
    ap.add_argument("--body", type=int, default=100, help="body bytes")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    port, http_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="iris-burst-") as data:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "iris_fast",
                "serve",
                "--port",
                str(port),
                "--http-port",
                str(http_port),
                "--data-dir",
                data,
                "--node-id",
                "bench",
                "--mailbox-limit",
                str(args.messages + 1),
                # The burst comes from one sender: its share of the mailbox must not cap it.
                "--mailbox-per-sender-limit",
                "0",
                "--mailbox-per-sender-max-bytes",
                "0",
                # One sender pipelining a burst is what is measured here, not the rate limits.
                "--rate-msgs",
                "0",
                "--conn-rate-msgs",
                "0",
                "--rate-bytes",
                "0",
                "--conn-rate-bytes",
                "0",
                "--log-level",
                "WARNING",
            ],
            cwd=data,
        )
        try:
            if not wait_healthy("127.0.0.1", http_port, 30):
                raise RuntimeError("the server did not become healthy in 30 s")
            before = metrics(http_port)
            elapsed = asyncio.run(burst(port, args.messages, args.window, b"x" * args.body))
            after = metrics(http_port)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    fsyncs = after["iris_lmdb_fsyncs_total"] - before["iris_lmdb_fsyncs_total"]
    stored = after["iris_messages_stored_total"] - before["iris_messages_stored_total"]
    result = {
        "messages": args.messages,
        "stored": int(stored),
        "seconds": round(elapsed, 3),
        "durable_msgs_per_s": round(args.messages / elapsed),
        "fsyncs": int(fsyncs),
        "messages_per_fsync": round(stored / fsyncs, 1) if fsyncs else None,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if stored == args.messages else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
