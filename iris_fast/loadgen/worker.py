"""One worker process: a swarm of raw-protocol connections on a uvloop loop.

The worker logs in its share of users, waits for the parent's GO, then either holds the
connections idle or sends paced SENDs from random local users to random users of the whole
run. It acknowledges every delivery (cumulatively, once per read batch), records what was
ACKed and what was delivered as bitmaps indexed by the sender process's sequence number, and
hands everything to the parent at the end.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import random
import socket
import ssl
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import iris_native as nat
from hdrh.histogram import HdrHistogram

from iris_fast.loadgen import shared as sh
from iris_fast.loadgen.pacing import TokenBucket
from iris_fast.loadgen.plan import LoadPlan, raise_nofile_limit
from iris_fast.protocol import E_SHUTTING_DOWN, ERROR_NAMES

# Linux: choose the source port at connect(), not bind() (see _connect_from).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
LATENCY_MIN_US = 1
LATENCY_MAX_US = 60_000_000
LATENCY_DIGITS = 3
MAX_PENDING_CONNECTS = 512  # more half-open handshakes only overflow the server's backlog
CONNECT_TIMEOUT_S = 15.0
TICK_S = 0.002  # send pacing granularity
PUBLISH_S = 0.05  # how often counters are copied to shared memory
MAX_FRAME = 16 * 1024 * 1024  # client-side decoder limit; the server's limit is announced
CONNECT_ATTEMPTS = 5  # per user, for failures the server says are transient
RETRY_BACKOFF_S = 0.1  # doubled per attempt, with jitter


class LoginRefused(ConnectionError):
    """The server answered LOGIN with ERROR ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"login refused ({ERROR_NAMES.get(code, code)}): {reason}")
        self.code = code


def _transient(exc: BaseException) -> bool:
    """Failures worth another connect: the node is (re)starting a worker or shedding load."""
    if isinstance(exc, LoginRefused):
        return exc.code == E_SHUTTING_DOWN  # protocol.md: "the client fails over or retries"
    return isinstance(exc, (ConnectionRefusedError, ConnectionResetError, TimeoutError))


def new_histogram() -> HdrHistogram:
    """A latency histogram in µs, 1 µs..60 s, 3 significant digits."""
    return HdrHistogram(LATENCY_MIN_US, LATENCY_MAX_US, LATENCY_DIGITS)


def _set_bit(bitmap: bytearray, index: int) -> bool:
    """Set bit ``index`` (growing the bitmap); return whether it was already set."""
    byte = index >> 3
    if byte >= len(bitmap):
        bitmap.extend(bytes(max(byte + 1 - len(bitmap), len(bitmap))))
    mask = 1 << (index & 7)
    if bitmap[byte] & mask:
        return True
    bitmap[byte] |= mask
    return False


@dataclass
class Tally:
    """What one worker observed; becomes the result dict sent to the parent."""

    conn_ok: int = 0
    conn_failed: int = 0
    connect_failures: Counter = field(default_factory=Counter)
    connect_retries: int = 0
    retry_reasons: Counter = field(default_factory=Counter)
    disconnects: int = 0
    sent: int = 0
    acked: int = 0
    ack_stored: int = 0
    ack_duplicate: int = 0
    ack_unknown: int = 0
    send_failed: int = 0
    delivered: int = 0
    duplicated: int = 0
    foreign: int = 0
    errors: Counter = field(default_factory=Counter)
    acked_bits: bytearray = field(default_factory=bytearray)
    delivered_bits: dict[int, bytearray] = field(default_factory=dict)
    ack_hist: HdrHistogram = field(default_factory=new_histogram)
    deliver_hist: HdrHistogram = field(default_factory=new_histogram)


