"""The message engine of one worker process: sessions, routing, delivery windows, mailboxes.

One ``Worker`` runs on one event loop (one worker process). Connections
(``iris_fast.connection.Connection``) call its ``on_*`` methods with decoded frames; it answers
through ``Connection.send``. Every user has a home worker (``links.home_of``) that holds its
sessions and mailbox state; messages for users homed elsewhere are forwarded over a worker link.

Delivery model (docs/architecture.md has the reasoning):

* Every message accepted by the recipient's home gets a ``seq`` from that worker's counter.
  A recipient that is online, has room in its delivery window and has nothing older waiting in
  storage gets it *live*: nothing is written, and the sender's ACK waits for the recipient's
  ``DELIVER_ACK`` -- but only for ``--live-ack-timeout``: a live delivery still unacknowledged
  then is stored like the ones below (same ``seq``) and its sender ACKed ``STORED``.
* Otherwise the message is *stored*: one LMDB put in the next group commit; the sender's ACK
  (flag ``STORED``) follows the fsync. A session pulls stored messages in ``seq`` order as its
  window frees, so live and stored messages of one sender never overtake each other.
* Live deliveries not yet acknowledged when their connection goes away are stored under their
  original ``seq`` (so they keep their place in line), then ACKed to the sender.
"""

from __future__ import annotations

import logging
import socket
import struct
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import iris_native as N
from iris_native import DEDUP_DONE, DedupWindow, dedup_key, dedup_sender

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

# A message on its way to a device: (seq, sender, msg_id, ts_ms, body, stored); stored is
# False (live), True, or GONE: stored, and the peer's deletion of it was applied already.
Record = tuple[int, str, str, int, bytes, bool | int]
GONE = 2

# Pause reading from senders while this many storage operations wait for the writer: intake
# must not outrun the disk without bound.
STORE_HIGH_WATER = 50_000
STORE_LOW_WATER = 10_000
# How long a login waits for its home worker to take the socket (queue full, or restarting).
HANDOFF_RETRY_S = 10.0
# Keys the TTL sweep looks at per housekeeping tick (one short read transaction each).
TTL_SWEEP_KEYS = 1_000
# Mailboxes looked at per eviction step: bounds the work of one insertion into the cache.
EVICT_SCAN = 64
# Per-sender counts read from storage are read again before a refusal once they are older
# than SENDER_RECOUNT_S, and in any case once older than SENDER_REFRESH_S (see _sender_over).
SENDER_RECOUNT_S = 2.0
SENDER_REFRESH_S = 30.0
# Reads paused this long for --max-pending-writes: clients that do not read hold the worker
# hostage, so the one holding the most is cut (one per sweep until reading resumes).
WRITE_STALL_S = 5.0


