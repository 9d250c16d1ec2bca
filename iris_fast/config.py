"""Server settings: one dataclass, filled from the command line (``iris-fast serve``)."""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field

# Connections one source address may hold on a node (--max-conns-per-ip). A module constant
# because the load generator sizes its default spread over source addresses from it.
DEFAULT_MAX_CONNS_PER_IP = 20_000


@dataclass(slots=True)
class ServerConfig:
    """Every knob of one iris-fast node, with the embedded defaults."""

    host: str = "127.0.0.1"
    port: int = 8085
    http_host: str = "127.0.0.1"
    http_port: int = 9085
    data_dir: str = "./iris-data"
    node_id: str = field(default_factory=socket.gethostname)
    # Login tokens (docs/security.md): HS256 secrets and/or RS256/ES256 public key PEM files,
    # each optionally "KID=..."; several at once for key rotation. None of either: open login.
    auth_secret: str | list[str] | None = None
    auth_public_key: list[str] | None = None
    auth_issuer: str | None = None
    auth_audience: str | None = None
    # Clock skew allowed on a token's nbf / iat (exp is strict).
    auth_leeway_s: float = 30.0
    # LOGIN token buckets per source address, per worker (iris_fast.server.ratelimit; 0: off):
    # every attempt (high: many valid logins from one NAT are fine), and failed ones.
    login_rate: float = 10_000.0
    login_burst: int = 20_000
    login_fail_rate: float = 20.0
    login_fail_burst: int = 40
    insecure: bool = False
    max_frame: int = 65536
    max_inflight: int = 256
    max_inflight_bytes: int = 1 << 20
    # A live delivery not acknowledged by the device within this bound is stored (and
    # replicated) and its sender ACKed STORED: the sender never waits on the recipient's app.
    live_ack_timeout_s: float = 0.05
    mailbox_limit: int = 10_000
    max_errors: int = 16
    login_timeout: float = 10.0
    # SEND rate limits (token buckets; 0 turns a rate off), per user and per connection.
    rate_msgs: float = 2_000.0
    rate_msgs_burst: int = 20_000
    rate_bytes: float = 16 << 20
    rate_bytes_burst: int = 64 << 20
    conn_rate_msgs: float = 1_000.0
    conn_rate_msgs_burst: int = 10_000
    conn_rate_bytes: float = 8 << 20
    conn_rate_bytes_burst: int = 32 << 20
    # Resource bounds (docs/security.md has the list with what each one does when it fires).
    max_conns_per_ip: int = DEFAULT_MAX_CONNS_PER_IP
    mailbox_max_bytes: int = 64 << 20
    max_pending_writes: int = 256 << 20
    # Issue 10 (docs/architecture.md): bytes of SENDs forwarded to one other worker and not yet
    # answered before the senders of more are paused; stored mail per (recipient, sender); idle
    # mailboxes kept in memory per worker; age at which stored mail expires (0: never).
    link_max_bytes: int = 16 << 20
    mailbox_per_sender_limit: int = 5_000
    mailbox_per_sender_max_bytes: int = 32 << 20
    mailbox_cache: int = 50_000
    message_ttl_s: float = 30 * 86400.0
    # A device id not seen for this long is forgotten (no longer pins its user's stored mail);
    # negative: the message TTL; 0: never.
    device_ttl_s: float = -1.0
    # Bytes one client may leave unread before it is cut (raised to fit a delivery window).
    max_conn_pending_writes: int = 8 << 20
    # Kernel send buffer per client socket (0: the kernel's autotuning, up to tcp_wmem's max).
    socket_sndbuf: int = 0
    hibernate_after: float = 15.0
    # TCP keepalive idle time; a dead peer is detected after keepalive_s * 1.5 (0: off).
    keepalive_s: float = 60.0
    dedup_entries: int = 1_000_000
    dedup_age_s: float = 3600.0
    lmdb_map_size: int = 8 << 30
    shutdown_grace: float = 5.0
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    # TLS on the client listener (PEM files); both or neither.
    tls_cert: str | None = None
    tls_key: str | None = None
    # Pair replication (docs/replication.md): where this node listens for its peer, and where
    # the peer listens. No --peer: a single node; no --repl-port: nothing can replicate to us.
    repl_host: str = "127.0.0.1"
    repl_port: int = 0
    peer: str | None = None
    # The only node id accepted as the peer (None: the first one this data directory paired
    # with, remembered in its LMDB).
    peer_node_id: str | None = None
    heartbeat_s: float = 0.5
    # Silence after which the peer counts as down (heartbeats come every heartbeat_s).
    peer_timeout_s: float = 1.5
    # Set by the supervisor for each worker process.
    worker_index: int = 0

    def check(self) -> None:
        """Refuse settings that would be unsafe or meaningless; raises ValueError."""
        from iris_fast.server.auth import Authenticator

        auth = Authenticator.from_config(self)  # loads the keys: a clear error now, not per worker
        if auth is None and not self.insecure and not _is_loopback(self.host):
            raise ValueError(
                f"refusing to serve {self.host} without --auth-secret or --auth-public-key: "
                "anyone could log in as anyone; bind a loopback address, give a key, or pass "
                "--insecure"
            )
        for rate, burst in (("login_rate", "login_burst"), ("login_fail_rate", "login_fail_burst")):
            if getattr(self, rate) > 0 and getattr(self, burst) < 1:
                raise ValueError(f"--{burst.replace('_', '-')} must be at least 1")
        if self.port == self.http_port and self.port != 0:
            raise ValueError(f"--port and --http-port must differ (both are {self.port})")
        if not 16 <= self.max_frame <= 16 * 1024 * 1024:
            raise ValueError("--max-frame must be between 16 bytes and 16 MiB")
        if not 1 <= self.workers <= 256:
            raise ValueError("--workers must be between 1 and 256")
        for name in ("max_inflight", "mailbox_limit", "max_errors", "link_max_bytes",
                     "mailbox_cache"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("mailbox_per_sender_limit", "mailbox_per_sender_max_bytes", "message_ttl_s"):
            if getattr(self, name) < 0:
                flag = name.removesuffix("_s").replace("_", "-")
                raise ValueError(f"--{flag} must not be negative (0 turns it off)")
        if not 0 < self.live_ack_timeout_s <= 60:
            raise ValueError("--live-ack-timeout must be above 0 and at most 60 seconds")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_cert:
            from iris_fast.server.tls import server_context

            server_context(self.tls_cert, self.tls_key)  # a clear error now, not per worker
        if self.peer is not None:
            from iris_fast.replication.replicator import parse_peer

            parse_peer(self.peer)
            if not self.repl_port:
                raise ValueError("--peer needs --repl-port: the peer replicates to us too")
        if self.repl_port and self.repl_port in (self.port, self.http_port):
            raise ValueError("--repl-port must differ from --port and --http-port")
        if not 0 < self.heartbeat_s < self.peer_timeout_s:
            raise ValueError("--heartbeat must be positive and below --peer-timeout")
        os.makedirs(self.data_dir, exist_ok=True)


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
