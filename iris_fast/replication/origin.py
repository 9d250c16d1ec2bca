"""The origin side of one worker's replication stream: log out, acks back, degraded mode.

Every mailbox change of the worker is logged with the next LSN of its stream (storage does that
in the same transaction as the change). Once committed locally the records go to the peer in
``REPL_APPEND`` frames, straight from memory in the steady state, from the LMDB log while
catching up. A client's ``ACK`` for a stored message waits for the peer's ``REPL_ACK`` covering
the message's record: that is the synchronous replication of DESIGN.md. Without a healthy link
(the peer is down, or it is still catching up) ACKs go out after the local commit with the
``ACK_DEGRADED`` flag, and the log keeps everything until the peer has acknowledged it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import iris_native as N

from iris_fast import protocol as P
from iris_fast.replication.link import ReplLink
from iris_fast.server.links import home_of
from iris_fast.storage.mailbox import LoggedRecord, MailboxStore, seq_tag

if TYPE_CHECKING:
    from iris_fast.replication.replicator import Replicator

log = logging.getLogger(__name__)

# Records per REPL_APPEND, bytes per catch-up read, records sent but not yet acknowledged.
BATCH_RECORDS = 2000
BATCH_BYTES = 4 << 20
WINDOW_RECORDS = 20_000
# Records kept in memory for sending while the link is up; beyond, they are read back from LMDB.
UNSENT_CAP = 50_000
CONNECT_TIMEOUT_S = 1.0
# Bit 15 of REPL_APPEND.stream marks a chunk of a full copy (docs/replication.md, "Full copy").
SNAPSHOT_STREAM = 0x8000
# Bytes a full copy leaves queued on the link's socket before it waits for it to drain.
SNAPSHOT_BUFFER = 8 << 20
REDIAL_S = 0.2


class OriginStream:
    """This worker's stream going to the peer."""

    def __init__(self, repl: Replicator, store: MailboxStore) -> None:
        self.repl = repl
        self.store = store
        self.index = repl.index
        self.committed = store.lsn  # every logged record is committed when we start
        self.sent = 0
        self.acked = 0
        self.peer_applied = 0  # from the peer's heartbeats
        self.link: ReplLink | None = None  # ready (HELLOs exchanged)
        self._pending: ReplLink | None = None  # connected, HELLO not answered yet
        self.unsent: deque[LoggedRecord] = deque()
        self.waiters: deque[tuple[int, Callable[[int], None]]] = deque()
        self.commits: deque[tuple[int, float]] = deque()  # (last lsn, monotonic) per batch
        self.catching_up = False
        self.catchup_target = 0
        self.catchup_started = 0.0
        self._progress_at = 0
        # The stream's identity in HELLO: the peer's applied LSN means something only if it
        # counts in this epoch (docs/replication.md, "Stream identity").
        self.epoch = store.stream_epoch()
        # A full copy in progress: its LSN, phase (0 mailboxes then device cursors, 1 end marker
        # to send, 2 waiting for the peer's ACK of it) and the key to continue after.
        self.snapshot_lsn: int | None = None
        self._snap_phase = 0
        self._snap_after = b""
        self._snap_cursors = False
        self._snap_started = 0.0
        self.full_copies = 0
        self.snapshot_records = 0
        # Set while records are logged with no link: the peer cannot have them; both sides
        # having such records when the link heals is a split brain (see replica.py).
        self.wrote_while_apart = False
        self.records_sent = 0
        self.bad_acks = 0
        self.appends_sent = 0
        self.degraded_acks = 0
        self.peer_losses = 0
        self.catchup_records = 0
        self._closed = False
        self._task: asyncio.Task | None = None
        store.on_logged = self.on_logged

    # ---- state ------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """The peer is up and has everything but what is in flight: ACKs wait for it."""
        return self.link is not None and not self.catching_up

    def lag_records(self) -> int:
        return max(self.committed - self.acked, 0)

    def lag_ms(self) -> float:
        for lsn, at in self.commits:
            if lsn > self.acked:
                return (time.monotonic() - at) * 1000.0
        return 0.0

    # ---- dialing ----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._dial_loop())

    async def _dial_loop(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.repl.peer
        while not self._closed:
            if self.link is None and self._pending is None:
                try:
                    _, link = await asyncio.wait_for(
                        loop.create_connection(lambda: ReplLink(self), host, port),
                        CONNECT_TIMEOUT_S,
                    )
                except (TimeoutError, OSError):
                    link = None
                # The peer may have closed it before create_connection returned (a hand-off
                # to a worker that is still starting): then connection_lost already ran.
                if link is not None and link.transport is not None and not self._closed:
                    self._pending = link
                    flags = N.HELLO_SPLIT if self.wrote_while_apart else 0
                    link.send(
                        (N.REPL_HELLO, N.REPL_VERSION, self.repl.node_id, self.epoch,
                         self.repl.workers, flags, [(self.index, self.committed)])
                    )  # fmt: skip
            await asyncio.sleep(REDIAL_S)

    # ---- frames from the peer ---------------------------------------------------------------

    def on_frame(self, link: ReplLink, f: tuple) -> None:
        t = f[0]
        if t == N.REPL_ACK:
            if link is self.link and f[1] == self.index:
                lsn = f[2]
                if lsn > self.sent:
                    # Trusting it would trim unsent records and ACK clients for them.
                    log.error(
                        "replication stream %d: the peer acknowledged LSN %d, beyond the %d we "
                        "sent; closing the link", self.index, lsn, self.sent,
                    )  # fmt: skip
                    self.bad_acks += 1
                    link.close()
                elif self.snapshot_lsn is None:
                    self.on_ack(lsn)
                elif lsn == self.snapshot_lsn and self._snap_phase == 2:
                    self._snapshot_done()
        elif t == N.REPL_HEARTBEAT:
            self.store.observe_clock_ms(f[1])
            for stream, lsn in f[2]:
                if stream == self.index:
                    self.peer_applied = lsn
        elif t == N.REPL_HELLO and link is self._pending:
            self._on_hello(link, f)
        else:
            log.error("replication: unexpected frame 0x%02x from the peer; closing", t)
            link.close()

    def _on_hello(self, link: ReplLink, f: tuple) -> None:
        _, version, node, epoch, workers, _flags, entries = f
        problem = self.repl.check_peer(version, node, workers)
        if problem is None and (len(entries) != 1 or entries[0][0] != self.index):
            problem = f"answer names streams {entries}, expected [{self.index}]"
        if problem is not None:
            self.repl.refuse(link, problem)
            return
        self._pending = None
        self.repl.peer_seen(node)
        applied = entries[0][1]
        if epoch == self.epoch and applied > self.committed:
            # Its LSNs beyond ours name records we no longer have (we lost commits, or run on an
            # older copy of our data): our next LSNs must not mean the same to both of us. A
            # new epoch, then a new HELLO, so the peer gets a full copy of the new history.
            self.epoch = self.store.renew_epoch()
            log.warning(
                "replication stream %d: peer %s has applied LSN %d, beyond our last LSN %d; "
                "new stream epoch %#x, reconnecting", self.index, node, applied, self.committed,
                self.epoch,
            )  # fmt: skip
            link.close()
            return
        why = self._full_copy_reason(epoch, applied)
        self.link = link
        link.ready = True
        self.repl.peer_node = node
        self.repl.peer_epoch = epoch
        self.unsent.clear()
        self.catchup_target = self.committed
        self.catchup_started = time.monotonic()
        if why is not None:
            # Never trim or ACK on a claim we cannot trust: copy the stream's mailboxes and
            # as they are now (LSN S), then continue from the log after S.
            self.full_copies += 1
            self.snapshot_lsn = self.sent = self.committed
            self._snap_phase = 0
            self._snap_after = b""
            self._snap_cursors = False
            self._snap_started = time.monotonic()
            self.snapshot_records = 0
            self.catching_up = True
            log.warning(
                "replication stream %d: sending peer %s a full copy at LSN %d: %s",
                self.index, node, self.snapshot_lsn, why,
            )  # fmt: skip
            self.repl.link_state_changed()
            self.pump()
            return
        self.sent = applied
        self.catching_up = self.committed > applied
        if self.catching_up:
            log.info(
                "replication stream %d: peer %s up, catching it up on %d records (LSN %d..%d)",
                self.index, node, self.committed - applied, applied + 1, self.committed,
            )  # fmt: skip
        else:
            log.info("replication stream %d: peer %s up, in sync at LSN %d", self.index, node,
                     applied)  # fmt: skip
        self.on_ack(applied)
        self.repl.link_state_changed()
        self.pump()

    def _full_copy_reason(self, epoch: int, applied: int) -> str | None:
        """Why the peer's applied LSN (from its HELLO) cannot be caught up from our log."""
        if epoch != self.epoch:
            return (
                f"it counts LSN {applied} in stream epoch {epoch:#x}, ours is {self.epoch:#x} "
                "(a new or replaced data directory on either side, or another pairing)"
            )
        if applied < self.acked:
            return (f"it has applied LSN {applied}, below the {self.acked} it acknowledged (it "
                    "runs on an older copy of its data directory)")  # fmt: skip
        if applied < self.committed:
            first = self.store.log_first()
            if not first or first > applied + 1:
                return (f"it has applied LSN {applied} and our log starts at "
                        f"{first or self.committed + 1}")  # fmt: skip
        return None

    def _snapshot_done(self) -> None:
        lsn = self.snapshot_lsn
        assert lsn is not None
        self.snapshot_lsn = None
        log.info(
            "replication stream %d: full copy complete at LSN %d (%d records) in %.2f s",
            self.index, lsn, self.snapshot_records, time.monotonic() - self._snap_started,
        )  # fmt: skip
        self.on_ack(lsn)

    def _pump_snapshot(self, link: ReplLink) -> None:
        """Send the next chunks of the full copy while the socket keeps up."""
        lsn = self.snapshot_lsn
        stream = self.index | SNAPSHOT_STREAM
        workers = self.repl.workers
        index = self.index

        def homed(user: str) -> bool:
            return home_of(user, workers) == index

        # PUTs only: applying one enters its (sender, msg_id) in the peer's dedup window. Dedup
        # entries alone are not copied: one for a message stored here after S would make the
        # peer drop that message's PUT when the log brings it, and a worker of the peer that
        # starts later would load those of other workers' users (docs/replication.md).
        while (self._snap_phase == 0 and link.transport is not None
               and link.transport.get_write_buffer_size() < SNAPSHOT_BUFFER):  # fmt: skip
            if self._snap_cursors:
                recs, nxt = self.store.read_snapshot_cursors(self._snap_after, homed,
                                                             BATCH_RECORDS)  # fmt: skip
            else:
                recs, nxt = self.store.read_snapshot(self._snap_after, homed, BATCH_RECORDS,
                                                     BATCH_BYTES)  # fmt: skip
            if recs:
                link.send((N.REPL_APPEND, stream, lsn, recs))
                self.snapshot_records += len(recs)
            if nxt is None and not self._snap_cursors:
                # Then the device cursors (docs/replication.md, "Full copy").
                self._snap_cursors = True
                self._snap_after = b""
            elif nxt is None:
                self._snap_phase = 1
            else:
                self._snap_after = nxt
            link.flush()
        if self._snap_phase == 1 and link.transport is not None:
            # The end marker: an empty chunk. The peer ACKs LSN S once the copy is durable.
            link.send((N.REPL_APPEND, stream, lsn, []))
            self._snap_phase = 2

    def on_ack(self, lsn: int) -> None:
        if lsn > self.acked:
            if self.catching_up:
                self.catchup_records += lsn - self.acked
            self.acked = lsn
            self.store.trim_log(lsn)
        waiters = self.waiters
        while waiters and waiters[0][0] <= self.acked:
            waiters.popleft()[1](0)
        commits = self.commits
        while commits and commits[0][0] <= self.acked:
            commits.popleft()
        if self.catching_up:
            if self.acked >= self.catchup_target:
                took = time.monotonic() - self.catchup_started
                log.info(
                    "replication stream %d: catch-up complete (LSN %d) in %.2f s; pair healthy",
                    self.index, self.acked, took,
                )  # fmt: skip
                self.catching_up = False
                self.repl.link_state_changed()
            elif self.acked - self._progress_at >= 10_000:
                self._progress_at = self.acked
                log.info(
                    "replication stream %d: catch-up at LSN %d of %d",
                    self.index, self.acked, self.catchup_target,
                )  # fmt: skip
        self.pump()

    def link_lost(self, link: ReplLink) -> None:
        if link is self._pending:
            self._pending = None
            return
        if link is not self.link:
            return
        self.link = None
        self.snapshot_lsn = None
        if self.committed > self.acked:
            # These records now exist on this side only, like writes made while apart.
            self.wrote_while_apart = True
        self.unsent.clear()
        self.sent = self.acked
        self.catching_up = False
        self.peer_losses += 1
        if not self._closed:
            log.warning(
                "replication stream %d: peer lost; running degraded (%d records not yet on it)",
                self.index, self.lag_records(),
            )  # fmt: skip
        # What waited for the peer is durable here and stays in the log: ACK it degraded.
        waiters, self.waiters = self.waiters, deque()
        self.degraded_acks += len(waiters)
        for _lsn, cb in waiters:
            cb(P.ACK_DEGRADED)
        self.repl.link_state_changed()

    # ---- records out ------------------------------------------------------------------------

    def on_logged(self, records: list[LoggedRecord]) -> None:
        """Storage committed a batch (called on the loop, in LSN order)."""
        self.committed = records[-1][0]
        self.commits.append((self.committed, time.monotonic()))
        if len(self.commits) > 100_000:
            self.commits.popleft()
        if self.link is None:
            self.wrote_while_apart = True
            return
        if len(self.unsent) < UNSENT_CAP and self.snapshot_lsn is None:
            # (During a full copy they wait in the log: a copy can take long.)
            self.unsent.extend(records)
        self.pump()

    def pump(self) -> None:
        """Send what the peer lacks, within the window."""
        link = self.link
        if link is None:
            return
        if self.snapshot_lsn is not None:
            self._pump_snapshot(link)
            return
        unsent = self.unsent
        while self.sent < self.committed and self.sent - self.acked < WINDOW_RECORDS:
            while unsent and unsent[0][0] <= self.sent:
                unsent.popleft()
            first = self.sent + 1
            if unsent and unsent[0][0] == first:
                batch = []
                nxt = first
                size = 0
                # Bounded in bytes too: one group commit of large messages can exceed a frame.
                while (unsent and unsent[0][0] == nxt and len(batch) < BATCH_RECORDS
                       and size < BATCH_BYTES):  # fmt: skip
                    rec = unsent.popleft()[1]
                    batch.append(rec)
                    size += record_size(rec)
                    nxt += 1
            else:
                upto = unsent[0][0] - 1 if unsent else self.committed
                logged = self.store.read_log(first, min(BATCH_RECORDS, upto - self.sent),
                                             BATCH_BYTES)  # fmt: skip
                if not logged or logged[0][0] != first:
                    log.error(
                        "replication stream %d: LSN %d is not in the log (it starts at %d); "
                        "the peer needs a full copy of the data directory",
                        self.index, first, logged[0][0] if logged else self.store.log_first(),
                    )  # fmt: skip
                    link.close()
                    return
                batch = [rec for _lsn, rec in logged]
            link.send((N.REPL_APPEND, self.index, first, batch))
            self.sent = first + len(batch) - 1
            self.records_sent += len(batch)
            self.appends_sent += 1

    def when_replicated(self, lsn: int, cb: Callable[[int], None]) -> None:
        """Run ``cb(flags)`` once record ``lsn`` (committed here) is durable on the peer:
        ``flags`` is 0, or ``ACK_DEGRADED`` if the peer is not there to wait for."""
        if lsn <= self.acked:
            cb(0)
        elif self.healthy:
            self.waiters.append((lsn, cb))
        else:
            self.degraded_acks += 1
            cb(P.ACK_DEGRADED)

    # ---- liveness ---------------------------------------------------------------------------

    def tick(self, now: float, timeout: float, beat: bool) -> None:
        for link in (self.link, self._pending):
            if link is not None and link.transport is None:
                self.link_lost(link)
            elif link is not None and now - link.last_rx > timeout:
                log.warning(
                    "replication stream %d: nothing from the peer for %.1f s; dropping the link",
                    self.index, now - link.last_rx,
                )  # fmt: skip
                link.close()
        if self.snapshot_lsn is not None and self._snap_phase < 2:
            self.pump()  # in case the socket drained without telling us
        if beat and self.link is not None:
            self.link.send((N.REPL_HEARTBEAT, self.store.seq_clock_ms(),
                            [(self.index, self.committed)]))  # fmt: skip

    def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        for link in (self.link, self._pending):
            if link is not None:
                link.flush()
                link.close()

    async def settle(self, timeout: float) -> bool:
        """Wait (SIGTERM) until the peer has every committed record, up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.link is not None and self.acked < self.committed:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return self.acked >= self.committed


def record_size(rec: tuple) -> int:
    """An upper bound of a record's encoded size (str8 fields count at most 255 bytes)."""
    if rec[0] == N.REC_PUT:
        return len(rec[6]) + 3 * 256 + 21
    if rec[0] == N.REC_DEL:
        return 256 + 9
    if rec[0] == N.REC_CURSOR:
        return 2 * 256 + 17
    return 25


def peer_problem(own_node: str, own_workers: int, version: int, node: str, workers: int
                 ) -> str | None:  # fmt: skip
    """Why a peer's HELLO cannot be accepted (None: it can)."""
    if version != N.REPL_VERSION:
        return f"replication protocol version {version}; this node speaks {N.REPL_VERSION}"
    if node == own_node:
        return f"the peer has our node id {node!r}; give each node its own --node-id"
    if workers != own_workers:
        return (f"the peer runs {workers} workers and this node {own_workers}; a pair needs "
                "the same --workers on both nodes")  # fmt: skip
    if seq_tag(node) == seq_tag(own_node):
        return (f"node ids {own_node!r} and {node!r} map to the same sequence tag; rename one "
                "(docs/replication.md, Sequence numbers)")  # fmt: skip
    return None
