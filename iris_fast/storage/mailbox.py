"""Durable mailboxes in LMDB, written by one group-commit thread.

Layout (one LMDB environment under ``<data-dir>/mailbox``):

* ``msgs``:  key ``user | 0x00 | seq u64 BE`` -> ``ts u64 | sender str8 | msg_id str8 | body``.
  Keys of one user sort by ``seq``, and ``seq`` comes from one node-wide counter that only grows,
  so a prefix scan yields a mailbox in arrival order.
* ``dedup:<worker>`` (one per worker: a restart reloads its own only): key ``ts_ms u64 BE |
  xxh3-128 of (sender, msg_id) | xxh3-64 of sender u64 BE`` -> empty. Time-ordered so that
  pruning the window is a range delete from the front and reloading it is one scan; the sender
  hash lets a reload put each entry back in its sender's share of the window, and the keys are
  exactly ``DedupWindow.load``'s records, so a reload joins them with no per-entry Python.
  ``dedup`` is the table all workers shared before issue 10 (``ts | key16`` keys, no sender):
  read and pruned, no longer written.
* ``meta``:  ``seq_hwm:<worker>`` -> the highest ``seq`` handed out, so the counter survives
  restarts even if the clock steps back; ``lsn:<worker>`` -> the last LSN of the worker's
  replication stream; ``applied:<worker>`` -> the last LSN of the peer's stream applied here;
  ``dedup_workers:<worker>`` -> the ``--workers`` the worker last reloaded its dedup table with.
  ``epoch:<worker>`` -> the random identity of this worker's stream (created with the data
  directory, renewed when its LSNs cannot be trusted); ``applied_epoch:<worker>`` -> the epoch
  of the peer's stream that ``applied`` counts in (docs/replication.md, "Stream identity");
  ``peer_node`` -> the node id of the peer this data directory replicates with;
  ``boot:<worker>`` -> the machine's boot id when the stream last started.
* ``rlog``: key ``lsn u64 BE`` (one table per worker stream, ``rlog:<worker>``) -> one record
  encoded as a ``REPL_APPEND`` frame: the replication log, written in the same transaction as the
  mailbox change it describes and trimmed once the peer has acknowledged it
  (docs/replication.md).

Sequence numbers are ``(counter << 8) | tag``: ``tag`` is one byte derived from the node id, so
the two nodes of a pair never give two messages of one mailbox the same ``seq`` even while they
cannot talk to each other.

Why a thread: an fsync takes milliseconds, far too long to block the event loop. The loop only
appends operations to a list; the writer takes *everything* queued, applies it in one write
transaction, commits (one fsync) and hands the completions back to the loop. While it syncs, the
next batch piles up: that is the group commit, with no timer and no tuning knob.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import iris_native as N
import lmdb

log = logging.getLogger(__name__)

_SEQ = struct.Struct(">Q")
_TS = struct.Struct(">Q")
_SEQ_HWM = b"seq_hwm"
_NO_SENDER = bytes(8)

# How long a deletion or dedup entry may wait to join a bigger batch.
LAZY_DELAY_S = 0.05
# After a commit failed (disk full, I/O error): pause before trying the held batch again.
RETRY_S = 0.2
# Attempts at a failing batch while closing, before giving up on it (it was never ACKed).
CLOSE_ATTEMPTS = 3

# One stored message as handed back to the server: (seq, sender, msg_id, ts_ms, body).
StoredMessage = tuple[int, str, str, int, bytes]

# A replication record as the codec represents it: (REC_PUT, user, seq, ts_ms, sender, msg_id,
# body) | (REC_DEL, user, seq) | (REC_DEDUP, key16, ts_ms, sender_hash) |
# (REC_CURSOR, user, device, cursor, seen_ms), and one with its log position.
Record = tuple[Any, ...]
LoggedRecord = tuple[int, Record]

# A logged record is a one-record REPL_APPEND (same limit as replication links: link.py).
_LOG_MAX_FRAME = (1 << 24) + (1 << 16)

# For tests only: shifts the clock that seeds sequence numbers, to play a node whose clock lags.
_CLOCK_OFFSET_US = int(float(os.environ.get("IRIS_TEST_CLOCK_OFFSET_S", "0")) * 1_000_000)


def clock_us() -> int:
    """The wall clock in microseconds, as sequence numbers see it."""
    return int(time.time() * 1_000_000) + _CLOCK_OFFSET_US


def seq_tag(node_id: str) -> int:
    """The low byte of every ``seq`` a node hands out (docs/replication.md, "Sequence numbers")."""
    return zlib.crc32(node_id.encode()) & 0xFF


def boot_id() -> bytes:
    """This boot of the machine (Linux); IRIS_TEST_BOOT_ID stands in for a reboot in tests."""
    fake = os.environ.get("IRIS_TEST_BOOT_ID")
    if fake is not None:
        return fake.encode()
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read().strip()
    except OSError:
        return b""  # unknown: never taken for a reboot


def new_epoch() -> int:
    """A random, non-zero stream identity (0 means "none")."""
    return int.from_bytes(os.urandom(8), "big") or 1


def mailbox_key(user: str, seq: int) -> bytes:
    """The LMDB key of message ``seq`` in ``user``'s mailbox."""
    return user.encode() + b"\x00" + _SEQ.pack(seq)


