"""The message engine of one worker process: sessions, routing, delivery windows, mailboxes.

One ``Worker`` runs on one event loop (one worker process). Connections
(``iris_fast.connection.Connection``) call its ``on_*`` methods with decoded frames; it answers
through ``Connection.send``. Every user has a home worker (``links.home_of``) that holds its
sessions and mailbox state; messages for users homed elsewhere are forwarded over a worker link.

Delivery model (docs/architecture.md has the reasoning):

* Every message accepted by the recipient's home gets a ``seq`` from that worker's counter.
  A recipient that is online, has room in its delivery window and has nothing older waiting in
  storage gets it *live*: nothing is written, and the sender's ACK waits for the recipient's
  ``DELIVER_ACK``.
* Otherwise the message is *stored*: one LMDB put in the next group commit; the sender's ACK
  (flag ``STORED``) follows the fsync. A session pulls stored messages in ``seq`` order as its
  window frees, so live and stored messages of one sender never overtake each other.
* Live deliveries not yet acknowledged when their connection goes away are stored under their
  original ``seq`` (so they keep their place in line), then ACKed to the sender.
"""

from __future__ import annotations

import logging
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import iris_native as N
from iris_native import DEDUP_DONE, DedupWindow, dedup_key

from iris_fast import protocol as P
from iris_fast.config import ServerConfig
from iris_fast.connection import Connection, monotonic
from iris_fast.server.auth import Authenticator, AuthError
from iris_fast.server.links import Handoff, HandoffError, Links, home_of
from iris_fast.server.ratelimit import LoginLimiter, SendBucket, SendLimits, source_of
from iris_fast.server.stats import WorkerStats
from iris_fast.server.tls import TlsRelay, is_tls

if TYPE_CHECKING:
    import asyncio

    from iris_fast.replication.replicator import Replicator
    from iris_fast.storage.mailbox import MailboxStore
    from iris_fast.storage.mailbox import Record as ReplRecord

log = logging.getLogger(__name__)

# A message on its way to a device: (seq, sender, msg_id, ts_ms, body, stored).
Record = tuple[int, str, str, int, bytes, bool]

# Pause reading from senders while this many storage operations wait for the writer: intake
# must not outrun the disk without bound.
STORE_HIGH_WATER = 50_000
STORE_LOW_WATER = 10_000
# How long a login waits for its home worker to take the socket (queue full, or restarting).
HANDOFF_RETRY_S = 10.0


class Mailbox:
    """What the worker must know of one user's durable mailbox without reading LMDB."""

    __slots__ = ("count", "bytes", "last_seq", "uncommitted", "deleting", "acks")

    def __init__(self, count: int, last_seq: int, nbytes: int = 0) -> None:
        self.count = count  # stored (committed or queued) and not yet deleted
        self.bytes = nbytes  # their body bytes
        self.last_seq = last_seq  # highest seq ever queued for storage
        self.uncommitted: set[int] | None = None  # seqs queued, not yet durable
        self.deleting: set[int] | None = None  # seqs acknowledged, delete not yet durable
        # With several devices online: seq -> the sessions that acknowledged it so far.
        self.acks: dict[int, set[Connection]] | None = None

    def add_queued(self, seq: int, nbytes: int) -> None:
        """Account for a message queued for storage here (its put not yet durable)."""
        self.count += 1
        self.bytes += nbytes
        if seq > self.last_seq:
            self.last_seq = seq
        if self.uncommitted is None:
            self.uncommitted = set()
        self.uncommitted.add(seq)

    def idle(self) -> bool:
        return self.count == 0 and not self.uncommitted and not self.deleting and not self.acks