class Mailbox:
    """What the worker must know of one user's durable mailbox without reading LMDB."""

    __slots__ = (
        "count",
        "bytes",
        "last_seq",
        "uncommitted",
        "deleting",
        "acks",
        "senders",
        "senders_at",
        "queued_from",
    )

    def __init__(self, count: int, last_seq: int, nbytes: int = 0) -> None:
        self.count = count  # stored (committed or queued) and not yet deleted
        self.bytes = nbytes  # their body bytes
        self.last_seq = last_seq  # highest seq ever queued for storage
        self.uncommitted: set[int] | None = None  # seqs queued, not yet durable
        self.deleting: set[int] | None = None  # seqs acknowledged, delete not yet durable
        # With several devices online: seq -> the sessions that acknowledged it so far.
        self.acks: dict[int, set[Connection]] | None = None
        # Only while the mailbox is big enough for one sender to pass its bound: sender ->
        # [messages, bytes], read from storage at ``senders_at`` plus what was stored since.
        self.senders: dict[str, list[int]] | None = None
        self.senders_at = 0.0
        # seq -> (sender, body bytes) of messages stored by _accept since the mailbox last had
        # nothing uncommitted: a count read from LMDB misses those, this adds them back.
        self.queued_from: dict[int, tuple[str, int]] | None = None

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
        # Least recently used first: mailboxes of users without a session are evicted beyond
        # --mailbox-cache (their state is rebuilt from LMDB by _mailbox when needed again).
        self.mailboxes: OrderedDict[str, Mailbox] = OrderedDict()
        self._mailbox_cache = config.mailbox_cache
        self._per_sender_limit = config.mailbox_per_sender_limit
        self._per_sender_bytes = config.mailbox_per_sender_max_bytes
        self._ttl_ms = int(config.message_ttl_s * 1000)
        # Per-device cursors (docs/architecture.md, "Issue 10: per-device cursors"): the known
        # device ids of users loaded here -> [cursor, seen_ms], mirrored in LMDB.
        self.known: dict[str, dict[str, list[int]]] = {}
        ttl = config.device_ttl_s
        self._device_ttl_ms = int((config.message_ttl_s if ttl < 0 else ttl) * 1000)
        self._devices_sweep_at = 0
        self._ttl_cursor = b""
        # Back-pressure on worker links: bytes of self.routed per worker, and the senders whose
        # reads are paused until that worker has answered enough of them.
        self._link_max_bytes = config.link_max_bytes
        self.routed_bytes: dict[int, int] = {}
        self._link_paused: dict[int, set[Connection]] = {}
        self.dedup = DedupWindow(config.dedup_entries, int(config.dedup_age_s * 1000))
        # With replication (docs/replication.md, "One copy per message"): the peer's PUTs whose
        # key is pending here until their apply is durable -> the ACK flags owed to a sender
        # waiting here (0: none); and our own puts not yet committed, by key -> (user, seq).
        self._repl_pending: dict[tuple[str, str], int] = {}
        self._queued: dict[tuple[str, str], tuple[str, int]] = {}
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
        # Live deliveries waiting for their DELIVER_ACK: a timer wheel of three buckets of half
        # the timeout each, one timer per worker (not one per message), so a delivery is stored
        # between 1 and 1.5 timeouts after it went out. A message costs one set.add: a bucket
        # holds the sessions that got live deliveries, and when it closes, the highest tag each
        # had by then.
        self._live_tick_s = config.live_ack_timeout_s / 2
        self._live_new: set[Connection] | None = None
        self._live_wheel: deque[dict[Connection, int] | None] = deque()
        self._live_timer: asyncio.TimerHandle | None = None
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
        # Connections over their transport's high-water mark -> the bytes they held at their
        # last flush, and the sum of those: checked at every flush, not only on transitions.
        self._write_paused: dict[Connection, int] = {}
        self._pending_total = 0
        # One connection holding more than this is cut: never less than a full delivery window
        # (and a frame more) can legitimately queue for a client that reads.
        self._max_conn_pending = max(
            config.max_conn_pending_writes, config.max_inflight_bytes + 2 * config.max_frame
        )
        self.reads_paused = False
        self._reads_paused_at = 0.0
        self._max_frame = config.max_frame
        # Bodies up to this long fit any DELIVER (sender and msg_id are at most 255 bytes each).
        self._body_always_fits = config.max_frame - P.DELIVER_OVERHEAD - 2 * 255
        # Streamed in batches straight into the window: a restart never holds the table as
        # Python objects (docs/architecture.md, "Issue 10: dedup window").
        loaded = 0
        now_ms = int(time.time() * 1000)
        for chunk in store.iter_dedup(int(config.dedup_age_s * 1000), config.workers):
            loaded += self.dedup.load(chunk, now_ms)
        if loaded:
            log.info("reloaded %d dedup entries from storage", loaded)

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
            self._pending_total -= self._write_paused.pop(conn)
            self._check_write_pressure()
        self.connections.discard(conn)
        self.unauthenticated.discard(conn)
        self._paused_senders.discard(conn)
        if self._link_paused:
            for paused in self._link_paused.values():
                paused.discard(conn)
        if conn.pending_input():
            self.stats.rejected("truncated")
        self._detach(conn)

    def on_write_paused(self, conn: Connection) -> None:
        """A client stopped reading fast enough: its transport's buffer passed the high mark."""
        self._write_paused.setdefault(conn, 0)
        self._check_write_pressure()

    def on_pending(self, conn: Connection) -> None:
        """Called by a write-paused connection after each flush: enforce both bounds now, not
        at the next pause/resume transition (a client that never reads makes none)."""
        transport = conn.transport
        if transport is None or conn not in self._write_paused:
            return
        size = transport.get_write_buffer_size()
        if size > self._max_conn_pending:
            self._cut_slow_reader(conn, size, f"limit {self._max_conn_pending} per connection")
            return
        self._pending_total += size - self._write_paused[conn]
        self._write_paused[conn] = size
        if not self.reads_paused and self._pending_total > self._max_pending_writes:
            self._check_write_pressure()

    def pending_write_bytes(self) -> int:
        """Bytes waiting for write-paused clients, as of their last flush (for /metrics)."""
        return self._pending_total

    def _cut_slow_reader(self, conn: Connection, size: int, why: str) -> None:
        # No ERROR can reach a client that does not read (it would queue behind what it did not
        # read): count, log, and reset the connection so the kernel drops its buffer too.
        self.stats.rejected("slow_reader")
        log.warning("cutting %s (user %r): %d bytes wait for it to read (%s)",
                    conn.peer, conn.user, size, why)  # fmt: skip
        self._pending_total -= self._write_paused.pop(conn, 0)
        sock = conn.transport.get_extra_info("socket")
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, AttributeError):
            pass
        self._detach(conn)
        conn.cut()

    def _check_write_pressure(self) -> None:
        # Only connections over the transport's high-water mark can hold much; summing them is
        # cheap because there are few. Over the bound, the worker stops reading from every
        # client (no new work) until the slow readers drained half of it.
        paused = self._write_paused
        for c in paused:
            paused[c] = c.transport.get_write_buffer_size() if c.transport else 0
        pending = self._pending_total = sum(paused.values())
        if not self.reads_paused and pending > self._max_pending_writes:
            self.reads_paused = True
            self._reads_paused_at = monotonic()
            self.stats.write_backpressure += 1
            log.warning("%d bytes wait for slow clients (limit %d); pausing reads",
                        pending, self._max_pending_writes)  # fmt: skip
            for c in self.connections:
                c.pause_reading()
        elif self.reads_paused and pending <= self._max_pending_writes // 2:
            self.reads_paused = False
            log.info("pending writes down to %d bytes; reading again", pending)
            for c in self.connections:
                if self._may_read(c):
                    c.resume_reading()

    def on_writable(self, conn: Connection) -> None:
        if conn in self._write_paused:
            self._pending_total -= self._write_paused.pop(conn)
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
            # An anonymous session's acks of messages a known device still lacks.
            self._forget_device_acks(user, conn, [])
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

    def on_login(
        self, conn: Connection, version: int, user: str, token: str, device: str = ""
    ) -> None:
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
        if "\0" in device:
            self._login_failed(conn, source, P.E_AUTH_FAILED, "device id must not hold NUL")
            return
        if self.auth is not None:
            try:
                self.auth.verify(token, user)
            except AuthError as exc:
                self.stats.auth_failures += 1
                self._login_failed(conn, source, P.E_AUTH_FAILED, str(exc))
                return
        conn.device = device
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

    def finish_handoff(self, conn: Connection, user: str, rest: bytes) -> None:
        """Called by the connection with the bytes that followed LOGIN in the same read."""
        home = home_of(user, self.workers)
        # The raw bytes, not re-encoded frames: a frame that failed to decode here has no
        # encoding, and the home worker must answer it with its ERROR. The decoder's partial
        # frame is the end of ``rest``.
        conn.take_pending()
        preamble = rest
        if conn.device:
            # The device id travels after a NUL, which no user id holds (see adopt).
            user = f"{user}\0{conn.device}"
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
        user, _, device = user.partition("\0")

        def factory() -> Connection:
            conn = Connection(self, max_frame)
            conn.device = device
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
        known = self._known(user)
        if conn.device:
            now_ms = int(time.time() * 1000)
            ent = known.get(conn.device)
            if ent is None:
                # A new device gets whatever is still stored.
                ent = known[conn.device] = [0, now_ms]
            ent[1] = now_ms
            conn.cursor = ent[0]
            self.store.put_cursor(user, conn.device, ent[0], now_ms)
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
        if len(body) > self._body_always_fits:
            size = P.deliver_len(sender, msg_id, len(body))
            if size > self._max_frame:
                # Its DELIVER (sender, tag and timestamp added) could never be written: take
                # nothing that cannot be delivered, wherever the recipient is.
                self.stats.rejected("message_too_large")
                self.refuse(
                    conn, P.E_FRAME_TOO_LARGE, msg_id,
                    f"message too large: its DELIVER would be {size} bytes, over max_frame "
                    f"{self._max_frame}; the body may be at most "
                    f"{self._max_frame - size + len(body)} bytes",
                )  # fmt: skip
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
        old = pending.get((sender, msg_id))
        pending[(sender, msg_id)] = frame
        nbytes = self.routed_bytes.get(home, 0) + _routed_size(frame)
        if old is not None:  # a resend of a message still unanswered: one copy is kept
            nbytes -= _routed_size(old)
        self.routed_bytes[home] = nbytes
        assert self.links is not None
        self.links.send(home, frame)
        self.stats.routed_out += 1
        if nbytes > self._link_max_bytes:
            self._hold_for_link(conn, home, nbytes)

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
            self._routed_done(peer, pending.pop((user, msg_id), None))
        self._ack_local(user, msg_id, flags)

    def on_route_error(self, peer: int, user: str, code: int, msg_id: str, reason: str) -> None:
        pending = self.routed.get(peer)
        if pending is not None:
            self._routed_done(peer, pending.pop((user, msg_id), None))
        self.stats.refused += 1
        for conn in self._sessions_of(user):
            conn.send((P.ERROR, code, msg_id, reason))

    def _hold_for_link(self, conn: Connection, home: int, nbytes: int) -> None:
        """Worker ``home`` has too many of our SENDs unanswered (slow, stopped, restarting):
        stop reading from this sender until it has answered half of them. What the sender's
        last read already holds still goes through, so the bound is passed by at most one
        read per paused sender."""
        paused = self._link_paused.get(home)
        if paused is None:
            paused = self._link_paused[home] = set()
            self.stats.link_backpressure += 1
            log.warning("%d bytes forwarded to worker %d wait for an answer (limit %d); "
                        "pausing its senders", nbytes, home, self._link_max_bytes)  # fmt: skip
        if conn not in paused:
            paused.add(conn)
            conn.pause_reading()

    def _routed_done(self, peer: int, frame: tuple | None) -> None:
        """A forwarded SEND was answered: release its bytes, and its senders below half."""
        if frame is None:
            return
        nbytes = self.routed_bytes.get(peer, 0) - _routed_size(frame)
        self.routed_bytes[peer] = nbytes
        if peer in self._link_paused and nbytes <= self._link_max_bytes // 2:
            paused = self._link_paused.pop(peer)
            log.info("worker %d answered; %d bytes wait now; reading again", peer, nbytes)
            for c in paused:
                if self._may_read(c):
                    c.resume_reading()

    def _link_held(self, conn: Connection) -> bool:
        """Whether ``conn`` is paused for some worker link's bound."""
        return any(conn in paused for paused in self._link_paused.values())

    def _may_read(self, conn: Connection) -> bool:
        """Whether no reason to keep ``conn``'s reads paused is left. Three bounds pause reads
        (write pressure for the whole worker, the storage queue, a worker link), each lifted on
        its own schedule: a connection reads again only once every one of them lets it, and
        never while its socket waits to be handed to its home worker."""
        return (
            not self.reads_paused
            and conn not in self._paused_senders
            and not conn.handoff_pending
            and not (self._link_paused and self._link_held(conn))
        )

    def link_queued_bytes(self) -> int:
        """Bytes written to worker links that the kernel has not taken yet (a metric)."""
        if self.links is None:
            return 0
        return sum(
            link.transport.get_write_buffer_size()
            for link in self.links.out.values()
            if link.transport is not None
        )

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
            elif (sender, msg_id) in self._repl_pending:
                # The peer's copy is being applied here; the peer ACKs its sender, which is
                # now here: ACK it once that copy is durable here too (_applied).
                self._repl_pending[(sender, msg_id)] = P.ACK_STORED | P.ACK_DUPLICATE
            # DEDUP_PENDING: the first copy is in flight; its ACK goes to the sender.
            return
        mb = self.mailboxes.get(to)
        if mb is None:
            mb = self._mailbox(to)
        else:
            self.mailboxes.move_to_end(to)
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
        over = self._sender_over(to, mb, sender, len(body))
        if over is not None:
            self.dedup.remove(sender, msg_id)
            stats.mailbox_sender_full += 1
            self._refuse_to(sender, conn, P.E_MAILBOX_FULL, msg_id, over)
            return
        seq = self.store.next_seq()
        rcpt = self.sessions.get(to)
        if (
            rcpt is not None
            and mb.last_seq < rcpt.cursor
            and to not in self.devices
            and len(self.known.get(to) or ()) < 2
            and (rcpt.inflight is None or len(rcpt.inflight) < self._max_inflight)
            and rcpt.inflight_bytes < self._max_inflight_bytes
            and not rcpt.write_paused
        ):
            self._deliver(rcpt, (seq, sender, msg_id, now_ms, body, False))
            live = self._live_new
            if live is None:
                live = self._live_new = set()
                if self._live_timer is None:
                    self._live_timer = self.loop.call_later(self._live_tick_s, self._live_tick)
            live.add(rcpt)
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
            if self._per_sender_limit or self._per_sender_bytes:
                self._count_stored(mb, seq, sender, len(body))
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
        ent = self._known(user).get(conn.device) if conn.device else None
        moved = False
        while inflight and inflight[0][0] <= tag:
            rec = inflight.popleft()[1]
            seq, sender, msg_id, _ts, body, stored = rec
            conn.inflight_bytes -= len(body)
            stats.delivered += 1
            if stored:
                if mb is None:
                    mb = self._mailbox(user)
                if ent is not None and seq >= ent[0]:
                    ent[0] = seq + 1
                    moved = True
                if stored == GONE:
                    if mb.acks:
                        mb.acks.pop(seq, None)
                    continue
                if ent is None:
                    # An anonymous session's ack counts for that session only.
                    if mb.acks is None:
                        mb.acks = {}
                    mb.acks.setdefault(seq, set()).add(conn)
                if not self._all_have(user, mb, seq):
                    continue
                if mb.acks:
                    mb.acks.pop(seq, None)
                self._delete_stored(user, mb, seq, len(body))
            else:
                self.dedup.mark_done(sender, msg_id)
                if not now_ms:
                    now_ms = int(time.time() * 1000)
                if self.repl is not None and self.repl.origin is not None:
                    # The peer must know the message before its sender hears back: a resend
                    # to the peer would otherwise be taken there as new, a second copy.
                    self._dedup_then_complete(sender, msg_id, now_ms)
                else:
                    # Persisting the window entry lets a resend after a restart be recognised;
                    # it is not waited for (the message itself is already delivered).
                    self.store.put_dedup(dedup_key(sender, msg_id), now_ms, dedup_sender(sender))
                    self._complete(sender, msg_id, 0)
        if moved:
            ent[1] = now_ms or int(time.time() * 1000)
            self.store.put_cursor(user, conn.device, ent[0], ent[1])
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
        """An error after which the connection cannot continue: answer, then cut it (the
        ERROR goes out if the kernel takes it; a peer that does not read is not waited for)."""
        self.stats.rejected(P.ERROR_NAMES.get(code, str(code)))
        conn.send((P.ERROR, code, "", reason))
        self._detach(conn)
        conn.cut()

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
        """A session left: messages every remaining session and known device has can go now."""
        mb = self.mailboxes.get(user)
        if mb is None or not mb.acks:
            return
        for seq, acked in list(mb.acks.items()):
            acked.discard(gone)
            if self._all_have(user, mb, seq):
                del mb.acks[seq]
                self._delete_stored(user, mb, seq)
            elif not acked:
                del mb.acks[seq]

    def _all_have(self, user: str, mb: Mailbox, seq: int) -> bool:
        """Whether stored message ``seq`` may go: every anonymous session online acknowledged
        it (mb.acks) and every known device's cursor is past it (online or not)."""
        acked = mb.acks.get(seq) if mb.acks else None
        for s in self._sessions_of(user):
            if not s.device and (acked is None or s not in acked):
                return False
        return all(ent[0] > seq for ent in self._known(user).values())

    def _known(self, user: str) -> dict[str, list[int]]:
        known = self.known.get(user)
        if known is None:
            known = self.known[user] = self.store.load_devices(user)
            if known and self._device_ttl_ms:
                cutoff = int(time.time() * 1000) - self._device_ttl_ms
                for device in [d for d, ent in known.items() if ent[1] < cutoff]:
                    del known[device]
                    self.store.forget_device(user, device)
        return known

    def sweep_devices(self, now_ms: int) -> int:
        """Forget the devices not seen for --device-ttl (never one online) and delete what
        they alone kept stored; returns how many were forgotten."""
        if not self._device_ttl_ms or now_ms < self._devices_sweep_at:
            return 0
        # A pass looks at every loaded user, so it runs every ttl/8 (1..60 s), not every second:
        # with a 30-day TTL, a minute late to forget is nothing, and 100,000 users a second is.
        self._devices_sweep_at = now_ms + min(max(self._device_ttl_ms // 8, 1000), 60_000)
        cutoff = now_ms - self._device_ttl_ms
        forgotten = 0
        for user, known in list(self.known.items()):
            online = {s.device for s in self._sessions_of(user)}
            old = [d for d, ent in known.items() if ent[1] < cutoff and d not in online]
            for device in old:
                del known[device]
                self.store.forget_device(user, device)
            if old:
                forgotten += len(old)
                self._release(user)
        if forgotten:
            self.stats.devices_forgotten += forgotten
            log.info("forgot %d devices not seen for %g s", forgotten, self._device_ttl_ms / 1000)
        return forgotten

    def _release(self, user: str) -> None:
        """Delete the stored messages every remaining known device has (after a device was
        forgotten). With no known device left, or an anonymous session online (it reads the
        mailbox from the start), they stay: an anonymous device has no cursor."""
        known = self._known(user)
        if not known or any(not s.device for s in self._sessions_of(user)):
            return
        floor = min(ent[0] for ent in known.values())
        mb = self._mailbox(user)
        if not mb.count:
            return
        for seq, *_ in self.store.read(user, 0, mb.count, mb.deleting):
            if seq >= floor:
                break
            if mb.acks:
                mb.acks.pop(seq, None)
            self._delete_stored(user, mb, seq)

    def _store_live_inflight(self, conn: Connection, upto: int | None = None) -> int:
        """Turn a session's unacknowledged live deliveries (those with tag <= ``upto``, or all)
        into stored ones (same seq); returns how many."""
        inflight = conn.inflight
        if not inflight or all(rec[5] for _tag, rec in inflight):
            return 0
        user = conn.user
        mb = self._mailbox(user)
        converted = deque()
        count = 0
        for tag, rec in inflight:
            if not rec[5] and (upto is None or tag <= upto):
                seq, sender, msg_id, ts, body, _ = rec
                self._store(user, mb, seq, sender, msg_id, ts, body)
                rec = (seq, sender, msg_id, ts, body, True)
                count += 1
            converted.append((tag, rec))
        conn.inflight = converted
        # Already delivered on this session: its cursor must not fetch them a second time --
        # unless a message it has not had yet lies below them (a replicated one lowered the
        # cursor and waits for room in the window): then the pump skips the in-flight ones.
        top = max(rec[0] for _t, rec in converted) + 1
        if top <= conn.cursor:
            return count
        held = {rec[0] for _t, rec in converted}
        low = conn.cursor
        if mb.uncommitted and any(low <= s < top and s not in held for s in mb.uncommitted):
            return count
        skip = held | mb.deleting if mb.deleting else held
        for seq, *_ in self.store.read(user, low, 1, skip):
            if seq < top:
                return count
        conn.cursor = top
        return count

    def _live_tick(self) -> None:
        """Every half timeout: store the live deliveries older than the timeout."""
        self._live_timer = None
        wheel = self._live_wheel
        new, self._live_new = self._live_new, None
        wheel.append({c: c.next_tag - 1 for c in new} if new else None)
        if len(wheel) >= 3:
            due = wheel.popleft()
            for conn, tag in (due or {}).items():
                inflight = conn.inflight
                if inflight and inflight[0][0] <= tag and not conn.detached:
                    self.stats.live_ack_timeouts += self._store_live_inflight(conn, tag)
        if any(wheel):
            self._live_timer = self.loop.call_later(self._live_tick_s, self._live_tick)
        else:
            wheel.clear()

    def _mailbox(self, user: str) -> Mailbox:
        mb = self.mailboxes.get(user)
        if mb is None:
            count, last, nbytes = self.store.scan_mailbox(user)
            mb = self.mailboxes[user] = Mailbox(count, last, nbytes)
            if len(self.mailboxes) - len(self.sessions) > self._mailbox_cache:
                self.evict_mailboxes(keep=user)
        return mb

    def evict_mailboxes(self, keep: str | None = None, scan: int = EVICT_SCAN) -> None:
        """Forget least recently used mailboxes beyond --mailbox-cache whose state LMDB holds
        entirely: no session here, nothing queued for the writer (uncommitted, deleting) and no
        per-device acks; scan_mailbox rebuilds them. Looks at ``scan`` entries at most; the
        ones it must keep go to the back, so the next call looks at others."""
        mbs = self.mailboxes
        excess = len(mbs) - len(self.sessions) - self._mailbox_cache
        for _ in range(min(len(mbs), scan)):
            if excess <= 0:
                return
            user, mb = mbs.popitem(last=False)
            if user == keep or user in self.sessions or mb.uncommitted or mb.deleting or mb.acks:
                mbs[user] = mb
                if user == keep:
                    return  # went round: everything before it was looked at
            else:
                self.known.pop(user, None)  # LMDB holds it too
                excess -= 1
                self.stats.mailboxes_evicted += 1

    def _sender_over(self, to: str, mb: Mailbox, sender: str, nbytes: int) -> str | None:
        """Why this message would pass the per-sender bound of ``to``'s mailbox (None: it fits).

        Only looked at when the whole mailbox is past a per-sender limit (no sender can be
        past it before). The counts are read from LMDB (plus what _accept queued and is not
        committed yet) and then counted up by what _accept stores; deletions and messages
        stored by other paths (replicated, live deliveries stored later) are seen at the next
        read: before a refusal if the counts are older than SENDER_RECOUNT_S, else every
        SENDER_REFRESH_S. A flood of refusals costs one read per SENDER_RECOUNT_S.
        """
        lim, blim = self._per_sender_limit, self._per_sender_bytes
        if not ((lim and mb.count >= lim) or (blim and mb.bytes + nbytes > blim)):
            mb.senders = None
            return None
        now = monotonic()
        if mb.senders is None or now - mb.senders_at > SENDER_REFRESH_S:
            self._count_senders(to, mb, now)
        over = _sender_over_text(to, mb, sender, nbytes, lim, blim)
        if over is not None and now - mb.senders_at > SENDER_RECOUNT_S:
            self._count_senders(to, mb, now)
            over = _sender_over_text(to, mb, sender, nbytes, lim, blim)
        return over

    def _count_stored(self, mb: Mailbox, seq: int, sender: str, nbytes: int) -> None:
        """_accept stored ``seq`` from ``sender``: keep the per-sender counts up to date."""
        queued = mb.queued_from
        if queued is None:
            queued = mb.queued_from = {}
        elif len(mb.uncommitted or ()) <= 1:  # only this one: the earlier ones are durable
            queued.clear()
        elif len(queued) > 2 * len(mb.uncommitted) + 64:
            # Under a steady flow something is always uncommitted: drop what is durable.
            mb.queued_from = queued = {k: v for k, v in queued.items() if k in mb.uncommitted}
        queued[seq] = (sender, nbytes)
        if mb.senders is not None:
            used = mb.senders.get(sender)
            if used is None:
                used = mb.senders[sender] = [0, 0]
            used[0] += 1
            used[1] += nbytes

    def _count_senders(self, to: str, mb: Mailbox, now: float) -> None:
        senders = mb.senders = self.store.sender_usage(to)
        mb.senders_at = now
        if mb.queued_from and mb.uncommitted:
            for seq, (who, size) in mb.queued_from.items():
                if seq in mb.uncommitted:
                    used = senders.get(who)
                    if used is None:
                        used = senders[who] = [0, 0]
                    used[0] += 1
                    used[1] += size

    def sweep_expired(self, now_ms: int) -> int:
        """One bounded step of the TTL sweep (--message-ttl): delete stored messages older than
        the TTL from the mailboxes of users homed here that have no session here (an online
        user's mailbox is being delivered, and a message in flight must not be deleted under
        its DELIVER_ACK). The delete is store.delete: it logs a DEL record, so the peer deletes
        its copy too. Returns the number of messages expired by this step."""
        if not self._ttl_ms:
            return 0
        index, workers = self.index, self.workers

        def mine(user: str) -> bool:
            return user not in self.sessions and home_of(user, workers) == index

        found, self._ttl_cursor = self.store.scan_expired(
            self._ttl_cursor, now_ms - self._ttl_ms, TTL_SWEEP_KEYS, mine
        )
        expired = 0
        for user, seq, size in found:
            mb = self._mailbox(user)
            if mb.deleting and seq in mb.deleting:
                continue
            if mb.acks:
                mb.acks.pop(seq, None)
            self._delete_stored(user, mb, seq, size)
            expired += 1
        if expired:
            self.stats.expired += expired
            log.info("expired %d stored messages older than %g s", expired, self._ttl_ms / 1000)
        return expired

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
        if self.repl is not None:
            self._queued[(sender, msg_id)] = (user, seq)
        cb = self._stored_cb(user, seq, sender, msg_id)
        cb.lsn = self.store.put(  # type: ignore[attr-defined]
            user, seq, sender, msg_id, ts, body, dedup_key(sender, msg_id), cb
        )

    def _dedup_then_complete(self, sender: str, msg_id: str, now_ms: int) -> None:
        """ACK a live delivery once its dedup record is committed and on the peer."""

        def replicated(flags: int) -> None:
            self._complete(sender, msg_id, flags)

        def committed() -> None:
            self.repl.origin.when_replicated(committed.lsn, replicated)  # type: ignore[union-attr,attr-defined]

        committed.lsn = self.store.put_dedup(  # type: ignore[attr-defined]
            dedup_key(sender, msg_id), now_ms, dedup_sender(sender), committed
        )

    def _gone_by_peer(self, user: str, seq: int) -> None:
        """The peer's deletion of ``seq`` was applied (and counted): a session here that still
        has it in flight must not count its deletion a second time when it acknowledges it."""
        for conn in self._sessions_of(user):
            inflight = conn.inflight
            if inflight:
                for i, (tag, r) in enumerate(inflight):
                    if r[0] == seq and r[5] is True:
                        inflight[i] = (tag, r[:5] + (GONE,))
                        break

    def _stored_cb(self, user: str, seq: int, sender: str, msg_id: str) -> Callable[[], None]:
        def replicated(flags: int) -> None:
            self.dedup.mark_done(sender, msg_id)
            self._complete(sender, msg_id, P.ACK_STORED | flags)

        def stored() -> None:
            self.stats.stored += 1
            if self._queued:
                self._queued.pop((sender, msg_id), None)
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
            self._resume_store_paused()

        return stored

    def _resume_store_paused(self) -> None:
        """Read again from senders paused for the storage queue once it is below low water.
        Called after each stored put and from the housekeeping tick: the queue can drain
        through operations that have no callback (deletions, dedup entries)."""
        if self._paused_senders and self.store.queued < STORE_LOW_WATER:
            paused, self._paused_senders = self._paused_senders, set()
            for c in paused:
                if self._may_read(c):
                    c.resume_reading()

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
        drop: list[tuple[str, int, int]] = []
        for rec in records:
            kind = rec[0]
            if kind == N.REC_PUT:
                _, user, seq, ts, sender, msg_id, body = rec
                state = dedup.check_and_insert(sender, msg_id, ts)
                if state:
                    # This node took the message too (a client resent it here while the peer's
                    # copy was on its way): one copy must stay, on both nodes.
                    if not self._keep_peer_copy(user, seq, sender, msg_id, len(body), state, drop):
                        self.stats.repl_duplicates += 1
                        continue
                else:
                    # Pending until durable here: a resend meanwhile is not ACKed before.
                    self._repl_pending[(sender, msg_id)] = 0
                self.store.observe_seq(seq)
                self._mailbox(user).add_queued(seq, len(body))
            elif kind == N.REC_DEDUP:
                dedup.insert_key(rec[1], DEDUP_DONE, rec[2], rec[3])
            elif kind == N.REC_CURSOR:
                # The device acknowledged on the peer: it resumes here from there.
                known = self.known.get(rec[1])
                if known is not None:
                    ent = known.setdefault(rec[2], [0, 0])
                    ent[0], ent[1] = max(ent[0], rec[3]), max(ent[1], rec[4])
            kept.append(rec)
        self.store.apply(kept, last_lsn, lambda results: self._applied(kept, results, done))
        # Our copies that lost to the peer's go after the peer's is queued: the writer commits
        # in order, so there is never a moment with neither on disk.
        for user, own, size in drop:
            self._delete_stored(user, self._mailbox(user), own, size)

    def _keep_peer_copy(
        self,
        user: str,
        seq: int,
        sender: str,
        msg_id: str,
        size: int,
        state: int,
        drop: list[tuple[str, int, int]],
    ) -> bool:
        """The peer's PUT ``seq`` of a message this node has a copy of its own of (or had):
        whether to apply it. Both nodes decide alike, so the pair keeps one copy: the lower
        seq of two stored ones; the stored one over a live delivery; none if it was already
        delivered and acknowledged here. A losing own copy is appended to ``drop``."""
        key = (sender, msg_id)
        own: int | None = None
        for conn in self._sessions_of(user):
            inflight = conn.inflight
            if not inflight:
                continue
            for i, (tag, r) in enumerate(inflight):
                if r[1] == sender and r[2] == msg_id:
                    if not r[5]:
                        # Delivered live, not acknowledged yet: the peer's copy becomes the
                        # durable one, the device's ack deletes it, and the sender (waiting for
                        # that ack) is ACKed once the copy is durable here.
                        inflight[i] = (tag, (seq, sender, msg_id, r[3], r[4], True))
                        self._repl_pending[key] = P.ACK_STORED
                        return True
                    own = r[0]
                    break
            if own is not None:
                break
        if own is None:
            queued = self._queued.get(key)
            if queued is not None and queued[0] == user:
                own = queued[1]
        if own is None:
            own = self._stored_copy(user, sender, msg_id)
            mb = self.mailboxes.get(user)
            if own is not None and mb is not None and mb.deleting and own in mb.deleting:
                own = None  # acknowledged, its deletion queued: as good as gone
                state = DEDUP_DONE
        if own == seq:
            return False  # this very record was applied before
        if own is None and state != DEDUP_DONE:
            # Pending, yet no copy of ours for this recipient: not the resend race (the same
            # msg_id sent to another recipient breaks the protocol). Keep the peer's copy:
            # nothing is lost.
            return True
        if own is None:
            # Ours was delivered and acknowledged already: the peer's copy must go too. The
            # DEL (of a key absent here) travels to the peer in our stream.
            self.store.delete(user, seq)
            return False
        if own < seq:
            return False  # ours stays; the peer drops its copy when ours reaches it
        for conn in self._sessions_of(user):
            if conn.inflight:
                for i, (tag, r) in enumerate(conn.inflight):
                    if r[0] == own:
                        conn.inflight[i] = (tag, (seq,) + r[1:])
                        break
        mb = self._mailbox(user)
        if mb.acks and own in mb.acks:
            mb.acks[seq] = mb.acks.pop(own)
        drop.append((user, own, size))
        return True

    def _stored_copy(self, user: str, sender: str, msg_id: str) -> int | None:
        """Seq of the committed copy of (sender, msg_id) in ``user``'s mailbox, if any (a scan:
        only run when both nodes took one message, which a resend across nodes causes)."""
        start = 0
        while True:
            page = self.store.read(user, start, 256)
            for seq, s, m, _ts, _body in page:
                if s == sender and m == msg_id:
                    return seq
            if len(page) < 256:
                return None
            start = page[-1][0] + 1

    def _applied(
        self, records: list[ReplRecord], results: list[bool], done: Callable[[], None]
    ) -> None:
        for rec, changed in zip(records, results, strict=True):
            kind = rec[0]
            if kind == N.REC_DEDUP or kind == N.REC_CURSOR:
                continue
            user, seq = rec[1], rec[2]
            mb = self.mailboxes.get(user)
            if kind == N.REC_PUT:
                sender, msg_id = rec[4], rec[5]
                # Done only now that it is durable here too (a resend is ACKed no earlier).
                self.dedup.mark_done(sender, msg_id)
                flags = self._repl_pending.pop((sender, msg_id), 0)
                if flags:
                    self._complete(sender, msg_id, flags)
                if mb is not None:
                    if mb.uncommitted is not None:
                        mb.uncommitted.discard(seq)
                    if not changed:
                        mb.count -= 1
                        mb.bytes = max(mb.bytes - len(rec[6]), 0)
                for conn in self._sessions_of(user):
                    if seq < conn.cursor and not _in_flight(conn, seq):
                        conn.cursor = seq
                if user in self.sessions:
                    self._schedule_pump(user)
            elif changed and mb is not None and not (mb.deleting and seq in mb.deleting):
                # (A deletion of ours still queued was counted when it was queued.)
                mb.bytes = max(mb.bytes - _average(mb), 0)
                mb.count = max(mb.count - 1, 0)
                if mb.acks:
                    # Gone for every device: a device leaving later must not delete it again.
                    mb.acks.pop(seq, None)
                self._gone_by_peer(user, seq)
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
            try:
                conn.flush()
            except Exception as exc:  # noqa: BLE001 - one connection's failure stays its own
                self.on_flush_error(conn, exc)

    def on_flush_error(self, conn: Connection, exc: BaseException) -> None:
        """Writing one connection's frames failed (a server bug: every frame the server makes
        is encodable): drop that connection only; its unacknowledged deliveries are stored and
        delivered again at the next login."""
        log.error("writing to %s (user %r) failed; cutting it: %r", conn.peer, conn.user, exc)
        self.stats.rejected("write_failed")
        self._detach(conn)
        conn.cut()

    # ---- housekeeping (driven by a timer in serve.py) --------------------------------------------

    def sweep(self, now: float) -> None:
        """Close connections that never logged in; hibernate idle ones."""
        timeout = self.config.login_timeout
        for conn in [c for c in self.unauthenticated if now - c.opened_at > timeout]:
            self.stats.login_timeouts += 1
            self.fatal(conn, P.E_LOGIN_TIMEOUT, f"no LOGIN within {timeout:g} s")
        if self.login_limiter is not None:
            self.login_limiter.prune()
        self._resume_store_paused()
        if self.reads_paused and now - self._reads_paused_at > WRITE_STALL_S:
            self._check_write_pressure()
            if self.reads_paused and self._write_paused:
                hog = max(self._write_paused, key=self._write_paused.__getitem__)
                self._cut_slow_reader(
                    hog, self._write_paused[hog],
                    f"reads paused {WRITE_STALL_S:g} s for --max-pending-writes; it holds most",
                )  # fmt: skip
                self._reads_paused_at = now
                self._check_write_pressure()
        idle_after = self.config.hibernate_after
        for conn in self.connections:
            if now - conn.last_active > idle_after:
                conn.hibernate()
        if self.user_buckets:
            self._prune_user_buckets(now)
        if len(self.mailboxes) - len(self.sessions) > self._mailbox_cache:
            # What insertions left (mailboxes whose puts were not durable yet), once a second.
            self.evict_mailboxes(scan=EVICT_SCAN * 64)

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


def _sender_over_text(
    to: str, mb: Mailbox, sender: str, nbytes: int, lim: int, blim: int
) -> str | None:
    used = mb.senders.get(sender) if mb.senders is not None else None
    if used is None:
        return None
    if lim and used[0] >= lim:
        return (f"mailbox of {to!r} holds {used[0]} messages from {sender!r}, the per-sender "
                f"limit (--mailbox-per-sender-limit {lim})")  # fmt: skip
    if blim and used[1] + nbytes > blim:
        return (f"mailbox of {to!r} holds {used[1]} bytes from {sender!r}; this message "
                f"would pass the per-sender limit of {blim} "
                "(--mailbox-per-sender-max-bytes)")  # fmt: skip
    return None


def _routed_size(frame: tuple) -> int:
    """Bytes a forwarded ROUTE_SEND holds: its body, ids and a small header."""
    return len(frame[6]) + len(frame[3]) + len(frame[4]) + len(frame[5]) + 32


def _in_flight(conn: Connection, seq: int) -> bool:
    return bool(conn.inflight) and any(r[0] == seq for _tag, r in conn.inflight)


def _average(mb: Mailbox) -> int:
    """Body size to subtract for a deletion whose size is not at hand (a replicated DEL)."""
    return mb.bytes // mb.count if mb.count else mb.bytes