class LoadConn(asyncio.Protocol):
    """One client connection: logs in, answers PINGs, acks deliveries, reports frames."""

    __slots__ = ("swarm", "index", "transport", "decoder", "login", "alive", "logged_in")

    def __init__(self, swarm: Swarm, index: int) -> None:
        self.swarm = swarm
        self.index = index
        self.transport: asyncio.Transport | None = None
        self.decoder = nat.Decoder(MAX_FRAME)
        self.login: asyncio.Future = swarm.loop.create_future()
        self.alive = False
        self.logged_in = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # noqa: D102
        self.transport = transport  # type: ignore[assignment]
        self.alive = True
        sw = self.swarm
        transport.write(nat.encode((nat.LOGIN, 1, sw.names[self.index], sw.token(self.index))))

    def data_received(self, data: bytes) -> None:  # noqa: D102
        sw = self.swarm
        out: list[tuple] = []
        tag = 0
        for f in self.decoder.feed(data):
            t = f[0]
            if t == nat.DELIVER:
                tag = f[1]
                sw.on_deliver(f)
            elif t == nat.ACK:
                sw.on_ack(f)
            elif t == nat.PING:
                out.append((nat.PONG, f[1]))
            elif t == nat.LOGIN_OK:
                self.logged_in = True
                if not self.login.done():
                    self.login.set_result(None)
            elif t == nat.ERROR:
                sw.on_error(self, f)
            elif t == nat.DECODE_ERROR:
                # The stream cannot be trusted any more: count it and drop the connection.
                sw.tally.errors["client_decode_error"] += 1
                self.transport.abort()  # type: ignore[union-attr]
                return
        if tag:
            # Cumulative: one DELIVER_ACK per read batch covers every delivery in it.
            out.append((nat.DELIVER_ACK, tag))
        if out:
            self.transport.write(nat.encode_batch(out))  # type: ignore[union-attr]

    def timed_out(self) -> None:
        """No LOGIN_OK within CONNECT_TIMEOUT_S: fail the attempt and drop the socket."""
        if not self.login.done():
            self.login.set_exception(TimeoutError())
            if self.transport is not None:
                self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        was_up = self.logged_in and self.alive
        self.alive = False
        if not self.login.done():
            # A refused or reset connect arrives here (the socket was still connecting).
            self.login.set_exception(
                exc if isinstance(exc, OSError) else ConnectionError("closed before LOGIN_OK")
            )
        if was_up and not self.swarm.closing:
            # We never reconnect: a connection the server dropped is an error of the run.
            self.swarm.tally.disconnects += 1
            self.swarm.tally.errors["disconnected"] += 1


