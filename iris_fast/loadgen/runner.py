"""The parent side of a run: spawn workers, drive the phases, show progress, collect results."""

from __future__ import annotations

import multiprocessing as mp
import queue
import socket
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from iris_fast.loadgen import report
from iris_fast.loadgen import shared as sh
from iris_fast.loadgen.plan import LoadPlan
from iris_fast.loadgen.worker import worker_main
from iris_fast.scrape import fetch_health, fetch_metrics

POLL_S = 0.1
SPAWN_SLACK_S = 30.0  # process start-up and result transfer, on top of the run's hard deadline
CPU_METRIC = "iris_cpu_seconds_total"


class ServerUnreachable(Exception):
    """The target server (or its HTTP endpoint) did not answer; the message says how."""


def probe_server(plan: LoadPlan) -> None:
    """One plain TCP connect to the client port, so a wrong port fails fast and clearly."""
    try:
        with socket.create_connection((plan.host, plan.port), timeout=3.0):
            pass
    except OSError as exc:
        raise ServerUnreachable(
            f"cannot connect to the iris-fast server at {plan.host}:{plan.port}: "
            f"{exc.strerror or exc}"
        ) from None


def _health(plan: LoadPlan) -> dict:
    assert plan.server_http is not None
    try:
        return fetch_health(*plan.server_http)
    except OSError as exc:
        host, port = plan.server_http
        raise ServerUnreachable(f"cannot read http://{host}:{port}/health: {exc}") from None


def _cpu_seconds(plan: LoadPlan) -> float | None:
    """``iris_cpu_seconds_total`` summed over every label set (one per server worker)."""
    assert plan.server_http is not None
    try:
        metrics = fetch_metrics(*plan.server_http)
    except OSError:
        return None
    values = [v for k, v in metrics.items() if k.split("{", 1)[0] == CPU_METRIC]
    return sum(values) if values else None


class Snapshot:
    """Sums of the workers' published counters at one instant."""

    def __init__(self, counters: Any, procs: int) -> None:
        rows = [counters[p * sh.COUNTER_SLOTS : (p + 1) * sh.COUNTER_SLOTS] for p in range(procs)]
        self.phases = [r[sh.PHASE] for r in rows]

        def total(slot: int) -> int:
            return sum(r[slot] for r in rows)

        self.conn_ok = total(sh.CONN_OK)
        self.conn_failed = total(sh.CONN_FAILED)
        self.sent = total(sh.SENT)
        self.acked = total(sh.ACKED)
        self.delivered = total(sh.DELIVERED)
        self.send_failed = total(sh.SEND_FAILED)
        self.errors = total(sh.ERRORS)

    def all_at_least(self, phase: int) -> bool:
        """Whether every worker reached ``phase``."""
        return all(p >= phase for p in self.phases)

    def settled(self) -> bool:
        """Every SEND answered and every ACKed message delivered: grace can end early.

        Only meaningful once all workers are past their send loop (SENT is final then, so
        ``acked + send_failed == sent`` means the acked figures are final too).
        """
        return self.acked + self.send_failed >= self.sent and self.delivered >= self.acked

    def info(self) -> str:
        """One line for the progress bar."""
        return (
            f"ok {self.conn_ok:,} fail {self.conn_failed:,} | sent {self.sent:,} "
            f"acked {self.acked:,} delivered {self.delivered:,} errors {self.errors:,}"
        )


def _new_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
    )