def encode_value(sender: str, msg_id: str, ts_ms: int, body: bytes) -> bytes:
    s = sender.encode()
    m = msg_id.encode()
    return b"".join((_TS.pack(ts_ms), bytes((len(s),)), s, bytes((len(m),)), m, body))


def decode_value(value: bytes) -> tuple[str, str, int, bytes]:
    view = memoryview(value)
    ts = _TS.unpack_from(view, 0)[0]
    ls = view[8]
    sender = bytes(view[9 : 9 + ls]).decode()
    pos = 9 + ls
    lm = view[pos]
    msg_id = bytes(view[pos + 1 : pos + 1 + lm]).decode()
    return sender, msg_id, ts, bytes(view[pos + 1 + lm :])


class MailboxStore:
    """LMDB-backed mailboxes with a group-commit writer thread.

    All public methods are called from the event loop thread. Writes are queued and committed
    asynchronously; ``put`` takes a callback run on the loop once the message is durable.
    """

    def __init__(
        self,
        path: str,
        loop: asyncio.AbstractEventLoop,
        *,
        map_size: int = 1 << 30,
        on_commit: Callable[[int, float], None] | None = None,
        writer_id: int = 0,
        node_id: str = "",
        replicated: bool = False,
    ) -> None:
        os.makedirs(path, exist_ok=True)
        # Held by the writer for its write transaction; a map resize takes it (see _Env).
        self._map_lock = threading.Lock()
        # Why the last commit failed, while it keeps failing (set by the writer thread, read
        # on the loop: new messages are refused with E_STORAGE_UNAVAILABLE meanwhile).
        self.unavailable: str | None = None
        self.commit_failures = 0
        # Operations of a batch whose commit failed, held by the writer for its next attempt
        # (written by the writer thread, read on the loop: they count in ``queued``).
        self._held = 0
        self.stale_readers_cleared = 0
        # Durability mode (docs/architecture.md, "Issue 10: storage durability"): metasync=False
        # alone, which LMDB documents as keeping the database intact on a system crash (every
        # commit fsyncs the data pages before it writes the meta page), plus env.sync(True)
        # after a batch that someone waits for, which flushes that meta page before anyone is
        # told the batch is durable. MDB_NOSYNC (sync=False) is never used: with it the meta
        # page may reach the disk before the pages it points to, and a power cut corrupts the
        # database, ACKed messages included.
        self.env = _Env(
            lmdb.open(
                path, map_size=map_size, max_dbs=300, sync=True, metasync=False, writemap=False
            ),
            self,
        )
        self._msgs = self.env.open_db(b"msgs")
        self._dedup = self.env.open_db(b"dedup:%d" % writer_id)
        self._dedup_shared = self.env.open_db(b"dedup")
        self._dedup_layout_key = b"dedup_workers:%d" % writer_id
        self._meta = self.env.open_db(b"meta")
        # Known devices of each user (docs/architecture.md, "Issue 10: per-device cursors"):
        # user | 0x00 | device -> cursor u64 (every seq below it acknowledged) | seen_ms u64.
        self._devices = self.env.open_db(b"devices")
        self._rlog = self.env.open_db(b"rlog:%d" % writer_id)
        self.writer_id = writer_id
        self._loop = loop
        self._on_commit = on_commit
        # Each worker process keeps its own high-water mark; a new counter starts above all of
        # them, so the worker that owns a mailbox after a change of --workers still counts up.
        self._hwm_key = _SEQ_HWM + b":%d" % writer_id
        self._lsn_key = b"lsn:%d" % writer_id
        self._applied_key = b"applied:%d" % writer_id
        self._applied_epoch_key = b"applied_epoch:%d" % writer_id
        self._epoch_key = b"epoch:%d" % writer_id
        self._boot_key = b"boot:%d" % writer_id
        self._tag = seq_tag(node_id)
        # Replication log (docs/replication.md): every mailbox change gets the next LSN of this
        # worker's stream and is written to rlog in the same transaction as the change.
        self.replicated = replicated
        self.lsn = self._load_u64(self._lsn_key)
        self.applied = self._load_u64(self._applied_key)
        self.applied_epoch = self._load_u64(self._applied_epoch_key)
        self._batch_records: list[LoggedRecord] = []
        # Called on the loop with the records of each committed batch, in LSN order.
        self.on_logged: Callable[[list[LoggedRecord]], None] | None = None
        self._lock = threading.Condition()
        self._ops: list[tuple[Any, ...]] = []
        self._callbacks: list[Callable[[], None]] = []
        self._closing = False
        self._need_sync = False
        # Loop-thread side of the queue (see _enqueue).
        self._batch: list[tuple[Any, ...]] = []
        self._batch_callbacks: list[Callable[[], None]] = []
        self._batch_durable = False
        self._kick_soon = False
        self._lazy_timer: asyncio.TimerHandle | None = None
        self.seq_hwm = self._load_hwm()
        self.reader_check()
        self._thread = threading.Thread(target=self._run, name="iris-lmdb-writer", daemon=True)
        self._thread.start()

    # ---- sequence numbers -------------------------------------------------------------------

    def _load_hwm(self) -> int:
        stored = 0
        with self.env.begin(db=self._meta) as txn:
            cur = txn.cursor()
            if cur.set_range(_SEQ_HWM):
                for key, raw in cur:
                    if not key.startswith(_SEQ_HWM):
                        break
                    stored = max(stored, _SEQ.unpack(raw)[0])
        # Microseconds since the epoch as a floor keeps seqs growing across restarts even if the
        # hwm write of the last batch was lost; the stored hwm covers a clock that stepped back.
        return max(stored, clock_us() << 8)

    def _load_u64(self, key: bytes) -> int:
        with self.env.begin(db=self._meta) as txn:
            raw = txn.get(key)
        return _SEQ.unpack(raw)[0] if raw else 0

    def stream_epoch(self) -> int:
        """This worker's stream identity, created (and made durable) on first use, and renewed
        when the machine rebooted since the last start: a power cut may have lost commits that
        were already sent (deletion batches are not fsynced), and LSNs reused after that would
        name other records on the peer than here (docs/replication.md, "Stream identity")."""
        epoch = self._load_u64(self._epoch_key)
        boot = boot_id()
        last_boot = self.load_meta(self._boot_key)
        if epoch and last_boot is not None and last_boot != boot:
            log.warning("the machine rebooted since stream %d last ran: its recent commits may "
                        "be lost; new stream epoch (the peer gets a full copy)",
                        self.writer_id)  # fmt: skip
            epoch = 0
        if not epoch or last_boot != boot:
            epoch = epoch or new_epoch()
            with self.env.begin(write=True, db=self._meta) as txn:
                txn.put(self._epoch_key, _SEQ.pack(epoch))
                txn.put(self._boot_key, boot)
            self.env.sync(True)
        return epoch

    def renew_epoch(self) -> int:
        """A new stream identity (queued, durable with the next batch): our LSNs so far may
        name other records on the peer than in our log."""
        epoch = new_epoch()
        self._enqueue(("meta", [(self._epoch_key, _SEQ.pack(epoch))]), None, durable=True)
        return epoch

    def load_meta(self, key: bytes) -> bytes | None:
        with self.env.begin(db=self._meta) as txn:
            return txn.get(key)

    def put_meta(self, key: bytes, value: bytes) -> None:
        """Queue a ``meta`` entry, durable with the next batch."""
        self._enqueue(("meta", [(key, value)]), None, durable=True)

    def set_applied(self, lsn: int, epoch: int, done: Callable[[], None]) -> None:
        """Record durably that the peer's stream ``epoch`` is applied up to ``lsn`` (the end of
        a full copy); ``done`` runs on the loop once durable."""
        pairs = [(self._applied_key, _SEQ.pack(lsn)), (self._applied_epoch_key, _SEQ.pack(epoch))]
        self._enqueue(("meta", pairs), done, durable=True)

    def next_seq(self) -> int:
        """A strictly increasing sequence number for a new message, tagged with this node.
        The counter never goes below anything either node of the pair issued that we know of
        (observe_seq, observe_clock_ms); the clock is only a floor."""
        self.seq_hwm = (max((self.seq_hwm >> 8) + 1, clock_us()) << 8) | self._tag
        return self.seq_hwm

    def seq_clock_ms(self) -> int:
        """Our sequence clock for the peer (REPL_HEARTBEAT.ts_ms): in ms, rounded up, at least
        the counter of every seq we issued or observed and at least the wall clock."""
        return max(self.seq_hwm >> 8, clock_us()) // 1000 + 1

    def observe_clock_ms(self, ts_ms: int) -> None:
        """The peer's sequence clock: every seq it issued so far is below it, including those
        of messages we never saw (delivered live there, or written while its stream to us was
        cut). A value that would overflow a seq is ignored."""
        floor = ts_ms * 1000
        if floor < 1 << 56 and floor << 8 > self.seq_hwm:
            self.seq_hwm = floor << 8

    def observe_seq(self, seq: int) -> None:
        """A seq the peer handed out: ours continue above it, so per-pair order survives a
        sender moving from one node to the other."""
        if seq > self.seq_hwm:
            self.seq_hwm = seq

    # ---- reads (loop thread; LMDB readers never block the writer) ----------------------------

    def scan_mailbox(self, user: str) -> tuple[int, int, int]:
        """(number of stored messages, highest seq, bytes) of ``user``'s committed mailbox.
        Bytes count the stored values (small headers included): close enough for a bound,
        and nothing is copied to count them."""
        prefix = user.encode() + b"\x00"
        count = 0
        last = -1
        nbytes = 0
        with self.env.begin(db=self._msgs, buffers=True) as txn:
            cur = txn.cursor()
            if cur.set_range(prefix):
                for key, value in cur:
                    key = bytes(key)
                    if not key.startswith(prefix):
                        break
                    count += 1
                    nbytes += len(value)
                    last = _SEQ.unpack_from(key, len(prefix))[0]
        return count, last, nbytes

    def read(
        self, user: str, from_seq: int, limit: int, skip: set[int] | None = None
    ) -> list[StoredMessage]:
        """Up to ``limit`` committed messages of ``user`` with seq >= ``from_seq``, in order."""
        prefix = user.encode() + b"\x00"
        out: list[StoredMessage] = []
        with self.env.begin(db=self._msgs, buffers=False) as txn:
            cur = txn.cursor()
            if not cur.set_range(prefix + _SEQ.pack(max(from_seq, 0))):
                return out
            for key, value in cur:
                if not key.startswith(prefix):
                    break
                seq = _SEQ.unpack_from(key, len(prefix))[0]
                if skip and seq in skip:
                    continue
                sender, msg_id, ts, body = decode_value(value)
                out.append((seq, sender, msg_id, ts, body))
                if len(out) >= limit:
                    break
        return out

    def iter_dedup(self, max_age_ms: int, workers: int, batch: int = 8192) -> Iterator[bytes]:
        """The persisted dedup entries younger than ``max_age_ms``, oldest first, in chunks of up
        to ``batch`` 32-byte records ``ts_ms | key16 | sender u64`` for ``DedupWindow.load``: a
        restart streams the table instead of holding it as a list of Python tuples.

        Only this worker's table, unless ``workers`` differs from the last reload's (or this is
        the first): users may then have moved between workers, so every worker's entries (and
        the pre-issue-10 shared table) are read; the window's fair split and age bound trim
        what does not belong here."""
        floor = _TS.pack(max(int(time.time() * 1000) - max_age_ms, 0))
        if self._load_u64(self._dedup_layout_key) == workers:
            tables = [self._dedup]
        else:
            with self.env.begin() as txn:
                names = [k for k in txn.cursor().iternext(values=False)
                         if k == b"dedup" or k.startswith(b"dedup:")]  # fmt: skip
            tables = [self.env.open_db(name) for name in names]
        with self.env.begin() as txn:
            runs = []
            for db in tables:
                cur = txn.cursor(db=db)
                if cur.set_range(floor):
                    runs.append(cur.iternext(keys=True, values=False))
            if len(runs) == 1:
                # The common case: joined in C, batch by batch.
                while chunk := b"".join(itertools.islice(runs[0], batch)):
                    yield chunk
            elif runs:
                # Several tables, merged by time; entries from before the sender hash (24-byte
                # keys) share sender 0.
                rows = (k if len(k) == 32 else k + _NO_SENDER for k in heapq.merge(*runs))
                while chunk := b"".join(itertools.islice(rows, batch)):
                    yield chunk
        with self.env.begin(write=True, db=self._meta) as txn:
            txn.put(self._dedup_layout_key, _SEQ.pack(workers))

    def sender_usage(self, user: str) -> dict[str, list[int]]:
        """{sender: [messages, body bytes]} of ``user``'s committed mailbox (per-sender bound)."""
        prefix = user.encode() + b"\x00"
        end = prefix[:-1] + b"\x01"  # sorts after every key of this user, before the next one's
        raw: dict[bytes, list[int]] = {}
        with self.env.begin(db=self._msgs) as txn:
            cur = txn.cursor()
            if cur.set_range(prefix):
                for key, value in cur:
                    if key >= end:
                        break
                    ls = value[8]
                    u = raw.get(value[9 : 9 + ls])
                    if u is None:
                        u = raw[value[9 : 9 + ls]] = [0, 0]
                    u[0] += 1
                    u[1] += len(value) - 10 - ls - value[9 + ls]
        return {sender.decode(): u for sender, u in raw.items()}

    def scan_expired(
        self, start: bytes, cutoff_ms: int, max_keys: int, mine: Callable[[str], bool]
    ) -> tuple[list[tuple[str, int, int]], bytes]:
        """One bounded step of the TTL sweep: messages older than ``cutoff_ms`` (epoch ms) of
        the users ``mine`` accepts, from key ``start`` on, looking at most at ``max_keys`` keys.

        Returns [(user, seq, value bytes)] and the key to start the next step at (b"": the end
        was reached, start again from the beginning). A mailbox is in ``seq`` order, which is
        arrival order, so the first message young enough ends the look at that mailbox: the
        cursor jumps to the next user (``user | 0x01`` sorts after every key of ``user`` and
        before any other user's, as user ids hold no NUL)."""
        out: list[tuple[str, int, int]] = []
        with self.env.begin(db=self._msgs, buffers=True) as txn:
            cur = txn.cursor()
            on = cur.set_range(start)
            examined = 0
            while on and examined < max_keys:
                examined += 1
                key = bytes(cur.key())
                ubytes = key[:-9]
                user = ubytes.decode()
                if mine(user):
                    value = cur.value()
                    if _TS.unpack_from(value, 0)[0] <= cutoff_ms:
                        out.append((user, _SEQ.unpack_from(key, len(key) - 8)[0], len(value)))
                        on = cur.next()
                        continue
                on = cur.set_range(ubytes + b"\x01")
            nxt = bytes(cur.key()) if on else b""
        return out, nxt

    def load_devices(self, user: str) -> dict[str, list[int]]:
        """The known devices of ``user``: device -> [cursor, seen_ms]."""
        prefix = user.encode() + b"\x00"
        out: dict[str, list[int]] = {}
        with self.env.begin(db=self._devices) as txn:
            cur = txn.cursor()
            on = cur.set_range(prefix)
            while on and cur.key().startswith(prefix):
                value = cur.value()
                out[cur.key()[len(prefix) :].decode()] = [
                    _SEQ.unpack_from(value, 0)[0], _TS.unpack_from(value, 8)[0],
                ]  # fmt: skip
                on = cur.next()
        return out

    # ---- writes (queued from the loop thread, applied by the writer) -------------------------

    def put_cursor(self, user: str, device: str, cursor: int, seen_ms: int) -> None:
        """Queue a device's cursor and last-seen time (lazy: losing the last one in a crash
        redelivers what it acknowledged since, which the client's dedup absorbs)."""
        lsn, log = self._log((N.REC_CURSOR, user, device, cursor, seen_ms))
        key = user.encode() + b"\x00" + device.encode()
        self._enqueue(("cursor", key, _SEQ.pack(cursor) + _TS.pack(seen_ms), lsn, log), None)

    def forget_device(self, user: str, device: str) -> None:
        """Queue the removal of a device past --device-ttl. Not logged: the peer forgets it by
        its own sweep (the same last-seen time, replicated, expires there too)."""
        self._enqueue(("uncursor", user.encode() + b"\x00" + device.encode()), None)

    def put(
        self,
        user: str,
        seq: int,
        sender: str,
        msg_id: str,
        ts_ms: int,
        body: bytes,
        dedup_key: bytes | None,
        done: Callable[[], None] | None,
    ) -> int:
        """Queue a message; ``done`` runs on the loop once it is durable. Returns its LSN in
        the replication log (0 when the node is not replicated)."""
        lsn, log = self._log((N.REC_PUT, user, seq, ts_ms, sender, msg_id, body))
        if dedup_key is not None:
            dedup_key += _SEQ.pack(N.dedup_sender(sender))  # the table's key, after ts
        op = (
            "put", mailbox_key(user, seq), encode_value(sender, msg_id, ts_ms, body), dedup_key,
            lsn, log,
        )  # fmt: skip
        self._enqueue(op, done, durable=True)
        return lsn

    def delete(self, user: str, seq: int, done: Callable[[], None] | None = None) -> None:
        """Queue the removal of an acknowledged message (committed, fsynced with the next put)."""
        lsn, log = self._log((N.REC_DEL, user, seq))
        self._enqueue(("del", mailbox_key(user, seq), lsn, log), done)

    def put_dedup(
        self,
        dedup_key: bytes,
        ts_ms: int,
        sender_hash: int = 0,
        done: Callable[[], None] | None = None,
    ) -> int:
        """Persist a dedup entry of a message that completed without being stored;
        ``sender_hash`` is ``dedup_sender(sender)``. With ``done`` it goes with the next batch
        (not up to LAZY_DELAY_S later) and ``done`` runs once it is committed (not fsynced: the
        peer's copy is what is waited for). Returns its LSN in the replication log (0 when the
        node is not replicated)."""
        lsn, log = self._log((N.REC_DEDUP, dedup_key, ts_ms, sender_hash))
        op = ("dedup", _TS.pack(ts_ms) + dedup_key + _SEQ.pack(sender_hash), lsn, log)
        self._enqueue(op, done, soon=done is not None)
        return lsn

    def _log(self, rec: Record) -> tuple[int, bytes | None]:
        if not self.replicated:
            return 0, None
        self.lsn += 1
        self._batch_records.append((self.lsn, rec))
        return self.lsn, N.encode((N.REPL_APPEND, self.writer_id, self.lsn, (rec,)), _LOG_MAX_FRAME)

    def apply(
        self, records: list[Record], last_lsn: int, done: Callable[[list[bool]], None]
    ) -> None:
        """Queue records replicated from the peer's stream up to ``last_lsn`` (not logged here:
        they are the peer's). ``done(results)`` runs once they and the new applied LSN are
        durable; ``results[i]`` says whether record i changed anything (a PUT that was new, a
        DEL that found its message)."""
        results: list[bool] = []
        self._enqueue(("apply", records, last_lsn, results), lambda: done(results), durable=True)

    def trim_log(self, upto_lsn: int) -> None:
        """Drop log records up to ``upto_lsn``: the peer has them durably."""
        self._enqueue(("trim", _SEQ.pack(upto_lsn)), None)

    def read_log(self, from_lsn: int, limit: int, max_bytes: int) -> list[LoggedRecord]:
        """Committed log records with LSN >= ``from_lsn``, in order (catch-up reads)."""
        chunks: list[bytes] = []
        size = 0
        with self.env.begin(db=self._rlog, buffers=False) as txn:
            cur = txn.cursor()
            if cur.set_range(_SEQ.pack(from_lsn)):
                for raw in cur.iternext(keys=False, values=True):
                    chunks.append(raw)
                    size += len(raw)
                    if len(chunks) >= limit or size >= max_bytes:
                        break
        if not chunks:
            return []
        dec = N.Decoder(_LOG_MAX_FRAME, repl=True)
        return [(f[2], f[3][0]) for f in dec.feed(b"".join(chunks))]

    def read_snapshot(
        self, after: bytes, want: Callable[[str], bool], limit: int, max_bytes: int
    ) -> tuple[list[Record], bytes | None]:
        """Committed messages of the users ``want`` accepts, as PUT records, in key order from
        just after key ``after`` (b"": the start); returns them and the key to continue after
        (None: done). One read transaction per call: a full copy is not one snapshot, which is
        fine because the log after it replays every later change, and replaying is idempotent."""
        out: list[Record] = []
        size = 0
        with self.env.begin(db=self._msgs, buffers=False) as txn:
            cur = txn.cursor()
            if not cur.set_range(after + b"\x00" if after else b""):
                return out, None
            while True:
                key = cur.key()
                cut = len(key) - 9  # user | 0x00 | seq u64
                user = key[:cut].decode()
                if not want(user):
                    # Skip the whole mailbox: the next key after "user\x00<every seq>".
                    if not cur.set_range(key[: cut + 1] + b"\xff" * 9):
                        return out, None
                    continue
                sender, msg_id, ts, body = decode_value(cur.value())
                out.append((N.REC_PUT, user, _SEQ.unpack_from(key, cut + 1)[0], ts, sender,
                            msg_id, body))  # fmt: skip
                size += len(body) + len(key) + 64
                if len(out) >= limit or size >= max_bytes:
                    return out, key
                if not cur.next():
                    return out, None

    def read_snapshot_cursors(
        self, after: bytes, want: Callable[[str], bool], limit: int
    ) -> tuple[list[Record], bytes | None]:
        """Device cursors of the users ``want`` accepts, as CURSOR records, in key order from
        just after key ``after`` (b"": the start); returns them and the key to continue after
        (None: done). The full copy sends them after the messages: applying one is a max, so
        a copy never takes a cursor back."""
        out: list[Record] = []
        with self.env.begin(db=self._devices, buffers=False) as txn:
            cur = txn.cursor()
            on = cur.set_range(after + b"\x00") if after else cur.first()
            while on:
                key = cur.key()
                user, _, device = key.partition(b"\x00")
                if want(user.decode()):
                    value = cur.value()
                    cursor, seen = _SEQ.unpack_from(value, 0)[0], _TS.unpack_from(value, 8)[0]
                    out.append((N.REC_CURSOR, user.decode(), device.decode(), cursor, seen))
                    if len(out) >= limit:
                        return out, key
                on = cur.next()
        return out, None

    def log_first(self) -> int:
        """LSN of the oldest record still in the log (0 if empty)."""
        with self.env.begin(db=self._rlog) as txn:
            cur = txn.cursor()
            return _SEQ.unpack(cur.key())[0] if cur.first() else 0

    def prune_dedup(self, older_than_ms: int) -> None:
        """Drop persisted dedup entries older than ``older_than_ms`` (epoch ms)."""
        self._enqueue(("prune", _TS.pack(max(older_than_ms, 0))), None)

    def barrier(self, done: Callable[[], None]) -> None:
        """Run ``done`` on the loop after everything queued so far is durable."""
        self._enqueue(None, done, durable=True)

    @property
    def queued(self) -> int:
        """Operations waiting for the writer (back-pressure signal)."""
        return len(self._ops) + len(self._batch) + self._held

    def _enqueue(
        self,
        op: tuple[Any, ...] | None,
        done: Callable[[], None] | None,
        durable: bool = False,
        soon: bool = False,
    ) -> None:
        # Operations collect on the loop thread without a lock and cross to the writer once per
        # loop tick (one lock, one wake-up for the whole batch). Work that nobody waits for
        # (deletions, dedup entries) may wait up to LAZY_DELAY_S to join a bigger batch.
        if op is not None:
            self._batch.append(op)
        if done is not None:
            self._batch_callbacks.append(done)
        if durable or soon:
            if durable:
                self._batch_durable = True
            if not self._kick_soon:
                self._kick_soon = True
                self._loop.call_soon(self._kick)
        elif self._lazy_timer is None and not self._kick_soon:
            self._lazy_timer = self._loop.call_later(LAZY_DELAY_S, self._kick)

    def _kick(self) -> None:
        """Hand the batch collected on the loop thread to the writer."""
        self._kick_soon = False
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        if not self._batch and not self._batch_callbacks:
            return
        ops, self._batch = self._batch, []
        callbacks, self._batch_callbacks = self._batch_callbacks, []
        if self._batch_records:
            # Runs first among this batch's completions: the records go to the peer before
            # anyone waits for the peer's acknowledgement of them.
            records, self._batch_records = self._batch_records, []
            if self.on_logged is not None:
                on_logged = self.on_logged
                callbacks.insert(0, lambda: on_logged(records))
        durable, self._batch_durable = self._batch_durable, False
        with self._lock:
            self._need_sync = self._need_sync or durable
            self._ops.extend(ops)
            self._callbacks.extend(callbacks)
            self._lock.notify()

    def _run(self) -> None:
        # A batch whose commit failed stays here (ops, callbacks, durable) and is tried again,
        # with whatever was queued since, until it commits: its completions (the ACKs) run only
        # then, so nothing is ever ACKed that is not on disk, and the LSNs it logged stay
        # contiguous for the peer. Meanwhile ``unavailable`` makes the worker refuse new
        # messages instead of piling them up.
        ops: list[tuple[Any, ...]] = []
        callbacks: list[Callable[[], None]] = []
        durable = False
        count = 0
        failures = 0
        while True:
            with self._lock:
                if ops or callbacks:
                    # After a failed commit: the whole pause, even if work keeps arriving (each
                    # new operation notifies), so a full disk is tried 1/RETRY_S times a second.
                    deadline = time.monotonic() + RETRY_S
                    while not self._closing:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._lock.wait(left)
                else:
                    while not self._ops and not self._callbacks and not self._closing:
                        self._lock.wait()
                    if not self._ops and not self._callbacks and self._closing:
                        return
                ops.extend(self._ops)
                self._ops = []
                callbacks.extend(self._callbacks)
                self._callbacks = []
                durable = durable or self._need_sync
                self._need_sync = False
            started = time.perf_counter()
            try:
                if ops:
                    self._apply_growing(ops)
                    # A replicated batch is one operation carrying many records: count those.
                    count += sum(len(op[1]) if op[0] == "apply" else 1 for op in ops)
                    ops = []  # committed: a retry of the sync below must not apply them twice
            except lmdb.PanicError:
                log.exception("LMDB environment is unusable; stopping the worker")
                os._exit(70)
            except lmdb.Error as exc:
                # Disk full, I/O error: LMDB aborted the transaction and nothing of it is
                # visible. The data pages it wrote went to free pages, so trying again is safe.
                failures += 1
                self.commit_failures += 1
                self._held = len(ops)
                if self.unavailable is None:
                    log.error(
                        "LMDB commit of %d operations failed (%s); refusing new messages and "
                        "retrying every %.1f s", len(ops), exc, RETRY_S,
                    )  # fmt: skip
                self.unavailable = f"{type(exc).__name__}: {exc}"
                if self._closing and failures >= CLOSE_ATTEMPTS:
                    log.error("closing with %d operations never committed (none was ACKed)",
                              len(ops))  # fmt: skip
                    return
                continue
            except Exception:
                log.exception("LMDB commit of %d operations failed; stopping the worker", len(ops))
                os._exit(70)
            if durable:
                try:
                    self.env.sync(True)
                except Exception:
                    # The meta page of a committed batch may not be on disk, and after a failed
                    # fsync the kernel may have dropped the dirty pages: a second fsync can
                    # succeed without writing them. Only a restart (re-reading the file) is safe.
                    log.exception("LMDB fsync failed; stopping the worker")
                    os._exit(70)
            self._held = 0
            if self.unavailable is not None:
                log.warning("LMDB commits succeed again after %d failed attempts", failures)
                self.unavailable = None
            failures = 0
            if durable and self._on_commit is not None:
                self._on_commit(count, time.perf_counter() - started)
            if callbacks:
                try:
                    self._loop.call_soon_threadsafe(_run_all, callbacks)
                except RuntimeError:  # loop closed during shutdown
                    pass
            callbacks = []
            durable = False
            count = 0

    def _apply_growing(self, ops: list[tuple[Any, ...]]) -> None:
        for _ in range(16):
            try:
                self._apply(ops)
                return
            except lmdb.MapFullError:
                # The map is a reservation of address space, not of disk: double it and retry
                # the (aborted) transaction.
                size = self.env.info()["map_size"] * 2
                log.warning("LMDB map full; growing it to %d bytes", size)
                self._resize_from_writer(size)
            except lmdb.MapResizedError:
                # Another worker process grew the map and the data now lies beyond ours.
                log.info("LMDB map grown by another worker; adopting its size")
                self._resize_from_writer(0)
        raise lmdb.MapFullError("LMDB map could not grow enough for one batch")

    def _resize(self, size: int) -> None:
        """Set the map size (0: adopt the size another process set). Never while a read of
        this process is open: on the loop thread (reads are synchronous there), or on the
        writer while the loop thread waits in ``close``."""
        with self._map_lock:
            self.env.raw.set_mapsize(size)

    def _resize_from_writer(self, size: int) -> None:
        done = threading.Event()
        claim = threading.Lock()  # exactly one of the loop and the writer resizes

        def resize() -> None:
            if claim.acquire(blocking=False):
                try:
                    self._resize(size)
                finally:
                    done.set()

        try:
            self._loop.call_soon_threadsafe(resize)
        except RuntimeError:  # loop closed: nothing can be reading
            resize()
        while not done.wait(0.05):
            if self._closing and claim.acquire(blocking=False):
                # The loop thread waits for us in close(): it is not reading.
                try:
                    self._resize(size)
                finally:
                    done.set()

    def reader_check(self) -> int:
        """Clear the reader slots of dead processes (a worker killed during a read): each pins
        the snapshot it was reading, so the file grows instead of reusing freed pages."""
        cleared = self.env.reader_check()
        if cleared:
            self.stale_readers_cleared += cleared
            log.warning("cleared %d stale LMDB reader slot(s) of dead processes", cleared)
        return cleared

    def _apply(self, ops: list[tuple[Any, ...]]) -> None:
        if not ops:
            return
        msgs, dedup, rlog = self._msgs, self._dedup, self._rlog
        last_lsn = 0
        with self._map_lock, self.env.begin(write=True) as txn:
            for op in ops:
                kind = op[0]
                if kind == "put":
                    txn.put(op[1], op[2], db=msgs)
                    if op[3] is not None:
                        txn.put(_TS.pack(int(time.time() * 1000)) + op[3], b"", db=dedup)
                elif kind == "del":
                    txn.delete(op[1], db=msgs)
                elif kind == "dedup":
                    txn.put(op[1], b"", db=dedup)
                elif kind == "cursor":
                    txn.put(op[1], op[2], db=self._devices)
                elif kind == "uncursor":
                    txn.delete(op[1], db=self._devices)
                    continue
                elif kind == "apply":
                    op[3][:] = [self._apply_record(txn, rec) for rec in op[1]]
                    txn.put(self._applied_key, _SEQ.pack(op[2]), db=self._meta)
                    continue
                elif kind == "meta":
                    for key, value in op[1]:
                        txn.put(key, value, db=self._meta)
                    continue
                elif kind == "trim":
                    cur = txn.cursor(db=rlog)
                    if cur.first():
                        while cur.key() <= op[1]:
                            if not cur.delete():
                                break
                    continue
                elif kind == "prune":
                    for db in (dedup, self._dedup_shared):
                        cur = txn.cursor(db=db)
                        if cur.first():
                            while cur.key() < op[1]:
                                if not cur.delete():
                                    break
                    continue
                lsn = op[-2]
                if lsn:
                    txn.put(_SEQ.pack(lsn), op[-1], db=rlog)
                    last_lsn = lsn
            txn.put(self._hwm_key, _SEQ.pack(self.seq_hwm), db=self._meta)
            if last_lsn:
                txn.put(self._lsn_key, _SEQ.pack(last_lsn), db=self._meta)

    def _apply_record(self, txn: lmdb.Transaction, rec: Record) -> bool:
        kind = rec[0]
        if kind == N.REC_PUT:
            _, user, seq, ts_ms, sender, msg_id, body = rec
            new = txn.put(
                mailbox_key(user, seq), encode_value(sender, msg_id, ts_ms, body),
                overwrite=False, db=self._msgs,
            )  # fmt: skip
            if new:
                key = _TS.pack(ts_ms) + N.dedup_key(sender, msg_id)
                txn.put(key + _SEQ.pack(N.dedup_sender(sender)), b"", db=self._dedup)
            return bool(new)
        if kind == N.REC_DEL:
            return bool(txn.delete(mailbox_key(rec[1], rec[2]), db=self._msgs))
        if kind == N.REC_CURSOR:
            # Cursors only move forward: a late record never takes one back.
            key = rec[1].encode() + b"\x00" + rec[2].encode()
            old = txn.get(key, db=self._devices)
            cursor, seen = rec[3], rec[4]
            if old is not None:
                cursor = max(cursor, _SEQ.unpack_from(old, 0)[0])
                seen = max(seen, _TS.unpack_from(old, 8)[0])
            txn.put(key, _SEQ.pack(cursor) + _TS.pack(seen), db=self._devices)
            return True
        txn.put(_TS.pack(rec[2]) + rec[1] + _SEQ.pack(rec[3]), b"", db=self._dedup)
        return True

    def close(self) -> None:
        """Flush, stop the writer and close the environment (loop thread)."""
        self._kick()
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._thread.join(timeout=30)
        self.env.close()


class _Env:
    """The LMDB environment, with map resizes made safe for this process's threads.

    ``mdb_env_set_mapsize`` remaps the file and may only run while no transaction of the
    process is open (py-lmdb does not check; a reader on another thread would then read
    unmapped memory). Reads run on the loop thread and the write transaction on the writer,
    so a resize runs on the loop thread under the store's map lock, which the writer holds for
    its transaction. A read that finds the map grown by another worker process
    (``MapResizedError``) adopts the new size the same way and starts again.
    """

    __slots__ = ("raw", "_store")

    def __init__(self, env: lmdb.Environment, store: MailboxStore) -> None:
        self.raw = env
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)

    def begin(self, *args: Any, **kwargs: Any) -> lmdb.Transaction:
        if kwargs.get("write"):
            return self.raw.begin(*args, **kwargs)
        try:
            return self.raw.begin(*args, **kwargs)
        except lmdb.MapResizedError:
            self._store._resize(0)
            return self.raw.begin(*args, **kwargs)


def _run_all(callbacks: list[Callable[[], None]]) -> None:
    for cb in callbacks:
        try:
            cb()
        except Exception:
            log.exception("storage completion callback failed")