class Swarm:
    """All connections of one worker process and the run's phases."""

    def __init__(self, plan: LoadPlan, proc: int, counters: Any, control: Any) -> None:
        self.plan = plan
        self.proc = proc
        self.proc_prefix = f"{proc}."
        self.counters = counters
        self.base = proc * sh.COUNTER_SLOTS
        self.control = control
        self.loop = asyncio.get_running_loop()
        self._ssl: ssl.SSLContext | None = None
        self.names = [plan.user(i) for i in range(plan.connections)]
        self.conns: list[LoadConn] = []
        self.tally = Tally()
        self.pending: dict[int, int] = {}  # seq -> send time (ns) of unACKed SENDs
        self.closing = False
        self.connect_seconds = 0.0
        self.send_seconds = 0.0
        self.rng = random.Random()
        self._server_addr = (plan.host, plan.port)
        self._tokens: dict[int, str] | None = None
        if plan.token_secret:
            from iris_fast.server.auth import mint_token

            ttl = plan.hard_deadline_s + 3600
            self._tokens = {
                i: mint_token(self.names[i], plan.token_secret, ttl) for i in plan.local_users(proc)
            }

    # -- frames ---------------------------------------------------------------------------

    def token(self, index: int) -> str:
        """The LOGIN token of user ``index`` (empty in open mode)."""
        return self._tokens[index] if self._tokens else ""

    def on_ack(self, f: tuple) -> None:
        """ACK(msg_id, flags): latency, flags, and the ACKed bit of its sequence number."""
        t = self.tally
        msg_id = f[1]
        if not msg_id.startswith(self.proc_prefix):
            t.ack_unknown += 1
            return
        try:
            seq = int(msg_id[len(self.proc_prefix) :])
        except ValueError:
            t.ack_unknown += 1
            return
        sent_ns = self.pending.pop(seq, None)
        if sent_ns is None:
            t.ack_unknown += 1  # a second ACK for one SEND, or one we never sent
            return
        flags = f[2]
        if flags & nat.ACK_STORED:
            t.ack_stored += 1
        if flags & nat.ACK_DUPLICATE:
            t.ack_duplicate += 1
        t.acked += 1
        _set_bit(t.acked_bits, seq)
        us = (sh.mono_ns() - sent_ns) // 1000
        t.ack_hist.record_value(min(max(us, LATENCY_MIN_US), LATENCY_MAX_US))

    def on_deliver(self, f: tuple) -> None:
        """DELIVER(tag, ts, sender, msg_id, body): dedup by (source proc, seq), latency."""
        t = self.tally
        msg_id = f[4]
        src, dot, seq_text = msg_id.partition(".")
        try:
            src_proc = int(src)
            seq = int(seq_text)
        except ValueError:
            dot = ""
        if not dot or not f[3].startswith(self.plan.user_prefix):
            t.foreign += 1  # not a message of this run (e.g. left in a mailbox by another)
            return
        bits = t.delivered_bits.get(src_proc)
        if bits is None:
            bits = t.delivered_bits[src_proc] = bytearray()
        if _set_bit(bits, seq):
            # msg_ids are unique per run, so the same one twice is an application-level dup.
            t.duplicated += 1
            return
        t.delivered += 1
        body = f[5]
        us = (sh.mono_ns() - int.from_bytes(body[:8], "big")) // 1000
        t.deliver_hist.record_value(min(max(us, LATENCY_MIN_US), LATENCY_MAX_US))

    def on_error(self, conn: LoadConn, f: tuple) -> None:
        """ERROR(code, msg_id, reason): count by code; a failed SEND leaves the pending set."""
        code, msg_id = f[1], f[2]
        if not conn.logged_in:
            # A refused LOGIN is a connect failure (or retry), counted by connect_one.
            if not conn.login.done():
                conn.login.set_exception(LoginRefused(code, f[3]))
            return
        self.tally.errors[ERROR_NAMES.get(code, f"code_{code}")] += 1
        if msg_id.startswith(self.proc_prefix):
            try:
                seq = int(msg_id[len(self.proc_prefix) :])
            except ValueError:
                return
            if self.pending.pop(seq, None) is not None:
                self.tally.send_failed += 1

    # -- shared counters ------------------------------------------------------------------

    def publish(self, phase: int | None = None) -> None:
        """Copy the live counters to this worker's row of shared memory."""
        c, b, t = self.counters, self.base, self.tally
        c[b + sh.CONN_OK] = t.conn_ok
        c[b + sh.CONN_FAILED] = t.conn_failed
        c[b + sh.SENT] = t.sent
        c[b + sh.ACKED] = t.acked
        c[b + sh.DELIVERED] = t.delivered
        c[b + sh.SEND_FAILED] = t.send_failed
        c[b + sh.ERRORS] = sum(t.errors.values())
        c[b + sh.DUPLICATED] = t.duplicated
        if phase is not None:
            c[b + sh.PHASE] = phase

    async def publisher(self) -> None:
        """Publish counters every PUBLISH_S until cancelled."""
        while True:
            self.publish()
            await asyncio.sleep(PUBLISH_S)

    def stopped(self) -> bool:
        """Whether the parent asked everyone to stop."""
        return bool(self.control[sh.CTL_STOP])

    # -- phases ---------------------------------------------------------------------------

    def _connect_from(self, src: str | None) -> socket.socket:
        """A socket connecting (non-blocking) from source address ``src`` (None: any).

        IP_BIND_ADDRESS_NO_PORT lets the kernel choose the source port at connect time from
        the whole 4-tuple, instead of at bind time from ports free on ``src`` alone: without it
        binding slows from ~10 µs to several ms once ~14,000 ports of one address are taken.

        A plain ``connect_ex``, not ``loop.sock_connect``: that one resolves the address again
        through ``socket.getaddrinfo`` on every call (IDNA encoding, enum conversions), which
        was a third of the load generator's CPU per connection. The socket goes to the
        transport still connecting: a write before the handshake ends is queued by the kernel's
        EAGAIN like any other, and a refused connect reaches the protocol as its error.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if src is not None:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((src, 0))
            err = sock.connect_ex(self._server_addr)
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
        except BaseException:
            sock.close()
            raise
        return sock

    def _tls_context(self) -> ssl.SSLContext | None:
        if not self.plan.tls:
            return None
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=self.plan.tls_ca)
        return self._ssl

    async def connect_one(self, index: int, deadline: float) -> None:
        """Connect and log in user ``index`` (retrying transient failures); count the outcome."""
        src = self.plan.source_ip(index)
        t = self.tally
        for attempt in range(CONNECT_ATTEMPTS):
            conn = LoadConn(self, index)
            # One timer per attempt (cheaper than asyncio.timeout()): it fails the login.
            timer = self.loop.call_later(CONNECT_TIMEOUT_S, conn.timed_out)
            try:
                tls = self._tls_context()
                hostname = self.plan.host if tls else None
                sock = self._connect_from(src)
                try:
                    await self.loop.create_connection(
                        lambda c=conn: c, sock=sock, ssl=tls, server_hostname=hostname
                    )
                except BaseException:
                    sock.close()
                    raise
                await conn.login
            except (OSError, TimeoutError, ConnectionError) as exc:
                if conn.transport is not None:
                    conn.transport.abort()
                pause = RETRY_BACKOFF_S * (2**attempt) * (0.5 + self.rng.random())
                if (
                    not _transient(exc)
                    or attempt + 1 == CONNECT_ATTEMPTS
                    or self.loop.time() + pause > deadline
                    or self.stopped()
                ):
                    t.conn_failed += 1
                    t.connect_failures[_reason(exc)] += 1
                    return
                t.connect_retries += 1
                t.retry_reasons[_reason(exc)] += 1
                await asyncio.sleep(pause)
                continue
            finally:
                timer.cancel()
            t.conn_ok += 1
            self.conns.append(conn)
            return

    async def connect_all(self) -> None:
        """Open this worker's connections, at most ``connect_rate``/s and MAX_PENDING at once."""
        plan = self.plan
        start = self.loop.time()
        deadline = start + plan.connect_cap
        bucket = TokenBucket(plan.connect_rate, plan.connect_rate * 0.01, start)
        todo = list(plan.local_users(self.proc))
        tasks: set[asyncio.Task] = set()
        pos = 0
        while pos < len(todo) and self.loop.time() < deadline and not self.stopped():
            room = MAX_PENDING_CONNECTS - len(tasks)
            n = bucket.take(self.loop.time(), min(room, len(todo) - pos))
            for index in todo[pos : pos + n]:
                task = self.loop.create_task(self.connect_one(index, deadline))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            pos += n
            await asyncio.sleep(max(TICK_S, bucket.seconds_until_next()) if n == 0 else 0)
        if tasks:
            await asyncio.wait(set(tasks), timeout=max(0.0, deadline - self.loop.time()) + 1)
        never = len(todo) - pos
        if never:
            self.tally.conn_failed += never
            self.tally.connect_failures["connect phase cap reached"] += never
        self.connect_seconds = self.loop.time() - start

    async def wait_go(self) -> int:
        """Wait for the parent's GO; return the shared start time (monotonic ns), 0 if stopped."""
        limit = self.loop.time() + self.plan.connect_cap + 30
        while not self.control[sh.CTL_GO]:
            if self.stopped() or self.loop.time() > limit:
                return 0
            await asyncio.sleep(0.01)
        return int(self.control[sh.CTL_START_NS])

    async def sleep_until_ns(self, when_ns: int) -> None:
        """Sleep until the monotonic time ``when_ns`` or until the parent says stop."""
        while not self.stopped():
            left = (when_ns - sh.mono_ns()) / 1e9
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.02))

    async def send_phase(self, start_ns: int) -> None:
        """Send paced SENDs until start + duration (this worker's share of the total rate)."""
        plan = self.plan
        end_ns = start_ns + int(plan.duration * 1e9)
        await self.sleep_until_ns(start_ns)
        senders = [c for c in self.conns if c.alive]
        rate = plan.rate / plan.procs
        # Credits accrue from the shared start time and the last take() happens at end_ns, so
        # an unstalled run sends exactly rate * duration messages. Burst of 50 ms: catches up
        # after a short stall without flooding after a long one.
        bucket = TokenBucket(rate, max(1.0, rate * 0.05), start_ns / 1e9)
        pad = b"\x00" * (plan.body_size - 8)
        names, n_users, proc_prefix = self.names, self.plan.connections, self.proc_prefix
        rand, pending, t = self.rng.random, self.pending, self.tally
        seq = 0
        while senders and not self.stopped():
            now = sh.mono_ns()
            last = now >= end_ns
            due = bucket.take(min(now, end_ns) / 1e9 + 1e-9)
            if due:
                body = now.to_bytes(8, "big") + pad
                batches: dict[LoadConn, list[tuple]] = {}
                for _ in range(due):
                    conn = senders[int(rand() * len(senders))]
                    if not conn.alive:
                        senders.remove(conn)  # dropped: counted in connection_lost
                        if not senders:
                            break
                        continue
                    # A random user of the whole run other than the sender itself.
                    to = int(rand() * (n_users - 1))
                    if to >= conn.index:
                        to += 1
                    pending[seq] = now
                    batch = batches.get(conn)
                    if batch is None:
                        batch = batches[conn] = []
                    batch.append((nat.SEND, proc_prefix + str(seq), names[to], body))
                    seq += 1
                for conn, frames in batches.items():
                    conn.transport.write(nat.encode_batch(frames))  # type: ignore[union-attr]
                t.sent = seq
            if last:
                break
            await asyncio.sleep(TICK_S)
        self.send_seconds = (sh.mono_ns() - start_ns) / 1e9

    async def main(self) -> dict:
        """Run every phase and return the result dict for the parent."""
        plan = self.plan
        pub = self.loop.create_task(self.publisher())
        try:
            self.publish(sh.PHASE_CONNECTING)
            # The cyclic GC kept re-walking every connection made so far: a sixth of the
            # connect phase's CPU. Off while connecting (what it creates lives to the end), then
            # one collection, and the survivors frozen out of later collections.
            gc.disable()
            try:
                await self.connect_all()
            finally:
                gc.collect()
                gc.freeze()
                gc.enable()
            self.publish(sh.PHASE_READY)
            start_ns = await self.wait_go()
            if start_ns:
                self.publish(sh.PHASE_RUNNING)
                if plan.idle:
                    await self.sleep_until_ns(start_ns + int(plan.duration * 1e9))
                else:
                    await self.send_phase(start_ns)
                self.publish(sh.PHASE_SENT)
                # Grace: keep reading (and acking) until the parent has seen everything
                # arrive, or the grace period ends.
                end = start_ns + int((plan.duration + plan.grace) * 1e9)
                await self.sleep_until_ns(end)
        finally:
            pub.cancel()
            self.closing = True
            self.publish(sh.PHASE_DONE)
        return self.result()

    def close_all(self) -> None:
        """Close every connection (the server sees ordinary disconnects)."""
        self.closing = True
        for c in self.conns:
            if c.transport is not None:
                c.transport.close()

    def result(self) -> dict:
        """The picklable result dict (bitmaps as bytes, histograms encoded)."""
        t = self.tally
        return {
            "proc": self.proc,
            "conn_ok": t.conn_ok,
            "conn_failed": t.conn_failed,
            "connect_failures": dict(t.connect_failures),
            "connect_retries": t.connect_retries,
            "retry_reasons": dict(t.retry_reasons),
            "disconnects": t.disconnects,
            "sent": t.sent,
            "acked": t.acked,
            "ack_stored": t.ack_stored,
            "ack_duplicate": t.ack_duplicate,
            "ack_unknown": t.ack_unknown,
            "send_failed": t.send_failed,
            "delivered": t.delivered,
            "duplicated": t.duplicated,
            "foreign": t.foreign,
            "errors": dict(t.errors),
            "acked_bits": bytes(t.acked_bits),
            "delivered_bits": {p: bytes(b) for p, b in t.delivered_bits.items()},
            "ack_hist": t.ack_hist.encode(),
            "deliver_hist": t.deliver_hist.encode(),
            "connect_seconds": self.connect_seconds,
            "send_seconds": self.send_seconds,
        }


def _reason(exc: BaseException) -> str:
    """A short, groupable description of a connect failure."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{type(exc).__name__} (errno {exc.errno})"
    return str(exc) or type(exc).__name__


def worker_main(plan: LoadPlan, proc: int, counters: Any, control: Any, results: Any) -> None:
    """Process entry point: run the swarm on uvloop and put its result dict on ``results``."""
    import uvloop

    raise_nofile_limit()

    async def go() -> dict:
        swarm = Swarm(plan, proc, counters, control)
        try:
            return await swarm.main()
        finally:
            swarm.close_all()
            await asyncio.sleep(0)  # let the transports start closing

    try:
        result = uvloop.run(go())
    except BaseException as exc:  # noqa: BLE001 - the parent must always hear back
        result = {"proc": proc, "fatal": f"{type(exc).__name__}: {exc}"}
        counters[proc * sh.COUNTER_SLOTS + sh.PHASE] = sh.PHASE_DONE
    results.put(result)
