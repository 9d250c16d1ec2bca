"""Server CPU per delivered message, sender and recipient on the same worker vs on two workers.

Starts a 2-worker node on free loopback ports, logs in a sender/receiver pair whose users share a
home worker, then a pair on different home workers, and pushes ``--messages`` live messages
through each (pipelined SENDs, the receiver acknowledging every read batch, end-to-end ACKs).
Server CPU comes from the node's own ``iris_worker_cpu_seconds_total``; the difference between
the two cases is the cost of the worker link.

    python bench/routing_cost.py --messages 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time

import iris_native as N

from iris_fast.ports import free_port
from iris_fast.scrape import fetch_metrics, wait_healthy
from iris_fast.server.links import home_of


def user_on(home: int, prefix: str) -> str:
    i = 0
    while home_of(f"{prefix}-{i}", 2) != home:
        i += 1
    return f"{prefix}-{i}"


async def login(port: int, user: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(N.encode((N.LOGIN, 1, user, "")))
    dec = N.Decoder(1 << 20)
    while True:
        for f in dec.feed(await reader.read(1 << 16)):
            if f[0] == N.LOGIN_OK:
                return reader, writer


async def receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    dec = N.Decoder(1 << 20)
    got = 0
    while got < n:
        data = await reader.read(1 << 16)
        if not data:
            raise RuntimeError("receiver connection closed")
        last = 0
        for f in dec.feed(data):
            if f[0] == N.DELIVER:
                got += 1
                last = f[1]
        if last:
            writer.write(N.encode((N.DELIVER_ACK, last)))


async def sender(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, to: str, n: int, window: int
) -> None:
    dec = N.Decoder(1 << 20)
    sent = acked = 0
    body = b"x" * 64
    while acked < n:
        if sent < n and sent - acked < window:
            k = min(window - (sent - acked), n - sent)
            writer.write(
                N.encode_batch([(N.SEND, f"m{i}", to, body) for i in range(sent, sent + k)])
            )
            sent += k
        data = await reader.read(1 << 16)
        if not data:
            raise RuntimeError("sender connection closed")
        acked += sum(1 for f in dec.feed(data) if f[0] == N.ACK)


def worker_cpu(http_port: int) -> tuple[float, float]:
    """Server CPU seconds, and messages stored so far (live ones whose ack came too late)."""
    m = fetch_metrics("127.0.0.1", http_port)
    cpu = sum(v for k, v in m.items() if k.startswith("iris_worker_cpu_seconds_total"))
    return cpu, sum(v for k, v in m.items() if k.startswith("iris_messages_stored_total"))


async def one_case(port: int, http_port: int, same: bool, n: int, window: int) -> dict:
    tag = "same" if same else "cross"
    s_user = user_on(0, f"rc-{tag}-s")
    r_user = user_on(0 if same else 1, f"rc-{tag}-r")
    rr, rw = await login(port, r_user)
    sr, sw = await login(port, s_user)
    cpu0, stored0 = worker_cpu(http_port)
    t0 = time.perf_counter()
    await asyncio.gather(receiver(rr, rw, n), sender(sr, sw, r_user, n, window))
    elapsed = time.perf_counter() - t0
    cpu1, stored1 = worker_cpu(http_port)
    cpu = cpu1 - cpu0
    for w in (rw, sw):
        w.close()
    return {
        "case": tag,
        "messages": n,
        "seconds": round(elapsed, 3),
        "msgs_per_s": round(n / elapsed),
        "server_cpu_us_per_msg": round(cpu / n * 1e6, 2),
        # Live deliveries acknowledged after --live-ack-timeout are stored: not the live path.
        "stored": int(stored1 - stored0),
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--window", type=int, default=200, help="SENDs in flight")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    port, http_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="iris-routing-") as data:
        cmd = [sys.executable, "-m", "iris_fast", "serve", "--workers", "2", "--port", str(port),
               "--http-port", str(http_port), "--data-dir", data, "--log-level", "WARNING",
               "--rate-msgs", "0", "--conn-rate-msgs", "0", "--rate-bytes", "0",
               "--conn-rate-bytes", "0",
               "--max-inflight", str(args.window * 2)]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=data)
        try:
            if not wait_healthy("127.0.0.1", http_port, 30):
                raise RuntimeError("the server did not become healthy in 30 s")
            results = [
                asyncio.run(one_case(port, http_port, same, args.messages, args.window))
                for same in (True, False)
            ]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    same, cross = results
    summary = {
        "cases": results,
        "link_cost_us_per_msg": round(
            cross["server_cpu_us_per_msg"] - same["server_cpu_us_per_msg"], 2
        ),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
