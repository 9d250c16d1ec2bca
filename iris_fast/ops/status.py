"""``iris-fast status``: the nodes at a glance, from their ``/health`` and ``/metrics``.

Each node given with ``--http`` is asked once; the table shows whether it answers, its role in
its pair (paired, alone, catching-up, single), the replication lag to its peer in records and
milliseconds, its workers, connections, memory and delivery rate. The exit code is 0 when every
node answers and says ``ok`` (a degraded pair is not ok), 1 otherwise, so scripts and probes can
use it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from iris_fast.scrape import fetch_health, fetch_metrics


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show the nodes at a glance (from /health and /metrics)")
    p.add_argument(
        "--http",
        default="127.0.0.1:9085",
        help="comma-separated HOST:PORT of each node's HTTP endpoint",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each node")


def probe(endpoint: str, timeout: float) -> dict[str, Any]:
    """What one node says about itself; ``up`` is False with ``error`` when it does not answer."""
    host, _, port = endpoint.rpartition(":")
    try:
        health = fetch_health(host or "127.0.0.1", int(port), timeout)
        metrics = fetch_metrics(host or "127.0.0.1", int(port), timeout)
    except (OSError, ValueError) as exc:
        return {"endpoint": endpoint, "up": False, "error": str(exc)}
    workers = health.get("workers", [])
    repl = health.get("replication") or {}
    return {
        "endpoint": endpoint,
        "up": True,
        "status": health.get("status"),
        "node": health.get("node"),
        "degraded": bool(health.get("degraded")),
        "role": health.get("role", "single"),
        "peer": repl.get("peer"),
        "peer_node": repl.get("peer_node"),
        "peer_up": bool(repl.get("peer_up")),
        "lag_records": int(repl.get("lag_records", 0)),
        "lag_ms": float(repl.get("lag_ms", 0.0)),
        "workers_up": sum(1 for w in workers if w.get("up")),
        "workers": len(workers),
        "restarts": sum(w.get("restarts", 0) for w in workers),
        "connections": health.get("connections", 0),
        "rss_bytes": health.get("rss_bytes", 0),
        "bytes_per_connection": metrics.get("iris_memory_per_connection_bytes", 0.0),
        "delivered_per_s": metrics.get("iris_messages_delivered_per_second", 0.0),
        "stored_total": metrics.get("iris_messages_stored_total", 0.0),
        "uptime_s": health.get("uptime_s", 0.0),
    }


def run(args: argparse.Namespace) -> int:
    endpoints = [e.strip() for e in args.http.split(",") if e.strip()]
    rows = [probe(e, args.timeout) for e in endpoints]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _table(rows)
    return 0 if rows and all(r["up"] and r["status"] == "ok" for r in rows) else 1


def _table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="iris-fast nodes")
    left = ("endpoint", "node", "state", "role")
    for col in ("endpoint", "node", "state", "role", "repl lag", "workers", "connections",
                "memory", "B/conn", "delivered/s", "uptime"):  # fmt: skip
        t.add_column(col, justify="left" if col in left else "right")
    for r in rows:
        if not r["up"]:
            t.add_row(r["endpoint"], "-", f"[red]DOWN[/red] ({r['error']})", *["-"] * 8)
            continue
        state = {"ok": "[green]ok[/green]", "degraded": "[yellow]degraded[/yellow]"}.get(
            r["status"], r["status"]
        )
        role = r["role"]
        if r["peer_node"]:
            role += f" (peer {r['peer_node']})"
        lag = f"{r['lag_records']:,} rec / {r['lag_ms']:,.0f} ms" if r["peer"] else "-"
        t.add_row(
            r["endpoint"],
            str(r["node"]),
            state,
            role,
            lag,
            f"{r['workers_up']}/{r['workers']}"
            + (f" ({r['restarts']} restarts)" if r["restarts"] else ""),
            f"{r['connections']:,}",
            f"{r['rss_bytes'] / 2**20:,.1f} MiB",
            f"{r['bytes_per_connection']:,.0f}",
            f"{r['delivered_per_s']:,.0f}",
            f"{r['uptime_s']:,.0f} s",
        )
    # Not a terminal (a pipe, a probe's log): a wide table rather than one wrapped at 80 columns.
    Console(width=None if sys.stdout.isatty() else 200).print(t)
