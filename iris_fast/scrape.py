"""Read a node's ``/health`` and ``/metrics`` (used by tests, benchmarks and operator tools)."""

from __future__ import annotations

import json
import time
import urllib.request


def fetch_health(host: str, port: int, timeout: float = 2.0) -> dict:
    """``GET /health`` as a dict."""
    with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=timeout) as r:
        return json.loads(r.read())


def fetch_metrics(host: str, port: int, timeout: float = 2.0) -> dict[str, float]:
    """``GET /metrics`` as {sample name with its labels, e.g. ``a_total{reason="x"}``: value}."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as r:
        return parse_metrics(r.read().decode())


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition format into {sample: value} (comments skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def wait_healthy(
    host: str, port: int, timeout: float = 30.0, accept: tuple[str, ...] = ("ok",)
) -> bool:
    """Poll ``/health`` until the node's status is in ``accept`` (``ok``: all workers up and
    linked, and paired if it has a peer; add ``degraded`` to accept a node whose peer is down).
    False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if fetch_health(host, port)["status"] in accept:
                return True
        except OSError:
            pass
        time.sleep(0.05)
    return False
