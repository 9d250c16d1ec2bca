"""Merge the workers' ``/metrics`` and ``/health`` into one view of the node.

Each worker exposes its own counters; the supervisor sums them sample by sample (same name, same
labels), recomputes the ratios that do not add up (averages, bytes per connection) from the sums,
and adds a per-worker breakdown under ``iris_worker_*`` with a ``worker`` label. Operators and
Prometheus see one node; nothing on the hot path is shared between processes.
"""

from __future__ import annotations

import re

# Per-worker breakdown: family -> exported as iris_worker_<suffix>{worker="i"}.
PER_WORKER = {
    "iris_connections": ("connections", "gauge", "Open client connections per worker"),
    "iris_sessions": ("sessions", "gauge", "Logged-in sessions per worker"),
    "iris_cpu_seconds_total": ("cpu_seconds_total", "counter", "CPU seconds per worker"),
    "iris_rss_bytes": ("rss_bytes", "gauge", "Resident memory per worker"),
    "iris_messages_received_total": (
        "messages_received_total",
        "counter",
        "SEND frames processed per worker",
    ),
    "iris_messages_delivered_total": (
        "messages_delivered_total",
        "counter",
        "Deliveries acknowledged per worker",
    ),
    "iris_mailboxes": ("mailboxes", "gauge", "Mailboxes held in memory per worker"),
    "iris_routed_bytes": (
        "routed_bytes",
        "gauge",
        "Bytes forwarded to other workers and not yet answered, per worker",
    ),
    "iris_link_queued_bytes": (
        "link_queued_bytes",
        "gauge",
        "Bytes queued on worker links, per worker",
    ),
    "iris_dedup_age_seconds": (
        "dedup_age_seconds",
        "gauge",
        "Real span of the dedup window per worker",
    ),
}

# Gauges whose node value is not the sum of the workers' values.
DERIVED = {
    "iris_write_batch_avg",
    "iris_memory_per_connection_bytes",
    "iris_uptime_seconds",
    "iris_repl_peer_up",
    "iris_repl_degraded",
    "iris_repl_lag_ms",
    "iris_dedup_age_seconds",
}

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?$")


def _family(sample_name: str, families: dict[str, tuple[str, str]]) -> str:
    for suffix in ("_bucket", "_count", "_sum", "_total", "_created"):
        if sample_name.endswith(suffix) and sample_name[: -len(suffix)] in families:
            return sample_name[: -len(suffix)]
    return sample_name


def merge_metrics(texts: dict[int, str], up: dict[int, bool]) -> str:
    """One exposition for the node from the workers' expositions (keyed by worker index)."""
    families: dict[str, tuple[str, str]] = {}  # family -> (help, type)
    order: list[str] = []
    sums: dict[str, dict[str, float]] = {}  # family -> {sample key: value}
    per_worker: dict[str, dict[int, float]] = {}
    for index, text in sorted(texts.items()):
        helps: dict[str, str] = {}
        for line in text.splitlines():
            if line.startswith("# HELP "):
                name, _, doc = line[7:].partition(" ")
                helps[name] = doc
                continue
            if line.startswith("# TYPE "):
                name, _, kind = line[7:].partition(" ")
                if name not in families:
                    families[name] = (helps.get(name, ""), kind)
                    order.append(name)
                continue
            if not line or line.startswith("#"):
                continue
            key, _, raw = line.rpartition(" ")
            m = _SAMPLE.match(key)
            if m is None:
                continue
            name = m.group(1)
            if name.endswith("_created"):
                continue
            value = float(raw)
            fam = _family(name, families)
            sums.setdefault(fam, {})
            sums[fam][key] = sums[fam].get(key, 0.0) + value
            if key in PER_WORKER:
                per_worker.setdefault(key, {})[index] = value

    def total(key: str) -> float:
        return sums.get(_family(key, families), {}).get(key, 0.0)

    derived = {
        "iris_write_batch_avg": _ratio(
            total("iris_frames_out_total"), total("iris_socket_writes_total")
        ),
        "iris_memory_per_connection_bytes": _ratio(
            total("iris_rss_bytes") - total("iris_rss_baseline_bytes"), total("iris_connections")
        ),
        # The sum of uptimes means nothing: report the oldest worker's.
        "iris_uptime_seconds": _max_sample(texts, "iris_uptime_seconds"),
        # A node's peer is up when every stream's is; its lag is its slowest stream's.
        "iris_repl_peer_up": _min_sample(texts, "iris_repl_peer_up"),
        "iris_repl_degraded": _max_sample(texts, "iris_repl_degraded"),
        "iris_repl_lag_ms": _max_sample(texts, "iris_repl_lag_ms"),
        # The node's dedup guarantee is its shortest window's; an empty window has no span.
        "iris_dedup_age_seconds": _min_sample(texts, "iris_dedup_age_seconds", skip_zero=True),
    }

    out: list[str] = []
    for fam in order:
        doc, kind = families[fam]
        out.append(f"# HELP {fam} {doc}")
        out.append(f"# TYPE {fam} {kind}")
        if fam in DERIVED:
            out.append(f"{fam} {derived[fam]}")
            continue
        for key, value in sums.get(fam, {}).items():
            out.append(f"{key} {value}")
    out.append("# HELP iris_lmdb_messages_per_fsync Storage operations per fsync since start")
    out.append("# TYPE iris_lmdb_messages_per_fsync gauge")
    out.append(
        "iris_lmdb_messages_per_fsync "
        f"{_ratio(total('iris_lmdb_batch_size_sum'), total('iris_lmdb_batch_size_count'))}"
    )
    out.append("# HELP iris_workers_up Worker processes answering")
    out.append("# TYPE iris_workers_up gauge")
    out.append(f"iris_workers_up {sum(1 for v in up.values() if v)}")
    out.append("# HELP iris_worker_up 1 if the worker answers, else 0")
    out.append("# TYPE iris_worker_up gauge")
    for index, is_up in sorted(up.items()):
        out.append(f'iris_worker_up{{worker="{index}"}} {1 if is_up else 0}')
    for key, (suffix, kind, doc) in PER_WORKER.items():
        fam = f"iris_worker_{suffix}"
        base = fam[: -len("_total")] if kind == "counter" else fam
        out.append(f"# HELP {base} {doc}")
        out.append(f"# TYPE {base} {kind}")
        for index, value in sorted(per_worker.get(key, {}).items()):
            out.append(f'{fam}{{worker="{index}"}} {value}')
    return "\n".join(out) + "\n"


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _max_sample(texts: dict[int, str], name: str) -> float:
    best = 0.0
    for text in texts.values():
        for line in text.splitlines():
            if line.startswith(name + " "):
                best = max(best, float(line.rpartition(" ")[2]))
    return best


