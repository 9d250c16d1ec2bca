"""Live-delivery ACK latency on a replicated pair, and a self-send with the blocking client.

Starts two 1-worker nodes replicating to each other (free loopback ports, temporary data
directories, real LMDB and fsync), then:

* ``live``: ``--messages`` sequential SENDs to a recipient on the same node that acknowledges
  each DELIVER at once; sender ACK latency. With a peer the ACK waits for the message's dedup
  record on the peer (docs/architecture.md, "Issue 10").
* ``self_send``: ``--self-sends`` times ``send_msg`` to oneself then ``recv`` with
  ``IrisClient``: the ACK comes once ``--live-ack-timeout`` passed and the message is stored.

    python bench/live_ack.py --messages 300
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import iris_native as N

from iris_fast.client import IrisClient
from iris_fast.ports import free_port
from iris_fast.scrape import fetch_health


def wait_ok(http_ports: list[int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if all(fetch_health("127.0.0.1", p)["status"] == "ok" for p in http_ports):
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the pair did not become healthy")


class Raw:
    """Just enough of a protocol client for sequential request/response timing."""

    def __init__(self, port: int, user: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.dec = N.Decoder(1 << 20)
        self.frames: list[tuple] = []
        self.send((N.LOGIN, 1, user, ""))
        self.expect(N.LOGIN_OK)

    def send(self, frame: tuple) -> None:
        self.sock.sendall(N.encode(frame))

    def expect(self, kind: int) -> tuple:
        while True:
            while self.frames:
                f = self.frames.pop(0)
                if f[0] == kind:
                    return f
            data = self.sock.recv(1 << 16)
            if not data:
                raise RuntimeError("connection closed")
            self.frames.extend(self.dec.feed(data))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(int(len(values) * q), len(values) - 1)], 3)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--self-sends", type=int, default=20)
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    ports = [free_port() for _ in range(6)]
    pa, pb, ha, hb, ra, rb = ports
    procs = []
    with tempfile.TemporaryDirectory(prefix="iris-live-ack-") as data:
        for node, port, http, repl, peer in (("a", pa, ha, ra, rb), ("b", pb, hb, rb, ra)):
            cmd = [sys.executable, "-m", "iris_fast", "serve", "--workers", "1", "--port",
                   str(port), "--http-port", str(http), "--data-dir", f"{data}/{node}",
                   "--node-id", node, "--repl-port", str(repl), "--peer", f"127.0.0.1:{peer}",
                   "--log-level", "WARNING"]  # fmt: skip
            procs.append(subprocess.Popen(cmd, cwd=data))
        try:
            wait_ok([ha, hb])
            rcv, snd = Raw(pa, "bob"), Raw(pa, "alice")
            live = []
            for i in range(args.messages):
                t = time.perf_counter()
                snd.send((N.SEND, f"m{i}", "bob", b"x"))
                d = rcv.expect(N.DELIVER)
                rcv.send((N.DELIVER_ACK, d[1]))
                snd.expect(N.ACK)
                live.append((time.perf_counter() - t) * 1e3)
            me = IrisClient("127.0.0.1", pa, timeout=10)
            me.login("me")
            selfs = []
            for _ in range(args.self_sends):
                t = time.perf_counter()
                me.send_msg("me", b"x")
                me.recv(timeout=5)
                selfs.append((time.perf_counter() - t) * 1e3)
            me.close()
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=30)
    out: dict[str, dict[str, float]] = {
        "live_ack_ms": {"p50": round(statistics.median(live), 3), "p99": pct(live, 0.99)},
    }
    if selfs:
        out["self_send_recv_ms"] = {
            "p50": round(statistics.median(selfs), 1),
            "max": round(max(selfs), 1),
        }
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
