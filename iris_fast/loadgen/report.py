"""Merge per-process results into run totals; render them as a rich table and JSON."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from hdrh.histogram import HdrHistogram
from rich.console import Console
from rich.table import Table

from iris_fast.loadgen.plan import LoadPlan
from iris_fast.loadgen.worker import new_histogram

PERCENTILES = (("p50", 50.0), ("p99", 99.0), ("p99_9", 99.9))
MAX_LOST_LISTED = 20


def _bits(data: bytes) -> int:
    """A bitmap (bit i = byte i>>3, bit i&7) as a Python int with the same bit numbering."""
    return int.from_bytes(data, "little")


def _latency_ms(hist: HdrHistogram) -> dict[str, float | None]:
    """p50/p99/p99.9 in ms (None when nothing was recorded)."""
    if hist.get_total_count() == 0:
        return {name: None for name, _ in PERCENTILES}
    return {name: hist.get_value_at_percentile(p) / 1000.0 for name, p in PERCENTILES}


def merge(plan: LoadPlan, results: list[dict], phases: dict[str, float]) -> dict[str, Any]:
    """Totals of a run from the worker result dicts.

    lost = ACKed by the server but delivered to nobody; duplicated = delivered more than once
    (within one receiving process, counted by the worker, or to two processes, found here by
    intersecting their delivered bitmaps).
    """
    fatal = [r["fatal"] for r in results if "fatal" in r]
    ok = [r for r in results if "fatal" not in r]
    sums: Counter = Counter()
    errors: Counter = Counter()
    connect_failures: Counter = Counter()
    retry_reasons: Counter = Counter()
    ack_hist, deliver_hist = new_histogram(), new_histogram()
    acked_by_proc: dict[int, int] = {}
    delivered_by_src: dict[int, int] = {}
    duplicated = 0
    for r in ok:
        for key in (
            "conn_ok", "conn_failed", "connect_retries", "disconnects", "sent", "acked",
            "ack_stored", "ack_duplicate", "ack_unknown", "send_failed", "foreign",
        ):  # fmt: skip
            sums[key] += r[key]
        duplicated += r["duplicated"]
        errors.update(r["errors"])
        connect_failures.update(r["connect_failures"])
        retry_reasons.update(r.get("retry_reasons", {}))
        ack_hist.add(HdrHistogram.decode(r["ack_hist"]))
        deliver_hist.add(HdrHistogram.decode(r["deliver_hist"]))
        acked_by_proc[r["proc"]] = _bits(r["acked_bits"])
        for src, data in r["delivered_bits"].items():
            bits = _bits(data)
            seen = delivered_by_src.get(src, 0)
            duplicated += (seen & bits).bit_count()  # one message at two processes
            delivered_by_src[src] = seen | bits
    delivered = sum(b.bit_count() for b in delivered_by_src.values())
    lost = 0
    lost_ids: list[str] = []
    for proc, acked in sorted(acked_by_proc.items()):
        missing = acked & ~delivered_by_src.get(proc, 0)
        lost += missing.bit_count()
        while missing and len(lost_ids) < MAX_LOST_LISTED:
            low = missing & -missing
            lost_ids.append(f"{proc}.{low.bit_length() - 1}")
            missing ^= low
    send_s = phases.get("send_seconds") or 0.0
    out: dict[str, Any] = {
        "mode": "idle" if plan.idle else "message",
        "user_prefix": plan.user_prefix,
        "procs": plan.procs,
        "source_ips": plan.source_ips,
        "connections": {
            "target": plan.connections,
            "ok": sums["conn_ok"],
            "failed": sums["conn_failed"],
            "failures": dict(connect_failures),
            "retries": sums["connect_retries"],
            "retry_reasons": dict(retry_reasons),
            "disconnected": sums["disconnects"],
        },
        "connect_seconds": round(phases.get("connect_seconds", 0.0), 3),
        "connect_wall_seconds": round(phases.get("connect_wall_seconds", 0.0), 3),
        "sent": sums["sent"],
        "acked": sums["acked"],
        "acked_stored": sums["ack_stored"],
        "acked_duplicate": sums["ack_duplicate"],
        "ack_unknown": sums["ack_unknown"],
        "send_failed": sums["send_failed"],
        "unacked": sums["sent"] - sums["acked"] - sums["send_failed"],
        "delivered": delivered,
        "foreign_deliveries": sums["foreign"],
        "lost": lost,
        "lost_examples": lost_ids,
        "duplicated": duplicated,
        "errors": dict(errors),
        "offered_rate": 0.0 if plan.idle else plan.rate,
        "send_seconds": round(send_s, 3),
        "achieved_send_rate": round(sums["sent"] / send_s, 1) if send_s else 0.0,
        "achieved_msgs_per_s": round(delivered / send_s, 1) if send_s else 0.0,
        "ack_latency_ms": _latency_ms(ack_hist),
        "delivery_latency_ms": _latency_ms(deliver_hist),
        "worker_failures": fatal,
    }
    return out


def add_server_figures(
    totals: dict[str, Any],
    health_before: dict | None,
    health_after: dict | None,
    cpu_before: float | None,
    cpu_after: float | None,
) -> None:
    """Server RSS per connection and CPU µs per delivered message from /health and /metrics."""
    if health_before is not None and health_after is not None:
        before, after = health_before.get("rss_bytes"), health_after.get("rss_bytes")
        totals["server_rss_before"] = before
        totals["server_rss_after"] = after
        totals["server_connections_after"] = health_after.get("connections")
        ok = totals["connections"]["ok"]
        if before is not None and after is not None and ok:
            totals["bytes_per_connection"] = round((after - before) / ok, 1)
    if cpu_before is not None and cpu_after is not None:
        totals["server_cpu_seconds"] = round(cpu_after - cpu_before, 3)
        if totals["delivered"]:
            totals["server_cpu_us_per_msg"] = round(
                (cpu_after - cpu_before) * 1e6 / totals["delivered"], 2
            )


def write_json(totals: dict[str, Any], path: str) -> None:
    """Write the totals as JSON (``-`` writes to stdout)."""
    text = json.dumps(totals, indent=2, sort_keys=True)
    if path == "-":
        print(text)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def render_table(totals: dict[str, Any], console: Console) -> None:
    """Print the human summary of a run."""
    t = Table(title=f"iris-fast load ({totals['mode']})", show_header=True)
    t.add_column("metric")
    t.add_column("value", justify="right")
    c = totals["connections"]
    t.add_row("connections ok / failed", f"{c['ok']:,} / {c['failed']:,} (of {c['target']:,})")
    if c["retries"]:
        t.add_row("connect retries (transient)", f"{c['retries']:,}")
    if c["failures"]:
        t.add_row("connect failures", ", ".join(f"{k}: {v}" for k, v in c["failures"].items()))
    t.add_row(
        "connect phase (workers / wall)",
        f"{totals['connect_seconds']:.2f} s / {totals['connect_wall_seconds']:.2f} s",
    )
    if totals["mode"] == "message":
        t.add_row("sent", f"{totals['sent']:,}")
        t.add_row(
            "acked (stored / duplicate)",
            f"{totals['acked']:,} ({totals['acked_stored']:,} / {totals['acked_duplicate']:,})",
        )
        t.add_row("unacked / send failed", f"{totals['unacked']:,} / {totals['send_failed']:,}")
        t.add_row("delivered", f"{totals['delivered']:,}")
        t.add_row("lost", f"{totals['lost']:,}")
        t.add_row("duplicated", f"{totals['duplicated']:,}")
        t.add_row("offered rate", f"{totals['offered_rate']:,.0f} msg/s")
        t.add_row("achieved send rate", f"{totals['achieved_send_rate']:,.0f} msg/s")
        t.add_row("achieved delivered", f"{totals['achieved_msgs_per_s']:,.0f} msg/s")
        for key, label in (("ack_latency_ms", "ACK"), ("delivery_latency_ms", "delivery")):
            lat = totals[key]
            t.add_row(
                f"{label} latency p50/p99/p99.9",
                " / ".join(_fmt_ms(lat[n]) for n, _ in PERCENTILES) + " ms",
            )
    errors = totals["errors"]
    t.add_row("errors", ", ".join(f"{k}: {v}" for k, v in errors.items()) if errors else "0")
    if "server_rss_before" in totals:
        t.add_row(
            "server RSS before / after",
            f"{totals['server_rss_before']:,} / {totals['server_rss_after']:,} B",
        )
    if "bytes_per_connection" in totals:
        t.add_row("server bytes / connection", f"{totals['bytes_per_connection']:,.0f}")
    if "server_cpu_us_per_msg" in totals:
        t.add_row("server CPU / message", f"{totals['server_cpu_us_per_msg']:,.1f} µs")
    for f in totals["worker_failures"]:
        t.add_row("[red]worker failure[/red]", f)
    console.print(t)
