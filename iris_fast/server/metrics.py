"""Prometheus metrics of one node (prometheus-client), rendered for ``GET /metrics``."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from iris_fast.connection import io_stats

if TYPE_CHECKING:
    from iris_fast.server.worker import Worker


class NodeMetrics:
    """The registry of one node: storage metrics observed directly, the rest collected."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.lmdb_batch = Histogram(
            "iris_lmdb_batch_size",
            "Storage operations per LMDB transaction (one fsync each): the group-commit factor",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000),
            registry=self.registry,
        )
        self.lmdb_commit_seconds = Histogram(
            "iris_lmdb_commit_seconds",
            "Time to apply and fsync one LMDB transaction",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.fsyncs = Counter(
            "iris_lmdb_fsyncs", "LMDB transactions committed with fsync", registry=self.registry
        )
        # RSS once the worker is up with no clients: the base of bytes-per-connection.
        self.rss_baseline = 0
        self.delivered_per_s = 0.0
        self._last_delivered = 0
        self._last_tick = time.monotonic()
        self._worker: Worker | None = None

    def on_commit(self, ops: int, seconds: float) -> None:
        """Called by the storage writer thread after each commit."""
        if ops:
            self.lmdb_batch.observe(ops)
            self.fsyncs.inc()
            self.lmdb_commit_seconds.observe(seconds)

    def attach(self, worker: Worker, started: float) -> None:
        self._worker = worker
        self.registry.register(_WorkerCollector(worker, started, self))

    def tick(self) -> None:
        """Once a second: refresh the messages/s gauge (exponentially smoothed over ~5 s)."""
        if self._worker is None:
            return
        now = time.monotonic()
        delivered = self._worker.stats.delivered
        rate = (delivered - self._last_delivered) / max(now - self._last_tick, 1e-3)
        self.delivered_per_s += (rate - self.delivered_per_s) * 0.2
        self._last_delivered, self._last_tick = delivered, now

    def render(self) -> bytes:
        return generate_latest(self.registry)


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class _WorkerCollector:
    def __init__(self, worker: Worker, started: float, node: NodeMetrics) -> None:
        self.worker = worker
        self.started = started
        self.node = node

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        w = self.worker
        s = w.stats
        counters = {
            "iris_connections_opened": ("Client connections accepted", s.connections_opened),
            "iris_logins": ("Successful logins", s.logins),
            "iris_auth_failures": ("Logins refused by token checks", s.auth_failures),
            "iris_login_rate_limited": (
                "LOGINs refused by the per-source rate limit",
                s.login_rate_limited,
            ),
            "iris_messages_received": ("SEND frames accepted for processing", s.received),
            "iris_deliveries_sent": (
                "DELIVER frames written (incl. redeliveries)",
                s.deliveries_sent,
            ),
            "iris_messages_delivered": ("Deliveries acknowledged by the device", s.delivered),
            "iris_messages_stored": ("Messages made durable in a mailbox", s.stored),
            "iris_messages_deduplicated": ("Resends absorbed by the dedup window", s.deduplicated),
            "iris_messages_refused": ("Messages refused (mailbox full, bad recipient)", s.refused),
            "iris_login_timeouts": ("Connections closed for not logging in", s.login_timeouts),
            "iris_handoffs_in": ("Connections adopted from another worker", s.handoffs_in),
            "iris_handoffs_out": ("Connections handed to their home worker", s.handoffs_out),
            "iris_handoff_failures": (
                "Hand-offs that failed (home busy or restarting)",
                s.handoff_failures,
            ),
            "iris_handoff_retries": (
                "Hand-offs retried (home busy or restarting)",
                s.handoff_retries,
            ),
            "iris_local_peer_refused": (
                "Local processes refused on the hand-off and worker-link sockets (not a sibling)",
                s.local_peer_refused,
            ),
            "iris_tls_relays": ("TLS sessions relayed to their home worker", s.tls_relays),
            "iris_rate_limited_user": ("SENDs refused by a user's rate limit", s.rate_limited_user),
            "iris_rate_limited_connection": (
                "SENDs refused by a connection's rate limit",
                s.rate_limited_connection,
            ),
            "iris_conn_limit_rejected": (
                "Connections refused: too many from their address",
                s.conn_limit_rejected,
            ),
            "iris_mailbox_full": ("SENDs refused: the mailbox's message bound", s.mailbox_full),
            "iris_mailbox_bytes_full": (
                "SENDs refused: the mailbox's byte bound",
                s.mailbox_bytes_full,
            ),
            "iris_delivery_window_full": (
                "Messages stored because the recipient's window of "
                "unacknowledged deliveries was full",
                s.window_full,
            ),
            "iris_live_ack_timeouts": (
                "Live deliveries stored because their DELIVER_ACK did not come within "
                "--live-ack-timeout",
                s.live_ack_timeouts,
            ),
            "iris_write_backpressure": (
                "Times a worker paused reading: too many bytes waited for slow clients",
                s.write_backpressure,
            ),
            "iris_routed_in": ("Messages received from other workers", s.routed_in),
            "iris_routed_out": ("Messages forwarded to other workers", s.routed_out),
            "iris_link_backpressure": (
                "Times senders were paused: too many bytes forwarded to a worker were unanswered",
                s.link_backpressure,
            ),
            "iris_mailbox_sender_full": (
                "SENDs refused: the sender's share of the recipient's mailbox",
                s.mailbox_sender_full,
            ),
            "iris_mailboxes_evicted": (
                "Idle mailboxes dropped from memory (rebuilt from storage when needed)",
                s.mailboxes_evicted,
            ),
            "iris_messages_expired": (
                "Stored messages deleted undelivered at their TTL (--message-ttl)",
                s.expired,
            ),
            "iris_devices_forgotten": (
                "Device ids forgotten after --device-ttl unseen (they no longer keep stored mail)",
                s.devices_forgotten,
            ),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)
        rejected = CounterMetricFamily(
            "iris_frames_rejected", "Frames or connections rejected, by reason", labels=["reason"]
        )
        for reason, value in sorted(s.rejected_by_reason.items()):
            rejected.add_metric([reason], value)
        yield rejected
        writes, frames, bytes_out, bytes_in, hibernations = io_stats()
        yield CounterMetricFamily("iris_socket_writes", "transport.write calls", value=writes)
        yield CounterMetricFamily("iris_frames_out", "Frames written to clients", value=frames)
        yield CounterMetricFamily("iris_bytes_out", "Bytes written to clients", value=bytes_out)
        yield CounterMetricFamily("iris_bytes_in", "Bytes read from clients", value=bytes_in)
        yield CounterMetricFamily(
            "iris_hibernations", "Idle connections that released their buffers", value=hibernations
        )
        yield GaugeMetricFamily(
            "iris_write_batch_avg",
            "Average frames per socket write (network batching efficiency)",
            value=frames / writes if writes else 0.0,
        )
        yield GaugeMetricFamily(
            "iris_connections", "Open client connections", value=len(w.connections)
        )
        yield GaugeMetricFamily("iris_sessions", "Logged-in sessions", value=w.session_count())
        inflight = sum(len(c.inflight) for c in w.connections if c.user and c.inflight)
        yield GaugeMetricFamily(
            "iris_inflight_deliveries", "Deliveries awaiting DELIVER_ACK", value=inflight
        )
        yield GaugeMetricFamily(
            "iris_dedup_entries", "Entries in the dedup window", value=len(w.dedup)
        )
        yield from _dedup_metrics(w)
        yield GaugeMetricFamily(
            "iris_storage_queue", "Storage operations waiting for the writer", value=w.store.queued
        )
        yield GaugeMetricFamily(
            "iris_mailboxes", "Mailboxes held in memory", value=len(w.mailboxes)
        )
        yield GaugeMetricFamily(
            "iris_routed_bytes",
            "Bytes of SENDs forwarded to other workers and not yet answered",
            value=sum(w.routed_bytes.values()),
        )
        yield GaugeMetricFamily(
            "iris_link_queued_bytes",
            "Bytes written to worker links that the kernel has not taken yet",
            value=w.link_queued_bytes(),
        )
        yield GaugeMetricFamily(
            "iris_pending_write_bytes",
            "Bytes queued for clients over their transport's high-water mark, at their last flush",
            value=w.pending_write_bytes(),
        )
        yield GaugeMetricFamily(
            "iris_storage_unavailable",
            "1 while LMDB commits fail (disk full): messages to store are refused",
            value=1 if w.store.unavailable is not None else 0,
        )
        yield CounterMetricFamily(
            "iris_storage_commit_failures", "LMDB commits that failed and were retried",
            value=w.store.commit_failures,
        )  # fmt: skip
        yield CounterMetricFamily(
            "iris_lmdb_stale_readers_cleared", "Reader slots of dead processes cleared",
            value=w.store.stale_readers_cleared,
        )  # fmt: skip
        rss = rss_bytes()
        yield GaugeMetricFamily("iris_rss_bytes", "Resident memory of the process", value=rss)
        yield GaugeMetricFamily(
            "iris_rss_baseline_bytes",
            "RSS when the worker was up with no clients",
            value=self.node.rss_baseline,
        )
        conns = len(w.connections)
        yield GaugeMetricFamily(
            "iris_memory_per_connection_bytes",
            "RSS growth since start divided by open connections",
            value=max(rss - self.node.rss_baseline, 0) / conns if conns else 0.0,
        )
        yield GaugeMetricFamily(
            "iris_messages_delivered_per_second",
            "Deliveries acknowledged per second (smoothed over ~5 s)",
            value=self.node.delivered_per_s,
        )
        yield from _replication_metrics(w)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        yield CounterMetricFamily(
            "iris_cpu_seconds",
            "CPU time of the process (user+system)",
            value=ru.ru_utime + ru.ru_stime,
        )
        yield GaugeMetricFamily(
            "iris_uptime_seconds", "Seconds since start", value=time.time() - self.started
        )


def _dedup_metrics(w: Worker) -> Iterator[Metric]:
    d = w.dedup
    oldest = d.oldest_ts_ms
    yield GaugeMetricFamily(
        "iris_dedup_age_seconds",
        "Age of the oldest completed entry the dedup window still holds (its real span)",
        value=max(time.time() - oldest / 1000, 0.0) if oldest is not None else 0.0,
    )
    yield CounterMetricFamily(
        "iris_dedup_evictions",
        "Dedup entries evicted by the entry budget before their full age",
        value=d.capacity_evictions,
    )
    yield GaugeMetricFamily(
        "iris_dedup_pending", "Dedup entries in flight (never evicted)", value=d.pending
    )
    yield GaugeMetricFamily(
        "iris_dedup_senders", "Senders holding entries in the dedup window", value=d.senders
    )
    yield GaugeMetricFamily(
        "iris_dedup_bytes", "Heap bytes of the dedup window", value=d.memory_bytes
    )


def _replication_metrics(w: Worker) -> Iterator[Metric]:
    repl = w.repl
    if repl is None:
        return
    o = repl.origin
    r = repl.replica
    gauges = {
        "iris_repl_peer_up": ("1 if the peer takes this node's records (per node: all streams)",
                              int(o is not None and o.link is not None)),
        "iris_repl_degraded": ("1 if ACKs do not wait for the peer (it is down or catching up)",
                               int(repl.degraded)),
        "iris_repl_lag_records": ("Records committed here that the peer has not acknowledged",
                                  o.lag_records() if o else 0),
        "iris_repl_lag_ms": ("Age of the oldest record the peer has not acknowledged",
                             o.lag_ms() if o else 0.0),
        "iris_repl_catchup_remaining_records": (
            "Records left to send to a returning peer",
            max(o.catchup_target - o.acked, 0) if o and o.catching_up else 0),
        "iris_repl_apply_lag_records": ("Records of the peer's log not applied here yet",
                                        r.lag_records()),
    }  # fmt: skip
    for name, (doc, value) in gauges.items():
        yield GaugeMetricFamily(name, doc, value=value)
    counters = {
        "iris_repl_records_sent": ("Records sent to the peer", o.records_sent if o else 0),
        "iris_repl_appends_sent": ("REPL_APPEND frames sent", o.appends_sent if o else 0),
        "iris_repl_records_applied": ("Records of the peer applied here", r.records_applied),
        "iris_repl_appends_applied": ("REPL_APPEND batches applied (one fsync each)",
                                      r.appends_applied),
        "iris_repl_catchup_records": ("Records a returning peer caught up on",
                                      o.catchup_records if o else 0),
        "iris_repl_failovers": ("Times the peer was lost and this node went on alone",
                                o.peer_losses if o else 0),
        "iris_repl_degraded_acks": ("Client ACKs given with one copy (ACK_DEGRADED)",
                                    o.degraded_acks if o else 0),
        "iris_repl_split_brains": ("Partitions detected on heal: both nodes took writes apart",
                                   r.split_brains),
        "iris_repl_links_refused": ("Replication links refused (version, id, workers, no HELLO)",
                                    repl.refused),
        "iris_repl_duplicates_skipped": ("Replicated messages this node already had",
                                         w.stats.repl_duplicates),
        "iris_repl_full_copies_sent": ("Full copies of this node's stream sent to the peer "
                                       "(its LSN claim could not be trusted)",
                                       o.full_copies if o else 0),
        "iris_repl_full_copies_applied": ("Full copies of the peer's stream applied here",
                                          r.full_copies),
        "iris_repl_bad_acks": ("Peer ACKs beyond what was sent (link closed)",
                               o.bad_acks if o else 0),
    }  # fmt: skip
    for name, (doc, value) in counters.items():
        yield CounterMetricFamily(name, doc, value=value)