def execute(plan: LoadPlan, err_console: Console) -> dict[str, Any]:
    """Run the load described by ``plan``; return the merged totals.

    Raises ServerUnreachable when the server does not answer before anything started.
    """
    probe_server(plan)
    health_before = _health(plan) if plan.server_http else None
    health_after: dict | None = None
    cpu_before = None

    ctx = mp.get_context("spawn")  # a clean interpreter per worker: no inherited loop or sockets
    counters = ctx.RawArray("q", plan.procs * sh.COUNTER_SLOTS)
    control = ctx.RawArray("q", sh.CONTROL_SLOTS)
    results_q = ctx.Queue()
    workers = [
        ctx.Process(
            target=worker_main,
            args=(plan, p, counters, control, results_q),
            name=f"iris-load-{p}",
            daemon=True,
        )
        for p in range(plan.procs)
    ]
    t0 = time.monotonic()
    hard_deadline = t0 + plan.hard_deadline_s + SPAWN_SLACK_S
    phases: dict[str, float] = {}
    for w in workers:
        w.start()

    def dead_worker() -> bool:
        snap_phases = Snapshot(counters, plan.procs).phases
        return any(
            w.exitcode is not None and snap_phases[i] < sh.PHASE_DONE for i, w in enumerate(workers)
        )

    try:
        with _new_progress(err_console) as progress:
            # Connect phase: until every worker is READY (or failed / the cap passed).
            task = progress.add_task("connect", total=plan.connections, info="")
            connect_deadline = t0 + plan.connect_cap + SPAWN_SLACK_S
            while True:
                snap = Snapshot(counters, plan.procs)
                done = snap.conn_ok + snap.conn_failed
                progress.update(task, completed=done, info=snap.info())
                if snap.all_at_least(sh.PHASE_READY) or dead_worker():
                    break
                if time.monotonic() > connect_deadline:
                    break
                time.sleep(POLL_S)
            phases["connect_wall_seconds"] = time.monotonic() - t0  # includes process spawn

            if Snapshot(counters, plan.procs).conn_ok == 0:
                # Nobody logged in: there is nothing to send or hold; report right away.
                control[sh.CTL_STOP] = 1
                return _collect(plan, workers, results_q, hard_deadline, phases)
            if plan.server_http:
                health_after = _health(plan)
                cpu_before = _cpu_seconds(plan)

            # Send (or hold) phase, on one start time shared through CLOCK_MONOTONIC.
            start_ns = sh.mono_ns() + 20_000_000
            control[sh.CTL_START_NS] = start_ns
            control[sh.CTL_GO] = 1
            end_ns = start_ns + int(plan.duration * 1e9)
            grace_end_ns = end_ns + int(plan.grace * 1e9)
            if plan.idle:
                task = progress.add_task("hold", total=max(1, int(plan.duration)), info="")
            else:
                task = progress.add_task(
                    "send", total=max(1, int(plan.rate * plan.duration)), info=""
                )
            while sh.mono_ns() < end_ns and not dead_worker():
                snap = Snapshot(counters, plan.procs)
                held = (sh.mono_ns() - start_ns) / 1e9
                progress.update(
                    task, completed=int(held) if plan.idle else snap.sent, info=snap.info()
                )
                time.sleep(POLL_S)
            if plan.idle:
                progress.update(task, completed=max(1, int(plan.duration)))
            else:
                # Grace: wait for outstanding ACKs and deliveries, ending early once settled.
                while sh.mono_ns() < grace_end_ns and not dead_worker():
                    snap = Snapshot(counters, plan.procs)
                    progress.update(task, completed=snap.sent, info=snap.info())
                    if snap.all_at_least(sh.PHASE_SENT) and snap.settled():
                        break
                    time.sleep(POLL_S)
    finally:
        control[sh.CTL_STOP] = 1

    totals = _collect(plan, workers, results_q, hard_deadline, phases)
    if plan.server_http:
        report.add_server_figures(
            totals, health_before, health_after, cpu_before, _cpu_seconds(plan)
        )
    return totals


def _collect(
    plan: LoadPlan,
    workers: list,
    results_q: Any,
    hard_deadline: float,
    phases: dict[str, float],
) -> dict[str, Any]:
    """Gather every worker's result (STOP must be set), reap the processes, merge."""
    results: list[dict] = []
    while len(results) < plan.procs and time.monotonic() < hard_deadline:
        try:
            results.append(results_q.get(timeout=0.5))
        except queue.Empty:
            if all(w.exitcode is not None for w in workers) and results_q.empty():
                break
    for w in workers:
        w.join(timeout=max(0.1, min(5.0, hard_deadline - time.monotonic())))
        if w.is_alive():
            w.terminate()
            w.join(timeout=2)
    missing = {r.get("proc") for r in results} ^ set(range(plan.procs))
    for p in sorted(missing):
        results.append({"proc": p, "fatal": f"worker {p} exited without reporting"})

    connects = [r["connect_seconds"] for r in results if "connect_seconds" in r]
    phases["connect_seconds"] = max(connects, default=0.0)
    sends = [r["send_seconds"] for r in results if "send_seconds" in r]
    phases["send_seconds"] = max(sends) if sends and not plan.idle else 0.0
    return report.merge(plan, results, phases)
