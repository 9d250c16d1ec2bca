"""TLS against plain TCP: server memory per idle connection and server CPU per message.

Starts a fresh node for each case (real handshakes, a throwaway CA) and drives it with
``iris-fast load``; both sides share the machine's cores, so read the ratios.

    python bench/tls.py --idle-connections 5000 --connections 500 --rate 5000 --duration 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from pair import Node, log, run_load

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tlsutil import make_cert  # noqa: E402


def load(node: Node, out: Path, tls_ca: str | None, args: list[str]) -> dict[str, Any]:
    extra = ["--tls-ca", tls_ca] if tls_ca else []
    return run_load(node.port, out, ["--server-http", f"127.0.0.1:{node.http}", *args, *extra])


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--idle-connections", type=int, default=5000)
    ap.add_argument("--connections", type=int, default=500)
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--json", help="write the figures to this file")
    a = ap.parse_args()
    result: dict[str, Any] = {"workers": a.workers}
    with tempfile.TemporaryDirectory(prefix="iris-tls-") as tmp:
        d = Path(tmp)
        ca, cert, key = make_cert(d)
        for mode in ("plain", "tls"):
            extra = ("--tls-cert", str(cert), "--tls-key", str(key)) if mode == "tls" else ()
            ca_arg = str(ca) if mode == "tls" else None
            row: dict[str, Any] = {}
            for kind in ("idle", "messages"):
                node = Node(str(d / f"{mode}-{kind}"), mode, a.workers, extra=extra).start(("ok",))
                try:
                    if kind == "idle":
                        log(f"  {mode}: {a.idle_connections:,} idle connections")
                        r = load(node, d / f"{mode}-idle.json", ca_arg,
                                 ["--connections", str(a.idle_connections), "--idle",
                                  "--duration", "3"])  # fmt: skip
                        row["bytes_per_idle_connection"] = r.get("bytes_per_connection")
                    else:
                        log(f"  {mode}: {a.connections} clients, {a.rate:,} msg/s, "
                            f"{a.duration:g} s")  # fmt: skip
                        r = load(node, d / f"{mode}-msgs.json", ca_arg,
                                 ["--connections", str(a.connections), "--rate", str(a.rate),
                                  "--duration", str(a.duration)])  # fmt: skip
                        row.update(
                            server_cpu_us_per_msg=r.get("server_cpu_us_per_msg"),
                            delivered=r.get("delivered"), lost=r.get("lost"),
                            duplicated=r.get("duplicated"),
                            ack_p50_ms=r.get("ack_latency_ms", {}).get("p50"),
                            ack_p99_ms=r.get("ack_latency_ms", {}).get("p99"),
                        )  # fmt: skip
                finally:
                    node.stop()
            result[mode] = row
            log(f"  {mode}: {row}")
    p, t = result["plain"], result["tls"]
    if p.get("bytes_per_idle_connection") and t.get("bytes_per_idle_connection"):
        result["idle_memory_ratio"] = round(
            t["bytes_per_idle_connection"] / p["bytes_per_idle_connection"], 1)  # fmt: skip
    if p.get("server_cpu_us_per_msg") and t.get("server_cpu_us_per_msg"):
        result["cpu_ratio"] = round(t["server_cpu_us_per_msg"] / p["server_cpu_us_per_msg"], 2)
    print(json.dumps(result, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
