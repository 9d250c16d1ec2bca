"""Server CPU per message against the floor: the same load on iris-fast and on a minimal relay.

Runs ``iris-fast load`` (same connections, rate and duration) first against a fresh
``iris-fast serve`` and then against ``bench/floor_relay.py``, a single uvloop process that only
relays SEND -> DELIVER and DELIVER_ACK -> ACK with no storage, dedup, limits or second worker.
For each it reads the server's user and system CPU time from ``/proc`` (every process of the
server's process group) around the load run and divides by the messages delivered.

What it tells: the system (kernel) time per message of the floor relay is what the socket
reads and writes of this traffic cost on this machine, whatever the server is written in; the
ratio ours / floor is what our own work adds. Both share the machine with the load generator.

    python bench/floor.py --connections 1000 --rate 20000 --duration 10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from floor_relay import running
from pair import Node, log, run_load

from iris_fast.ports import free_port

TICKS = os.sysconf("SC_CLK_TCK")


def group_cpu(pgid: int) -> tuple[float, float, int]:
    """(user s, system s, processes) summed over the live processes of process group ``pgid``."""
    user = system = 0.0
    n = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces: split after its closing parenthesis.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) != pgid:
            continue
        user += int(fields[11]) / TICKS
        system += int(fields[12]) / TICKS
        n += 1
    return user, system, n


def measure(name: str, pgid: int, port: int, out: Path, args: argparse.Namespace) -> dict:
    """One load run against the server whose process group is ``pgid``."""
    u0, s0, _ = group_cpu(pgid)
    t0 = time.monotonic()
    load_args = ["--connections", str(args.connections), "--rate", str(args.rate),
                 "--duration", str(args.duration)]  # fmt: skip
    totals = run_load(port, out, load_args)
    wall = time.monotonic() - t0
    u1, s1, procs = group_cpu(pgid)
    user, system = u1 - u0, s1 - s0
    ack = totals.get("ack_latency_ms") or {}
    row = per_message({
        "server": name,
        "processes": procs,
        "delivered": totals.get("delivered") or 0,
        "lost": totals.get("lost"),
        "duplicated": totals.get("duplicated"),
        "cpu_utilisation": round((user + system) / wall, 3),
        "user_s": round(user, 3),
        "system_s": round(system, 3),
        "ack_p50_ms": ack.get("p50"),
        "ack_p99_ms": ack.get("p99"),
    })  # fmt: skip
    log(f"  {name}: {row['cpu_us_per_msg']} µs/msg (user {row['user_us_per_msg']}, system "
        f"{row['system_us_per_msg']}), delivered {row['delivered']:,}, lost {row['lost']}, "
        f"dup {row['duplicated']}")  # fmt: skip
    return row


def per_message(row: dict) -> dict:
    """Fill in CPU, user and system µs per delivered message from the row's seconds."""
    delivered, user, system = row["delivered"], row["user_s"], row["system_s"]
    for key, value in (("cpu_us_per_msg", user + system), ("user_us_per_msg", user),
                       ("system_us_per_msg", system)):  # fmt: skip
        row[key] = round(value / delivered * 1e6, 2) if delivered else None
    return row


def run_ours(d: Path, a: argparse.Namespace) -> dict:
    node = Node(str(d), "ours", a.workers).start(("ok",))
    try:
        assert node.proc is not None
        return measure("iris-fast", node.proc.pid, node.port, d / "ours.json", a)
    finally:
        node.stop()


def run_floor(d: Path, a: argparse.Namespace) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with running(port) as relay:
        return measure("floor relay", relay.pid, port, d / "floor.json", a)


def pooled(rows: list[dict]) -> dict:
    """One server's rounds as one row: CPU and messages summed before dividing."""
    out = dict(rows[-1])
    delivered = sum(r["delivered"] for r in rows)
    user, system = sum(r["user_s"] for r in rows), sum(r["system_s"] for r in rows)
    out["delivered"] = delivered
    out["lost"] = sum(r["lost"] or 0 for r in rows)
    out["duplicated"] = sum(r["duplicated"] or 0 for r in rows)
    out["user_s"], out["system_s"] = round(user, 3), round(system, 3)
    per_message(out)
    # Latency percentiles do not pool: keep the worst round's.
    for key in ("ack_p50_ms", "ack_p99_ms"):
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = max(values) if values else None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--rate", type=int, default=20000)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument(
        "--rounds", type=int, default=1, help="alternate the two servers; figures are pooled"
    )
    ap.add_argument("--json", help="write the figures to this file")
    a = ap.parse_args()
    log(
        f"floor: {a.connections:,} clients, {a.rate:,} msg/s for {a.duration:g} s, "
        f"iris-fast ({a.workers} workers) then the floor relay (1 process)"
    )
    rounds: list[list[dict]] = []
    with tempfile.TemporaryDirectory(prefix="iris-floor-") as tmp:
        d = Path(tmp)
        for r in range(a.rounds):
            if a.rounds > 1:
                log(f"  round {r + 1} of {a.rounds}")
            rounds.append([run_ours(d / f"ours-{r}", a), run_floor(d / f"floor-{r}", a)])
    rows = [pooled([rnd[i] for rnd in rounds]) for i in range(2)]
    ours, floor = rows
    result: dict[str, Any] = {
        "connections": a.connections,
        "rate": a.rate,
        "duration_s": a.duration,
        "workers": a.workers,
        "rounds": a.rounds,
        "runs": rows,
        "per_round": rounds,
    }
    if ours["cpu_us_per_msg"] and floor["cpu_us_per_msg"]:
        result["ratio_ours_to_floor"] = round(ours["cpu_us_per_msg"] / floor["cpu_us_per_msg"], 2)
        result["ours_above_floor_us"] = round(ours["cpu_us_per_msg"] - floor["cpu_us_per_msg"], 2)
        result["floor_system_us_per_msg"] = floor["system_us_per_msg"]
        result["ratio_per_round"] = [
            round(o["cpu_us_per_msg"] / f["cpu_us_per_msg"], 2)
            for o, f in rounds
            if o["cpu_us_per_msg"] and f["cpu_us_per_msg"]
        ]
        log(f"  ours / floor: {result['ratio_ours_to_floor']} (per round "
            f"{result['ratio_per_round']}); the floor's system time alone is "
            f"{floor['system_us_per_msg']} µs/msg")  # fmt: skip
    text = json.dumps(result, indent=2)
    if a.json:
        Path(a.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
