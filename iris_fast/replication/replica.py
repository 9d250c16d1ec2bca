"""The receiving side of the peer's stream for this worker: apply, then acknowledge.

A ``REPL_APPEND`` is applied in one LMDB transaction with one fsync (the group commit of the
peer becomes one group commit here), together with the new applied LSN; only then does
``REPL_ACK`` go back. Records at or below what was already received are skipped, so a resend
after a reconnect is harmless; a gap closes the link (the peer's next HELLO says where to
resume).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import iris_native as N

from iris_fast.replication.link import ReplLink
from iris_fast.replication.origin import SNAPSHOT_STREAM

if TYPE_CHECKING:
    from iris_fast.replication.replicator import Replicator

log = logging.getLogger(__name__)


class ReplicaStream:
    """The peer's stream with this worker's index, applied to this node's storage."""

    def __init__(self, repl: Replicator) -> None:
        self.repl = repl
        self.index = repl.index
        self.applied = repl.store.applied  # durable
        # The peer's stream epoch that ``applied`` counts in (0: none), and the one of the link.
        self.epoch = repl.store.applied_epoch
        self.link_epoch = 0
        # A full copy being received on the current link: its LSN, chunks not yet durable,
        # whether its end marker came.
        self._snap_lsn: int | None = None
        self._snap_pending = 0
        self._snap_end = False
        self.full_copies = 0
        self.received = self.applied  # queued for applying
        self.peer_last = 0  # the peer's last LSN, from its HELLO and heartbeats
        self.link: ReplLink | None = None
        self.records_applied = 0
        self.appends_applied = 0
        self.split_brains = 0

    def lag_records(self) -> int:
        return max(self.peer_last - self.applied, 0)

    def on_hello(self, link: ReplLink, f: tuple) -> None:
        """An accepted link announced our stream: it becomes the one we apply from."""
        _, _version, node, epoch, _workers, flags, entries = f
        old = self.link
        self.link = link
        link.owner = self
        link.ready = True
        link.raw = None
        if old is not None and old is not link:
            log.info("replication: peer %s reconnected stream %d; dropping the old link",
                     node, self.index)  # fmt: skip
            old.close()
        # Not max(): after a new epoch the peer's LSNs may have gone back.
        self.peer_last = entries[0][1]
        self.link_epoch = epoch
        self._snap_lsn = None
        self._snap_pending = 0
        self._snap_end = False
        origin = self.repl.origin
        if flags & N.HELLO_SPLIT and origin is not None and origin.wrote_while_apart:
            self.split_brains += 1
            log.warning(
                "SPLIT BRAIN on stream %d: %s and this node both accepted writes while cut off "
                "from each other; merging (theirs from LSN %d, ours from LSN %d)",
                self.index, node, self.applied + 1, origin.acked + 1,
            )  # fmt: skip
        self.repl.peer_node = node
        self.repl.peer_epoch = epoch
        # Our answer's epoch says which history our applied LSN counts in; the origin decides
        # between catch-up from its log and a full copy.
        link.send(
            (N.REPL_HELLO, N.REPL_VERSION, self.repl.node_id, self.epoch, self.repl.workers,
             N.HELLO_SPLIT if origin is not None and origin.wrote_while_apart else 0,
             [(self.index, self.applied)])
        )  # fmt: skip
        log.info("replication stream %d: applying from peer %s after LSN %d (it has %d)",
                 self.index, node, self.applied, self.peer_last)  # fmt: skip
        self.repl.link_state_changed()

    def on_frame(self, link: ReplLink, f: tuple) -> None:
        if link is not self.link:
            link.close()
            return
        t = f[0]
        if t == N.REPL_APPEND:
            self._on_append(link, f[1], f[2], f[3])
        elif t == N.REPL_HEARTBEAT:
            self.repl.store.observe_clock_ms(f[1])
            for stream, lsn in f[2]:
                if stream == self.index:
                    self.peer_last = max(self.peer_last, lsn)
        else:
            log.error("replication: unexpected frame 0x%02x on an applying link; closing", t)
            link.close()

    def _on_append(self, link: ReplLink, stream: int, first: int, records: list) -> None:
        if stream == self.index | SNAPSHOT_STREAM:
            self._on_snapshot(link, first, records)
            return
        if stream != self.index:
            log.error("replication: APPEND of stream %d on the link of stream %d", stream,
                      self.index)  # fmt: skip
            link.close()
            return
        if self.link_epoch != self.epoch or self._snap_lsn is not None:
            log.error("replication stream %d: log records of epoch %#x before a full copy of it; "
                      "closing", self.index, self.link_epoch)  # fmt: skip
            link.close()
            return
        if not records:
            return
        last = first + len(records) - 1
        if first > self.received + 1:
            log.error("replication stream %d: gap (got LSN %d, expected %d); resyncing",
                      self.index, first, self.received + 1)  # fmt: skip
            link.close()
            return
        if last <= self.received:
            if self.received == self.applied:
                link.send((N.REPL_ACK, self.index, self.applied))
            return
        if first <= self.received:
            records = records[self.received - first + 1 :]
        store = self.repl.store
        for rec in records:
            if rec[0] == N.REC_PUT:
                # Even a PUT the worker drops as a duplicate is a seq the peer issued.
                store.observe_seq(rec[2])
        self.received = last
        self.peer_last = max(self.peer_last, last)
        epoch = self.epoch
        self.repl.worker.apply_replicated(
            records, last, lambda: self._applied(last, len(records), link, epoch)
        )

    def _applied(self, last: int, count: int, link: ReplLink, epoch: int) -> None:
        self.records_applied += count
        self.appends_applied += 1
        if epoch != self.epoch:
            return  # a full copy replaced that history meanwhile
        self.applied = max(self.applied, last)
        # The ACK is cumulative: it may go on a newer link of the same history (the origin
        # resent from our durable LSN and waits for these), never on one still being copied.
        cur = self.link
        if cur is not None and self.link_epoch == epoch and self._snap_lsn is None:
            cur.send((N.REPL_ACK, self.index, self.applied))

    def _on_snapshot(self, link: ReplLink, lsn: int, records: list) -> None:
        """A chunk of a full copy of the peer's stream at LSN ``lsn`` (empty: the end)."""
        if self._snap_lsn is None:
            self._snap_lsn = lsn
            log.warning("replication stream %d: receiving a full copy of %s's stream (epoch "
                        "%#x) at LSN %d", self.index, self.repl.peer_node, self.link_epoch,
                        lsn)  # fmt: skip
        if lsn != self._snap_lsn or self._snap_end or any(r[0] == N.REC_DEL for r in records):
            log.error("replication stream %d: malformed full copy (LSN %d, expected %d); "
                      "closing", self.index, lsn, self._snap_lsn)  # fmt: skip
            link.close()
            return
        if not records:
            self._snap_end = True
            self._snapshot_maybe_done(link)
            return
        self._snap_pending += 1
        self.peer_last = max(self.peer_last, lsn)
        # The applied LSN stays as it is until the whole copy is durable.
        self.repl.worker.apply_replicated(
            records, self.applied, lambda: self._snapshot_chunk_applied(link, len(records))
        )

    def _snapshot_chunk_applied(self, link: ReplLink, count: int) -> None:
        self.records_applied += count
        if link is not self.link:
            return
        self._snap_pending -= 1
        self._snapshot_maybe_done(link)

    def _snapshot_maybe_done(self, link: ReplLink) -> None:
        lsn = self._snap_lsn
        if not self._snap_end or self._snap_pending or lsn is None:
            return
        epoch = self.link_epoch

        def durable() -> None:
            # Memory follows the disk even if the link went meanwhile (a new HELLO then finds
            # the copy done); only the link that carried the copy gets its ACK.
            self.epoch = epoch
            self.applied = self.received = lsn
            self.full_copies += 1
            log.info("replication stream %d: full copy of epoch %#x applied up to LSN %d",
                     self.index, epoch, lsn)  # fmt: skip
            if link is self.link and self._snap_lsn == lsn:
                self._snap_lsn = None
                link.send((N.REPL_ACK, self.index, lsn))

        self.repl.store.set_applied(lsn, epoch, durable)

    def link_lost(self, link: ReplLink) -> None:
        if link is self.link:
            self.link = None
            self.repl.link_state_changed()

    def tick(self, now: float, timeout: float, beat: bool) -> None:
        link = self.link
        if link is None:
            return
        if now - link.last_rx > timeout:
            log.warning("replication stream %d: the peer went silent; dropping its link",
                        self.index)  # fmt: skip
            link.close()
            return
        if beat:
            link.send((N.REPL_HEARTBEAT, self.repl.store.seq_clock_ms(),
                       [(self.index, self.applied)]))  # fmt: skip

    def close(self) -> None:
        if self.link is not None:
            self.link.flush()
            self.link.close()