class Worker:
    """Sessions, routing and delivery for one event loop."""

    def __init__(
        self,
        config: ServerConfig,
        store: MailboxStore,
        loop: asyncio.AbstractEventLoop,
        stats: WorkerStats | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.loop = loop
        self.stats = stats or WorkerStats()
        self.node_id = config.node_id
        self.index = config.worker_index
        self.workers = config.workers
        # Set by the process entry point once the sockets exist (None with a single worker).
        self.links: Links | None = None
        self.handoff: Handoff | None = None
        # Set when the node has a peer (docs/replication.md).
        self.repl: Replicator | None = None
        # Messages forwarded to another worker and not yet answered, per worker, in send order:
        # replayed when that worker comes back after a crash.
        self.routed: dict[int, dict[tuple[str, str], tuple]] = {}
        # The (first) session of every online user homed here...
        self.sessions: dict[str, Connection] = {}
        # ...and all sessions of users logged in on more than one device.
        self.devices: dict[str, list[Connection]] = {}
        self.connections: set[Connection] = set()
        # TLS sessions relayed to their home worker (iris_fast.server.tls).
        self.relays: set[TlsRelay] = set()
        self.unauthenticated: set[Connection] = set()
        self.mailboxes: dict[str, Mailbox] = {}
        self.dedup = DedupWindow(config.dedup_entries, int(config.dedup_age_s * 1000))
        self.draining = False
        self._dirty: list[Connection] = []
        self._flush_pending = False
        self._to_pump: set[str] = set()
        self._pump_pending = False
        self._paused_senders: set[Connection] = set()
        self._max_inflight = config.max_inflight
        self._max_inflight_bytes = config.max_inflight_bytes
        self._mailbox_limit = config.mailbox_limit
        self._keepalive = int(config.keepalive_s)
        # Keys loaded once per worker (None: open login); LOGIN buckets per source address.
        self.auth = Authenticator.from_config(config)
        self.login_limiter = LoginLimiter.from_config(config)
        # SEND token buckets: per user (all its devices) and per connection.
        c = config
        self.user_limits = SendLimits(
            c.rate_msgs, c.rate_msgs_burst, c.rate_bytes, c.rate_bytes_burst
        )
        self.conn_limits = SendLimits(
            c.conn_rate_msgs, c.conn_rate_msgs_burst, c.conn_rate_bytes, c.conn_rate_bytes_burst
        )
        self.user_buckets: dict[str, SendBucket] = {}
        # Connections per source address on this worker, bounded by the node's limit split
        # evenly over the workers (SO_REUSEPORT spreads one address's connections evenly).
        self.per_source: dict[str, int] = {}
        self._max_per_source = -(-config.max_conns_per_ip // config.workers)
        self._mailbox_max_bytes = config.mailbox_max_bytes
        # Bytes queued for clients that read too slowly, and whether reading is paused for it.
        self._max_pending_writes = config.max_pending_writes
        self._write_paused: set[Connection] = set()
        self.reads_paused = False
        loaded = store.load_dedup(int(config.dedup_age_s * 1000))
        for key, ts in loaded:
            self.dedup.insert_key(key, DEDUP_DONE, ts)
        if loaded:
            log.info("reloaded %d dedup entries from storage", len(loaded))

    # ---- connection lifecycle -------------------------------------------------------------------

    def on_open(self, conn: Connection) -> None:
        if self.draining:
            conn.send((P.ERROR, P.E_SHUTTING_DOWN, "", "node is shutting down"))
            conn.close()
            return
        self.connections.add(conn)
        self.stats.connections_opened += 1
        adopted = conn.pending_login
        if self.reads_paused:
            conn.pause_reading()
        source = source_of(conn.transport)
        if source != "local":  # a Unix socket (a relayed TLS session) has no address to count
            source = sys.intern(source)
            n = self.per_source.get(source, 0)
            if n >= self._max_per_source and adopted is None:
                self.stats.conn_limit_rejected += 1
                self.connections.discard(conn)
                conn.send((P.ERROR, P.E_TOO_MANY_CONNECTIONS, "",
                           f"too many connections from {source} (limit "
                           f"{self.config.max_conns_per_ip} per node)"))  # fmt: skip
                conn.close()
                return
            self.per_source[source] = n + 1
            conn.source = source
        if adopted is not None:
            # A socket handed over by another worker, whose user already passed LOGIN there.
            conn.pending_login = None
            user, preamble = adopted
            self.stats.handoffs_in += 1
            self._login_local(conn, user)
            if preamble:
                conn.data_received(preamble)
            return
        self.unauthenticated.add(conn)
        if self.config.socket_sndbuf:
            sock = conn.transport.get_extra_info("socket")
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.config.socket_sndbuf)
            except (OSError, AttributeError):
                pass
        if self._keepalive:
            # A peer that vanished without a FIN (power loss, NAT drop) would otherwise keep its
            # session, its delivery window and, with several devices, pending deletions forever.
            # The options travel with the socket when it is handed to the home worker.
            sock = conn.transport.get_extra_info("socket")
            idle = self._keepalive
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(idle // 6, 1))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
            except (OSError, AttributeError):
                pass

    def on_close(self, conn: Connection) -> None:
        source = conn.source
        if source is not None:
            conn.source = None
            n = self.per_source.get(source, 1) - 1
            if n > 0:
                self.per_source[source] = n
            else:
                self.per_source.pop(source, None)
        if conn in self._write_paused:
            self._write_paused.discard(conn)
            self._check_write_pressure()
        self.connections.discard(conn)
        self.unauthenticated.discard(conn)
        self._paused_senders.discard(conn)
        if conn.pending_input():
            self.stats.rejected("truncated")
        self._detach(conn)

    def on_write_paused(self, conn: Connection) -> None:
        """A client stopped reading fast enough: its transport's buffer passed the high mark."""
        self._write_paused.add(conn)
        self._check_write_pressure()

    def _check_write_pressure(self) -> None:
        # Only connections over the transport's high-water mark can hold much; summing them is
        # cheap because there are few. Over the bound, the worker stops reading from every
        # client (no new work) until the slow readers drained half of it.
        pending = sum(
            c.transport.get_write_buffer_size() for c in self._write_paused if c.transport
        )
        if not self.reads_paused and pending > self._max_pending_writes:
            self.reads_paused = True
            self.stats.write_backpressure += 1
            log.warning("%d bytes wait for slow clients (limit %d); pausing reads",
                        pending, self._max_pending_writes)  # fmt: skip
            for c in self.connections:
                c.pause_reading()
        elif self.reads_paused and pending <= self._max_pending_writes // 2:
            self.reads_paused = False
            log.info("pending writes down to %d bytes; reading again", pending)
            for c in self.connections:
                if c not in self._paused_senders:
                    c.resume_reading()

    def on_writable(self, conn: Connection) -> None:
        if conn in self._write_paused:
            self._write_paused.discard(conn)
            if self.reads_paused:
                self._check_write_pressure()
        if conn.user is not None and not conn.detached:
            self._pump(conn)

    def _detach(self, conn: Connection) -> None:
        """Take a session out of routing; store its unacknowledged live deliveries."""
        if conn.detached or conn.user is None:
            conn.detached = True
            return
        conn.detached = True
        user = conn.user
        devices = self.devices.get(user)
        if devices is not None:
            devices.remove(conn)
            if self.sessions.get(user) is conn:
                self.sessions[user] = devices[0]
            if len(devices) == 1:
                del self.devices[user]
            self._forget_device_acks(user, conn, devices)
        elif self.sessions.get(user) is conn:
            del self.sessions[user]
        inflight = conn.inflight
        conn.inflight = None
        if inflight:
            mb = self._mailbox(user)
            for _tag, rec in inflight:
                if not rec[5]:
                    seq, sender, msg_id, ts, body, _ = rec
                    self._store(user, mb, seq, sender, msg_id, ts, body)
        mb = self.mailboxes.get(user)
        if mb is not None and mb.idle():
            del self.mailboxes[user]

    # ---- frames in -------------------------------------------------------------------------------

    def on_login(self, conn: Connection, version: int, user: str, token: str) -> None:
        if conn.user is not None:
            self.reject(conn, P.E_ALREADY_LOGGED_IN, f"already logged in as {conn.user!r}")
            return
        source = None
        if self.login_limiter is not None:
            source = source_of(conn.transport)
            wait = self.login_limiter.allow(source)
            if wait:
                self.stats.login_rate_limited += 1
                self.fatal(
                    conn,
                    P.E_RATE_LIMITED,
                    f"too many login attempts from {source}; retry in {wait:.1f} s",
                )
                return
        if version != P.PROTOCOL_VERSION:
            self._login_failed(
                conn,
                source,
                P.E_UNSUPPORTED_VERSION,
                f"protocol version {version} not supported; this server speaks "
                f"{P.PROTOCOL_VERSION}",
            )
            return
        if not P.valid_user_id(user):
            self._login_failed(
                conn, source, P.E_AUTH_FAILED, "user id must be 1..255 bytes without NUL"
            )
            return
        if self.auth is not None:
            try:
                self.auth.verify(token, user)
            except AuthError as exc:
                self.stats.auth_failures += 1
                self._login_failed(conn, source, P.E_AUTH_FAILED, str(exc))
                return
        if home_of(user, self.workers) != self.index:
            # Not this user's home: stop reading now (what is already read travels along) and
            # let the connection call finish_handoff with the frames that followed LOGIN.
            conn.pause_reading()
            conn.handoff_pending = True
            self.unauthenticated.discard(conn)
            return
        self._login_local(conn, user)

    def _login_failed(self, conn: Connection, source: str | None, code: int, reason: str) -> None:
        """A refused LOGIN: charge its source's failure bucket, answer, close."""
        if source is not None:
            self.login_limiter.failed(source)
        self.fatal(conn, code, reason)

    def finish_handoff(self, conn: Connection, user: str, rest: list[tuple]) -> None:
        """Called by the connection with the frames that followed LOGIN in the same read."""
        home = home_of(user, self.workers)
        preamble = b"".join((N.encode_batch(rest, 1 << 30) if rest else b"", conn.take_pending()))
        self._try_handoff(conn, home, user, preamble, time.monotonic() + HANDOFF_RETRY_S, 0.001)

    def _try_handoff(
        self, conn: Connection, home: int, user: str, preamble: bytes, deadline: float, delay: float
    ) -> None:
        if conn.transport is None:  # the client left while we waited
            return
        assert self.handoff is not None
        try:
            if is_tls(conn.transport):
                self._relay_tls(conn, home, user, preamble)
            else:
                self.handoff.send(home, conn.fileno(), user, preamble)
                conn.abandon()
        except HandoffError as exc:
            # The home's queue is full (a login burst) or it is restarting: both pass quickly.
            if time.monotonic() < deadline:
                self.stats.handoff_retries += 1
                self.loop.call_later(
                    delay, self._try_handoff, conn, home, user, preamble, deadline,
                    min(delay * 2, 0.05),
                )  # fmt: skip
                return
            self.stats.handoff_failures += 1
            log.warning("hand-off of %r to worker %d failed: %s", user, home, exc)
            conn.handoff_pending = False
            self.fatal(
                conn, P.E_SHUTTING_DOWN, "the worker for this user is busy or restarting; retry"
            )
            return
        self.stats.handoffs_out += 1

    def _relay_tls(self, conn: Connection, home: int, user: str, preamble: bytes) -> None:
        """A TLS session cannot move to another process: keep it here and relay its bytes to
        the home worker through a Unix socket pair (see iris_fast.server.tls)."""
        assert self.handoff is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.handoff.send(home, theirs.fileno(), user, preamble)
        except HandoffError:
            ours.close()
            raise
        finally:
            theirs.close()  # on success the home worker holds its own copy now
        self.stats.tls_relays += 1
        # The connection object is done here: the relay owns the TLS transport from now on.
        self.connections.discard(conn)
        self.unauthenticated.discard(conn)
        conn.detached = True
        relay = TlsRelay(conn.transport, self.relays.discard)
        self.relays.add(relay)
        ours.setblocking(False)
        self.loop.create_task(relay.start(ours))

    def adopt(self, sock: socket.socket, user: str, preamble: bytes) -> None:
        """Take over a client socket another worker logged in (see links.Handoff)."""
        if user.startswith("\0"):
            # Not a client: a replication link for this worker's stream.
            if self.repl is not None:
                self.repl.adopt(sock, preamble)
            else:
                sock.close()
            return
        max_frame = self.config.max_frame

        def factory() -> Connection:
            conn = Connection(self, max_frame)
            conn.pending_login = (user, preamble)
            return conn

        async def attach() -> None:
            try:
                await self.loop.connect_accepted_socket(factory, sock)
            except Exception as exc:
                log.warning("adopting a connection of %r failed: %s", user, exc)
                sock.close()

        self.loop.create_task(attach())

    def _login_local(self, conn: Connection, user: str) -> None:
        self.unauthenticated.discard(conn)
        conn.user = user
        conn.cursor = 0
        first = self.sessions.get(user)
        if first is None:
            self.sessions[user] = conn
        else:
            # Another device of the same user: from now on every message for the user goes
            # through the mailbox, and each device reads it with its own cursor.
            devices = self.devices.get(user)
            if devices is None:
                devices = self.devices[user] = [first]
                self._store_live_inflight(first)
            devices.append(conn)
        self.stats.logins += 1
        conn.send(
            (
                P.LOGIN_OK,
                P.PROTOCOL_VERSION,
                1 if self.repl is not None and self.repl.degraded else 0,
                self.node_id,
                self.config.max_frame,
            )
        )
        self._pump(conn)

    def on_send(self, conn: Connection, msg_id: str, to: str, body: bytes) -> None:
        self.stats.received += 1
        sender = conn.user
        if not msg_id:
            self.reject(conn, P.E_BAD_FRAME, "msg_id must not be empty")
            return
        if not P.valid_user_id(to):
            self.refuse(
                conn, P.E_BAD_RECIPIENT, msg_id, "recipient must be 1..255 bytes without NUL"
            )
            return
        if self.conn_limits.active or self.user_limits.active:
            wait = self._rate_wait(conn, sender, len(body))
            if wait:
                self.refuse(
                    conn, P.E_RATE_LIMITED, msg_id,
                    f"rate limited: over {self._limit_text(conn)}; retry in "
                    + ("never (larger than the burst)" if wait == float("inf")
                       else f"{wait:.3f} s"),
                )  # fmt: skip
                return
        now_ms = int(time.time() * 1000)
        home = home_of(to, self.workers)
        if home == self.index:
            self._accept(sender, msg_id, to, body, now_ms, conn)
            return
        # The recipient's home decides (dedup, live or stored); we keep the message until it
        # answers, so that a crash of that worker only delays it.
        frame = (N.ROUTE_SEND, now_ms, 0, sender, msg_id, to, body)
        pending = self.routed.get(home)
        if pending is None:
            pending = self.routed[home] = {}
        pending[(sender, msg_id)] = frame
        assert self.links is not None
        self.links.send(home, frame)
        self.stats.routed_out += 1

    def _rate_wait(self, conn: Connection, user: str, nbytes: int) -> float:
        """0.0 if this SEND fits both buckets (charged), else seconds until it would."""
        now = monotonic()
        if self.conn_limits.active:
            bucket = conn.bucket
            if bucket is None:
                bucket = conn.bucket = SendBucket(self.conn_limits, now)
            wait = bucket.take(self.conn_limits, now, nbytes)
            if wait:
                self.stats.rate_limited_connection += 1
                return wait
        if self.user_limits.active:
            bucket = self.user_buckets.get(user)
            if bucket is None:
                bucket = self.user_buckets[user] = SendBucket(self.user_limits, now)
            wait = bucket.take(self.user_limits, now, nbytes)
            if wait:
                self.stats.rate_limited_user += 1
                return wait
        return 0.0

    def _limit_text(self, conn: Connection) -> str:
        c = self.config
        return (f"{c.conn_rate_msgs:g} msgs/s or {c.conn_rate_bytes:g} B/s per connection, "
                f"{c.rate_msgs:g} msgs/s or {c.rate_bytes:g} B/s per user")  # fmt: skip

    def on_route_send(
        self, ts_ms: int, flags: int, sender: str, msg_id: str, to: str, body: bytes
    ) -> None:
        """A SEND forwarded by the sender's home worker."""
        self.stats.routed_in += 1
        self._accept(sender, msg_id, to, body, ts_ms, None)

    def on_route_ack(self, peer: int, user: str, msg_id: str, flags: int) -> None:
        pending = self.routed.get(peer)
        if pending is not None:
            pending.pop((user, msg_id), None)
        self._ack_local(user, msg_id, flags)

    def on_route_error(self, peer: int, user: str, code: int, msg_id: str, reason: str) -> None:
        pending = self.routed.get(peer)
        if pending is not None:
            pending.pop((user, msg_id), None)
        self.stats.refused += 1
        for conn in self._sessions_of(user):
            conn.send((P.ERROR, code, msg_id, reason))

    def on_link_up(self, peer: int) -> None:
        """A link (re)connected: resend what that worker never answered, in order."""
        pending = self.routed.get(peer)
        if not pending:
            return
        log.info("replaying %d unanswered messages to worker %d", len(pending), peer)
        assert self.links is not None
        for frame in pending.values():
            self.links.send(peer, frame[:2] + (frame[2] | N.ROUTE_FLAG_REPLAY,) + frame[3:])

    def _accept(
        self,
        sender: str,
        msg_id: str,
        to: str,
        body: bytes,
        now_ms: int,
        conn: Connection | None,
    ) -> None:
        """Take a message for a user homed here; ``conn`` is the sender's if it is local."""
        stats = self.stats
        state = self.dedup.check_and_insert(sender, msg_id, now_ms)
        if state:
            stats.deduplicated += 1
            if state == DEDUP_DONE:
                self._complete(sender, msg_id, P.ACK_DUPLICATE)
            # DEDUP_PENDING: the first copy is in flight; its ACK goes to the sender.
            return
        mb = self.mailboxes.get(to)
        if mb is None:
            mb = self._mailbox(to)
        if mb.count >= self._mailbox_limit:
            self.dedup.remove(sender, msg_id)
            stats.mailbox_full += 1
            self._refuse_to(
                sender,
                conn,
                P.E_MAILBOX_FULL,
                msg_id,
                f"mailbox of {to!r} holds {mb.count} messages, the limit",
            )
            return
        if mb.bytes + len(body) > self._mailbox_max_bytes:
            self.dedup.remove(sender, msg_id)
            stats.mailbox_bytes_full += 1
            self._refuse_to(
                sender, conn, P.E_MAILBOX_FULL, msg_id,
                f"mailbox of {to!r} holds {mb.bytes} bytes; this message would pass the limit "
                f"of {self._mailbox_max_bytes}",
            )  # fmt: skip
            return
        seq = self.store.next_seq()
        rcpt = self.sessions.get(to)
        if (
            rcpt is not None
            and mb.last_seq < rcpt.cursor
            and to not in self.devices
            and (rcpt.inflight is None or len(rcpt.inflight) < self._max_inflight)
            and rcpt.inflight_bytes < self._max_inflight_bytes
            and not rcpt.write_paused
        ):
            self._deliver(rcpt, (seq, sender, msg_id, now_ms, body, False))
        else:
            if rcpt is not None and rcpt.inflight and len(rcpt.inflight) >= self._max_inflight:
                # The recipient's window of unacknowledged deliveries is full: it waits stored.
                stats.window_full += 1
            if self.store.unavailable is not None:
                # Commits fail (disk full): refuse rather than queue what may never commit.
                self.dedup.remove(sender, msg_id)
                self._refuse_to(
                    sender, conn, P.E_STORAGE_UNAVAILABLE, msg_id,
                    f"storage unavailable ({self.store.unavailable}); not taken, send again later",
                )  # fmt: skip
                return
            self._store(to, mb, seq, sender, msg_id, now_ms, body)
            if conn is not None and self.store.queued > STORE_HIGH_WATER:
                conn.pause_reading()
                self._paused_senders.add(conn)

    def on_deliver_ack(self, conn: Connection, tag: int) -> None:
        if tag >= conn.next_tag:
            self.reject(conn, P.E_BAD_ACK, f"tag {tag} was never delivered on this connection")
            return
        inflight = conn.inflight
        if not inflight:
            return
        user = conn.user
        stats = self.stats
        now_ms = 0
        mb = None
        while inflight and inflight[0][0] <= tag:
            rec = inflight.popleft()[1]
            seq, sender, msg_id, _ts, body, stored = rec
            conn.inflight_bytes -= len(body)
            stats.delivered += 1
            if stored:
                if mb is None:
                    mb = self._mailbox(user)
                devices = self.devices.get(user)
                if devices is not None:
                    # Deleted only once every device online has it.
                    if mb.acks is None:
                        mb.acks = {}
                    acked = mb.acks.setdefault(seq, set())
                    acked.add(conn)
                    if len(acked) < len(devices):
                        continue
                    del mb.acks[seq]
                elif mb.acks:
                    mb.acks.pop(seq, None)
                self._delete_stored(user, mb, seq, len(body))
            else:
                self.dedup.mark_done(sender, msg_id)
                if not now_ms:
                    now_ms = int(time.time() * 1000)
                # Persisting the window entry lets a resend after a restart be recognised;
                # it is not waited for (the message itself is already delivered).
                self.store.put_dedup(dedup_key(sender, msg_id), now_ms)
                self._complete(sender, msg_id, 0)
        self._pump(conn)

    def on_decode_error(self, conn: Connection, code: int, reason: str) -> None:
        if code == P.E_FRAME_TOO_LARGE:
            self.fatal(conn, code, reason)
        else:
            self.reject(conn, code, reason)

    # ---- errors ----------------------------------------------------------------------------------

    def reject(self, conn: Connection, code: int, reason: str) -> None:
        """A protocol error: answer it, count it, close the connection after too many."""
        self.stats.rejected(P.ERROR_NAMES.get(code, str(code)))
        conn.send((P.ERROR, code, "", reason))
        conn.errors += 1
        if conn.errors >= self.config.max_errors:
            self.fatal(
                conn,
                P.E_TOO_MANY_ERRORS,
                f"{conn.errors} protocol errors on this connection; closing it",
            )

    def fatal(self, conn: Connection, code: int, reason: str) -> None:
        """An error after which the connection cannot continue: answer, then close."""
        self.stats.rejected(P.ERROR_NAMES.get(code, str(code)))
        conn.send((P.ERROR, code, "", reason))
        self._detach(conn)
        conn.close()

    def refuse(self, conn: Connection, code: int, msg_id: str, reason: str) -> None:
        """A message the node will not take (full mailbox, bad recipient): not a protocol error."""
        self.stats.refused += 1
        conn.send((P.ERROR, code, msg_id, reason))

    # ---- delivery --------------------------------------------------------------------------------

    def _sessions_of(self, user: str) -> list[Connection]:
        devices = self.devices.get(user)
        if devices is not None:
            return devices
        conn = self.sessions.get(user)
        return [conn] if conn is not None else []

    def _delete_stored(self, user: str, mb: Mailbox, seq: int, size: int = -1) -> None:
        # Clamped: with devices on both nodes of a pair, the peer's deletion may come first.
        mb.bytes = max(mb.bytes - (size if size >= 0 else _average(mb)), 0)
        mb.count = max(mb.count - 1, 0)
        if mb.deleting is None:
            mb.deleting = set()
        mb.deleting.add(seq)
        self.store.delete(user, seq, self._deleted_cb(user, seq))

    def _forget_device_acks(self, user: str, gone: Connection, left: list[Connection]) -> None:
        """A device left: messages every remaining device acknowledged can go now."""
        mb = self.mailboxes.get(user)
        if mb is None or not mb.acks:
            return
        remaining = set(left)
        for seq, acked in list(mb.acks.items()):
            acked.discard(gone)
            if remaining <= acked:
                del mb.acks[seq]
                self._delete_stored(user, mb, seq)

    def _store_live_inflight(self, conn: Connection) -> None:
        """Turn a session's unacknowledged live deliveries into stored ones (same seq)."""
        inflight = conn.inflight
        if not inflight or all(rec[5] for _tag, rec in inflight):
            return
        user = conn.user
        mb = self._mailbox(user)
        converted = deque()
        for tag, rec in inflight:
            if not rec[5]:
                seq, sender, msg_id, ts, body, _ = rec
                self._store(user, mb, seq, sender, msg_id, ts, body)
                rec = (seq, sender, msg_id, ts, body, True)
            converted.append((tag, rec))
        conn.inflight = converted
        # Already delivered on this session: its cursor must not fetch them a second time.
        conn.cursor = max(conn.cursor, max(rec[0] for _t, rec in converted) + 1)

    def _mailbox(self, user: str) -> Mailbox:
        mb = self.mailboxes.get(user)
        if mb is None:
            count, last, nbytes = self.store.scan_mailbox(user)
            mb = self.mailboxes[user] = Mailbox(count, last, nbytes)
        return mb

    def _deliver(self, conn: Connection, rec: Record) -> None:
        tag = conn.next_tag
        conn.next_tag = tag + 1
        if conn.inflight is None:
            conn.inflight = deque()
        conn.inflight.append((tag, rec))
        body = rec[4]
        conn.inflight_bytes += len(body)
        conn.send((P.DELIVER, tag, rec[3], rec[1], rec[2], body))
        self.stats.deliveries_sent += 1

    def _store(
        self, user: str, mb: Mailbox, seq: int, sender: str, msg_id: str, ts: int, body: bytes
    ) -> None:
        mb.add_queued(seq, len(body))
        cb = self._stored_cb(user, seq, sender, msg_id)
        cb.lsn = self.store.put(  # type: ignore[attr-defined]
            user, seq, sender, msg_id, ts, body, dedup_key(sender, msg_id), cb
        )

    def _stored_cb(self, user: str, seq: int, sender: str, msg_id: str) -> Callable[[], None]:
        def replicated(flags: int) -> None:
            self.dedup.mark_done(sender, msg_id)
            self._complete(sender, msg_id, P.ACK_STORED | flags)

        def stored() -> None:
            self.stats.stored += 1
            mb = self.mailboxes.get(user)
            if mb is not None and mb.uncommitted is not None:
                mb.uncommitted.discard(seq)
            # Durable here; with a peer, the sender's ACK waits until it is durable there too.
            if self.repl is not None and self.repl.origin is not None:
                self.repl.origin.when_replicated(stored.lsn, replicated)  # type: ignore[attr-defined]
            else:
                replicated(0)
            if user in self.sessions:
                self._schedule_pump(user)
            if self._paused_senders and self.store.queued < STORE_LOW_WATER:
                for c in self._paused_senders:
                    c.resume_reading()
                self._paused_senders.clear()

        return stored

    def _deleted_cb(self, user: str, seq: int) -> Callable[[], None]:
        def deleted() -> None:
            mb = self.mailboxes.get(user)
            if mb is None:
                return
            if mb.deleting is not None:
                mb.deleting.discard(seq)
            if mb.idle() and user not in self.sessions:
                del self.mailboxes[user]

        return deleted

    def _complete(self, sender: str, msg_id: str, flags: int) -> None:
        """The message is taken care of: ACK its sender, wherever the sender's home is."""
        home = home_of(sender, self.workers)
        if home == self.index:
            self._ack_local(sender, msg_id, flags)
        elif self.links is not None:
            self.links.send_or_hold(home, (N.ROUTE_ACK, sender, msg_id, flags))

    def _ack_local(self, sender: str, msg_id: str, flags: int) -> None:
        # ACKs follow the sender's *user*: a client that reconnected gets the ACKs of what it
        # sent before on its new connection (and resends anything still unACKed).
        for conn in self._sessions_of(sender):
            conn.send((P.ACK, msg_id, flags))

    def _refuse_to(
        self, sender: str, conn: Connection | None, code: int, msg_id: str, reason: str
    ) -> None:
        if conn is not None:
            self.refuse(conn, code, msg_id, reason)
            return
        home = home_of(sender, self.workers)
        if home == self.index:
            for target in self._sessions_of(sender):
                self.refuse(target, code, msg_id, reason)
        elif self.links is not None:
            self.links.send_or_hold(home, (N.ROUTE_ERROR, sender, code, msg_id, reason))

    def _schedule_pump(self, user: str) -> None:
        self._to_pump.add(user)
        if not self._pump_pending:
            self._pump_pending = True
            self.loop.call_soon(self._pump_scheduled)

    def _pump_scheduled(self) -> None:
        self._pump_pending = False
        users, self._to_pump = self._to_pump, set()
        for user in users:
            for conn in self._sessions_of(user):
                self._pump(conn)

    def _pump(self, conn: Connection) -> None:
        """Fill a session's delivery window from its durable mailbox, oldest first."""
        if conn.closing or conn.detached or conn.write_paused:
            return
        user = conn.user
        mb = self.mailboxes.get(user)
        if mb is None:
            mb = self._mailbox(user)
            if mb.idle():
                return
        if mb.last_seq < conn.cursor:
            return
        room = self._max_inflight - (len(conn.inflight) if conn.inflight else 0)
        if room <= 0 or conn.inflight_bytes >= self._max_inflight_bytes:
            return
        # Never read past a seq whose put is still queued: a later message must not overtake it.
        limit = min(mb.uncommitted) if mb.uncommitted else None
        skip = mb.deleting
        inflight = conn.inflight
        if inflight and inflight[-1][1][0] >= conn.cursor:
            # The cursor went back for a replicated message older than what is in flight
            # (apply_replicated): do not deliver the in-flight ones a second time.
            skip = (skip or set()) | {rec[0] for _tag, rec in inflight}
        for seq, sender, msg_id, ts, body in self.store.read(user, conn.cursor, room, skip):
            if limit is not None and seq >= limit:
                break
            self._deliver(conn, (seq, sender, msg_id, ts, body, True))
            conn.cursor = seq + 1
            if conn.inflight_bytes >= self._max_inflight_bytes:
                break

    # ---- replication (the peer's records, see iris_fast.replication.replica) --------------------

    def apply_replicated(
        self, records: list[ReplRecord], last_lsn: int, done: Callable[[], None]
    ) -> None:
        """Apply records of the peer's stream for users homed here; ``done`` once durable."""
        kept: list[ReplRecord] = []
        dedup = self.dedup
        for rec in records:
            kind = rec[0]
            if kind == N.REC_PUT:
                _, user, seq, ts, sender, msg_id, body = rec
                if dedup.check_and_insert(sender, msg_id, ts):
                    # This node already has the message (a client resent it here while the
                    # peer's copy was on its way): one copy is enough.
                    self.stats.repl_duplicates += 1
                    continue
                dedup.mark_done(sender, msg_id)
                self.store.observe_seq(seq)
                self._mailbox(user).add_queued(seq, len(body))
            elif kind == N.REC_DEDUP:
                dedup.insert_key(rec[1], DEDUP_DONE, rec[2])
            kept.append(rec)
        self.store.apply(kept, last_lsn, lambda results: self._applied(kept, results, done))

    def _applied(
        self, records: list[ReplRecord], results: list[bool], done: Callable[[], None]
    ) -> None:
        for rec, changed in zip(records, results, strict=True):
            kind = rec[0]
            if kind == N.REC_DEDUP:
                continue
            user, seq = rec[1], rec[2]
            mb = self.mailboxes.get(user)
            if kind == N.REC_PUT:
                if mb is not None:
                    if mb.uncommitted is not None:
                        mb.uncommitted.discard(seq)
                    if not changed:
                        mb.count -= 1
                        mb.bytes = max(mb.bytes - len(rec[6]), 0)
                for conn in self._sessions_of(user):
                    if seq < conn.cursor:
                        conn.cursor = seq
                if user in self.sessions:
                    self._schedule_pump(user)
            elif changed and mb is not None:
                mb.bytes = max(mb.bytes - _average(mb), 0)
                mb.count = max(mb.count - 1, 0)
                if mb.idle() and user not in self.sessions:
                    del self.mailboxes[user]
        self.stats.repl_applied += len(records)
        done()

    # ---- writes ----------------------------------------------------------------------------------

    def schedule_flush(self, conn: Connection) -> None:
        """Called by a connection when it queued its first frame this tick."""
        self._dirty.append(conn)
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush_all)

    def _flush_all(self) -> None:
        self._flush_pending = False
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn.flush()

    # ---- housekeeping (driven by a timer in serve.py) --------------------------------------------

    def sweep(self, now: float) -> None:
        """Close connections that never logged in; hibernate idle ones."""
        timeout = self.config.login_timeout
        for conn in [c for c in self.unauthenticated if now - c.opened_at > timeout]:
            self.stats.login_timeouts += 1
            self.fatal(conn, P.E_LOGIN_TIMEOUT, f"no LOGIN within {timeout:g} s")
        if self.login_limiter is not None:
            self.login_limiter.prune()
        idle_after = self.config.hibernate_after
        for conn in self.connections:
            if now - conn.last_active > idle_after:
                conn.hibernate()
        if self.user_buckets:
            self._prune_user_buckets(now)

    def _prune_user_buckets(self, now: float) -> None:
        """Forget buckets of users gone long enough for them to be full again (a reconnect must
        not refill a bucket early, so they outlive the session until then)."""
        lim = self.user_limits
        spans = [b / r for r, b in ((lim.msgs_rate, lim.msgs_burst),
                                    (lim.bytes_rate, lim.bytes_burst)) if r]  # fmt: skip
        full_after = max(spans, default=0.0)
        for user in [u for u, b in self.user_buckets.items()
                     if u not in self.sessions and now - b.last >= full_after]:  # fmt: skip
            del self.user_buckets[user]

    def prune_dedup(self) -> None:
        self.store.prune_dedup(int(time.time() * 1000) - int(self.config.dedup_age_s * 1000))

    def drain(self) -> None:
        """SIGTERM: tell every client, queue unacknowledged live deliveries for storage."""
        self.draining = True
        for conn in list(self.connections):
            conn.send((P.ERROR, P.E_SHUTTING_DOWN, "", "node is shutting down; reconnect"))
            self._detach(conn)
            conn.close()

    def session_count(self) -> int:
        """Logged-in sessions on this worker (devices counted one by one)."""
        return len(self.sessions) + sum(len(d) - 1 for d in self.devices.values())


def _average(mb: Mailbox) -> int:
    """Body size to subtract for a deletion whose size is not at hand (a replicated DEL)."""
    return mb.bytes // mb.count if mb.count else mb.bytes