def _min_sample(texts: dict[int, str], name: str, skip_zero: bool = False) -> float:
    values = [
        float(line.rpartition(" ")[2])
        for text in texts.values()
        for line in text.splitlines()
        if line.startswith(name + " ")
    ]
    if skip_zero:
        values = [v for v in values if v]
    return min(values) if values else 0.0


def merge_health(
    node: str,
    version: str,
    workers: dict[int, dict | None],
    restarts: dict[int, int],
    started: float,
    now: float,
) -> dict:
    """The node's ``/health`` from each worker's (None for a worker that did not answer)."""
    up = [h for h in workers.values() if h]
    # "ok" once every worker answers and is linked to every other one: before that, a message
    # between workers would wait for a link.
    all_up = len(up) == len(workers) and all(h["links_up"] >= len(workers) - 1 for h in up)
    draining = any(h.get("status") == "draining" for h in up)
    repl = merge_replication([h.get("replication") for h in up])
    degraded = bool(repl and repl["degraded"])
    if draining:
        status = "draining"
    elif not all_up:
        status = "starting"
    else:
        status = "degraded" if degraded else "ok"
    return {
        "status": status,
        "node": node,
        "version": version,
        "connections": sum(h["connections"] for h in up),
        "sessions": sum(h["sessions"] for h in up),
        "uptime_s": round(now - started, 3),
        "rss_bytes": sum(h["rss_bytes"] for h in up),
        "cores": [node],
        "degraded": degraded,
        "role": repl["role"] if repl else "single",
        "replication": repl,
        "workers": [
            {
                "index": i,
                "up": h is not None,
                "pid": h["pid"] if h else None,
                "connections": h["connections"] if h else 0,
                "rss_bytes": h["rss_bytes"] if h else 0,
                "restarts": restarts.get(i, 0),
                # "ok", or why LMDB commits fail (messages to store are refused meanwhile)
                "storage": h.get("storage", "ok") if h else None,
            }
            for i, h in sorted(workers.items())
        ],
    }


def merge_replication(parts: list[dict | None]) -> dict | None:
    """The node's replication state from its workers' (each worker is one stream)."""
    parts = [p for p in parts if p]
    if not parts:
        return None
    has_peer = any(p["peer"] for p in parts)
    degraded = any(p["degraded"] for p in parts)
    catching_up = any(p["catching_up"] for p in parts)
    peer_up = has_peer and all(p["peer_up"] for p in parts)
    if not has_peer:
        role = "replica-only"
    elif peer_up and not degraded:
        role = "paired"
    elif peer_up:
        role = "catching-up"
    else:
        role = "alone"
    return {
        "peer": next((p["peer"] for p in parts if p["peer"]), None),
        "peer_node": next((p["peer_node"] for p in parts if p["peer_node"]), None),
        "peer_up": peer_up,
        "role": role,
        "degraded": degraded,
        "catching_up": catching_up,
        "lag_records": sum(p["lag_records"] for p in parts),
        "lag_ms": max(p["lag_ms"] for p in parts),
        "apply_lag_records": sum(p["apply_lag_records"] for p in parts),
        "streams": len(parts),
    }
