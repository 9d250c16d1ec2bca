"""In-process engine tests: the reasons a worker pauses a client's reads, and their interplay.

Three bounds pause reads, each lifted on its own schedule: the storage queue (senders of stored
mail), a worker link's unanswered bytes (senders to a slow worker) and write pressure (every
client). Lifting one must never undo another. Also: a deletion the peer made is counted once
even when devices of the user acknowledged it here. The engine runs on a real ``Worker`` with a
stand-in store (no LMDB: what is tested is the engine's bookkeeping).
"""

from __future__ import annotations

import asyncio
import collections
import types

import iris_native as N
import pytest

from iris_fast.config import ServerConfig
from iris_fast.server import worker as W


class FakeStore:
    """The part of MailboxStore the engine calls, with puts held until the test commits them."""

    unavailable = None

    def __init__(self, mailbox: tuple[int, int, int] = (0, -1, 0)) -> None:
        self.queued = 0
        self.callbacks: list = []
        self.deletes: list[int] = []
        self._seq = 0
        self._mailbox = mailbox

    def iter_dedup(self, *_a):
        return iter(())

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def scan_mailbox(self, _user: str) -> tuple[int, int, int]:
        return self._mailbox

    def put(self, *args) -> int:
        self.callbacks.append(args[-1])
        return 0

    def delete(self, _user: str, seq: int, _done=None) -> None:
        self.deletes.append(seq)

    def read(self, *_a):
        return []

    def commit_all(self) -> None:
        callbacks, self.callbacks = self.callbacks, []
        for cb in callbacks:
            cb()


class FakeConn:
    """A logged-in connection as the engine sees it; records whether its reads are paused."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.paused = False
        self.inflight = None
        self.inflight_bytes = 0
        self.closing = self.detached = self.write_paused = self.handoff_pending = False
        self.cursor = 0
        self.next_tag = 1
        self.bucket = None
        self.device = ""  # an anonymous device (no id in LOGIN)
        self.source = None
        self.last_active = W.monotonic()

    def hibernate(self) -> None:
        pass

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def send(self, _frame: tuple) -> None:
        pass


@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def _two_worker_engine(loop, store: FakeStore) -> W.Worker:
    cfg = ServerConfig(workers=2, worker_index=0, link_max_bytes=1000, mailbox_per_sender_limit=0)
    w = W.Worker(cfg, store, loop)
    w.links = types.SimpleNamespace(send=lambda *a: None, send_or_hold=lambda *a: None)
    return w


def _users(home: int, n: int = 2) -> list[str]:
    return [u for u in (f"u{i}" for i in range(100)) if W.home_of(u, 2) == home][:n]


def test_a_drained_storage_queue_does_not_undo_a_link_hold(loop):
    store = FakeStore()
    w = _two_worker_engine(loop, store)
    here, there = _users(0), _users(1)
    c = FakeConn(here[0])
    w.connections.add(c)
    w.on_send(c, "m1", there[0], b"x" * 2000)  # worker 1 never answers: over the link bound
    assert c.paused and w._link_held(c)
    store.queued = W.STORE_HIGH_WATER + 1
    w.on_send(c, "m2", here[1], b"y")  # stored while the storage queue is high
    store.queued = 0
    store.commit_all()
    assert c.paused, "the storage resume undid the link hold"
    assert w._link_held(c)


def _sender_paused_for_storage(loop) -> tuple[W.Worker, FakeStore, FakeConn]:
    """A sender whose stored SEND found the storage queue over its high-water mark."""
    store = FakeStore()
    w = _two_worker_engine(loop, store)
    here = _users(0)
    c = FakeConn(here[0])
    w.connections.add(c)
    store.queued = W.STORE_HIGH_WATER + 1
    w.on_send(c, "m1", here[1], b"y")
    assert c.paused
    return w, store, c


def test_a_drained_storage_queue_does_not_undo_write_pressure(loop):
    w, store, c = _sender_paused_for_storage(loop)
    w.reads_paused = True  # slow readers elsewhere hold the worker's reads
    store.queued = 0
    store.commit_all()
    assert c.paused, "the storage resume undid the worker-wide write-pressure pause"


def test_a_sender_paused_for_storage_is_resumed_once_the_queue_drains_without_callbacks(loop):
    w, store, c = _sender_paused_for_storage(loop)
    store.commit_all()  # its put commits while deletions still fill the queue
    assert c.paused
    store.queued = 0  # the deletions drain; none of them has a callback
    w.sweep(W.monotonic())
    assert not c.paused, "nothing ever resumed the sender"


def test_a_peers_deletion_acknowledged_by_a_device_here_is_counted_once(loop):
    store = FakeStore(mailbox=(2, 20, 200))  # two stored messages
    w = W.Worker(ServerConfig(workers=1, worker_index=0), store, loop)
    w._pump = lambda conn: None
    a, b = FakeConn("r"), FakeConn("r")
    for c in (a, b):
        c.next_tag = 2
        w.connections.add(c)
    w.sessions["r"] = a
    w.devices["r"] = [a, b]
    rec = (10, "s", "m", 0, b"x" * 100, True)
    for c in (a, b):
        c.inflight = collections.deque([(1, rec)])
        c.inflight_bytes = 100
    mb = w._mailbox("r")
    w.on_deliver_ack(a, 1)  # device a has it; b not yet: kept
    assert mb.count == 2 and not store.deletes
    w._applied([(N.REC_DEL, "r", 10)], [True], lambda: None)  # the peer deleted it
    assert mb.count == 1
    w._detach(b)  # b leaves: every remaining device "has" seq 10
    assert mb.count == 1, "the peer's deletion was counted a second time"
    assert store.deletes == [], "a deletion was queued for a message already gone"
