"""A client that sends PINGs and never reads its PONGs: what it costs the worker.

Starts its own one-worker server on free loopback ports (``--socket-sndbuf 16384``, so that what
the client does not read waits in the worker rather than in the kernel), sends up to ``--mib``
MiB of PINGs from a socket with a 4 KiB receive buffer that is never read, and reports how much
was sent before the server cut the connection (if it did) and the worker's RSS growth.

    python bench/slow_reader.py --mib 40
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time

import iris_native as N

from iris_fast.ports import free_port
from iris_fast.scrape import fetch_metrics, wait_healthy


def flood(port: int, limit: int) -> tuple[socket.socket, int, bool, float]:
    """(the socket, still open; bytes sent; whether the server cut us; seconds)."""
    pings = b"".join(N.encode((N.PING, i)) for i in range(1 << 16))
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.settimeout(10)
    sent, t0 = 0, time.monotonic()
    while sent < limit and time.monotonic() - t0 < 60:
        try:
            s.sendall(pings)
        except (ConnectionResetError, BrokenPipeError):
            return s, sent, True, time.monotonic() - t0
        except TimeoutError:
            break
        sent += len(pings)
    return s, sent, False, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mib", type=int, default=40, help="MiB of PINGs to send at most")
    ap.add_argument("--server-arg", action="append", default=[], help="extra serve option")
    args = ap.parse_args()
    port, http_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="iris-slow-") as data:
        proc = subprocess.Popen(
            [sys.executable, "-m", "iris_fast", "serve", "--port", str(port),
             "--http-port", str(http_port), "--data-dir", data, "--node-id", "bench",
             "--workers", "1", "--socket-sndbuf", "16384", "--login-timeout", "120",
             "--log-level", "ERROR", *args.server_arg],
            cwd=data,
        )  # fmt: skip
        try:
            if not wait_healthy("127.0.0.1", http_port, 30):
                raise RuntimeError("the server did not become healthy in 30 s")
            before = fetch_metrics("127.0.0.1", http_port, timeout=5)["iris_rss_bytes"]
            sock, sent, cut, seconds = flood(port, args.mib << 20)
            time.sleep(1.0)  # let the worker settle; RSS is read while the client is connected
            after = fetch_metrics("127.0.0.1", http_port, timeout=5)["iris_rss_bytes"]
            sock.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(json.dumps({
        "sent_mib": round(sent / (1 << 20), 1),
        "cut": cut,
        "seconds": round(seconds, 2),
        "worker_rss_growth_mib": round((after - before) / (1 << 20), 1),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
