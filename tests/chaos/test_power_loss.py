"""Power loss: every ACKed message survives a cut that drops every unsynced write.

Each node's data directory lives on its own LazyFS mount (tests/lazyfs.py): writes reach the
"disk" only when fsynced. A cycle: senders get ACKs under traffic, then at one instant the
filesystem loses what was not synced (all of it, or a random share of the unsynced 4 KiB pieces
written back in any order, as a real page cache does) and the node's processes are killed -9,
so nothing can fsync afterwards. The mount comes back with what was durable, the node restarts
on it (LMDB must open it cleanly), senders resend what was not ACKed (same msg_id, as the
client library does) and every message must be delivered exactly once.

A kill -9 alone cannot show this: the page cache survives it. These tests need FUSE
(/dev/fuse, fusermount3 and the mfusepy package: ci/install.sh installs them); without it they
fail, they do not skip.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import iris_native as N
import pytest
from conftest import ServerProcess
from lazyfs import LazyFS
from rawclient import RawClient

from chaos.faultproxy import FaultProxy
from iris_fast import protocol as P
from iris_fast.ports import free_port

SENDERS = 4
RECIPIENTS = 4
# Senders also deliver to an online recipient that acknowledges: its deletions are commits
# that nobody waits for, the ones a careless durability mode leaves unsynced.
LIVE = "live-reader"
TRAFFIC_S = 1.2

SURVIVED: list[str] = []


class Disk:
    """A node's data directory on a LazyFS mount."""

    def __init__(self, tmp: Path, name: str) -> None:
        self.fs = LazyFS(tmp / f"mnt-{name}", tmp / f"disk-{name}", tmp / f"lazyfs-{name}.log")
        self.data = self.fs.mountpoint / "data"

    def mount(self) -> None:
        self.fs.start()


def node(tmp: Path, disk: Disk, name: str, *extra: str) -> ServerProcess:
    s = ServerProcess(disk.data, name, "--workers", "2", *extra)
    s.log_path = tmp / f"{name}.log"  # the log must not live on the disk that loses power
    return s


class Sender(threading.Thread):
    """Pipelines SENDs to the recipients until stopped or the connection dies."""

    def __init__(self, addr: tuple[str, int], index: int, cycle: int) -> None:
        super().__init__(daemon=True)
        self.addr = addr
        self.user = f"sender-{index}"
        self.prefix = f"c{cycle}-s{index}-"
        self.sent: dict[str, str] = {}  # msg_id -> recipient
        self.acked: set[str] = set()
        self.errors: list[tuple] = []
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            c = RawClient(self.addr, timeout=5)
            c.login(self.user)
            n = 0
            while not self.stop.is_set() and n < 20_000:
                frames = []
                for _ in range(16):
                    to = LIVE if n % 4 == 3 else f"rcpt-{n % RECIPIENTS}"
                    mid = f"{self.prefix}{n}"
                    self.sent[mid] = to
                    frames.append((N.SEND, mid, to, b"x" * 200))
                    n += 1
                c.send(*frames)
                self._read(c, 0.02)
            self._read(c, 1.0)
        except OSError:
            pass  # the node lost power

    def _read(self, c: RawClient, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            f = c.next(max(deadline - time.monotonic(), 0.001))
            if f is None:
                if c.closed:
                    raise ConnectionError("closed")
                return
            if f[0] == N.ACK:
                self.acked.add(f[1])
            elif f[0] == N.ERROR:
                if f[1] == P.E_STORAGE_UNAVAILABLE:
                    raise ConnectionError("the disk is gone")  # the cut came
                self.errors.append(f)


class LiveReader(threading.Thread):
    """An online recipient that acknowledges everything (its deletions keep the writer busy)."""

    def __init__(self, addr: tuple[str, int], pace: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.addr = addr
        self.pace = pace  # seconds between acknowledgements: a stream of small deletions
        self.stop = threading.Event()
        self.got: set[str] = set()

    def run(self) -> None:
        try:
            c = RawClient(self.addr, timeout=5)
            c.login(LIVE)
            while not self.stop.is_set():
                f = c.next(0.1)
                if f is None:
                    if c.closed:
                        return
                    continue
                if f[0] == N.DELIVER:
                    self.got.add(f[4])
                    c.send((N.DELIVER_ACK, f[1]))
                    if self.pace:
                        time.sleep(self.pace)
        except OSError:
            pass


def resend(addr: tuple[str, int], senders: list[Sender]) -> None:
    """What the client library does after a reconnect: resend everything not ACKed."""
    for s in senders:
        missing = [m for m in s.sent if m not in s.acked]
        c = RawClient(addr, timeout=10)
        c.login(s.user)
        for i in range(0, len(missing), 200):
            c.send(*[(N.SEND, m, s.sent[m], b"x" * 200) for m in missing[i : i + 200]])
        deadline = time.monotonic() + 60
        want = set(missing)
        while want and time.monotonic() < deadline:
            f = c.next(max(deadline - time.monotonic(), 0.001))
            if f is None:
                break
            assert f[0] != N.ERROR, f"resend refused: {f}"
            if f[0] == N.ACK:
                want.discard(f[1])
                s.acked.add(f[1])
        assert not want, f"{len(want)} resent messages of {s.user} never ACKed"
        c.sock.close()


def drain(addr: tuple[str, int], user: str) -> list[str]:
    """Every msg_id delivered to ``user`` until the mailbox has been quiet for a while."""
    c = RawClient(addr, timeout=10)
    c.login(user)
    got: list[str] = []
    while True:
        f = c.next(2.0)
        if f is None:
            break
        if f[0] == N.DELIVER:
            got.append(f[4])
            c.send((N.DELIVER_ACK, f[1]))
    c.sock.close()
    return got


def check_delivery(addrs: list[tuple[str, int]], senders: list[Sender], live: LiveReader) -> int:
    errors = [f for s in senders for f in s.errors]
    assert not errors, f"errors before the power cut: {errors[:5]}"
    acked = set().union(*(s.acked for s in senders))
    assert acked, "no message was ACKed before the power cut: the cycle proves nothing"
    delivered: list[str] = []
    for k in range(RECIPIENTS):
        delivered += drain(addrs[k % len(addrs)], f"rcpt-{k}")
    live_after = drain(addrs[0], LIVE)
    expected = {m for s in senders for m, to in s.sent.items() if to != LIVE}
    dupes = {m for m in delivered if delivered.count(m) > 1}
    assert not dupes, f"{len(dupes)} messages delivered twice, e.g. {sorted(dupes)[:5]}"
    lost = expected - set(delivered)
    lost_acked = lost & acked
    assert not lost_acked, (
        f"{len(lost_acked)} ACKed messages lost in the power cut, e.g. {sorted(lost_acked)[:5]}"
    )
    assert not lost, f"{len(lost)} messages (resent after the cut) lost, e.g. {sorted(lost)[:5]}"
    # The live recipient acknowledged some before the cut; a deletion is not waited for, so one
    # may come back after the cut, but none may be missing.
    live_expected = {m for s in senders for m, to in s.sent.items() if to == LIVE}
    live_lost = live_expected - live.got - set(live_after)
    assert not live_lost, f"{len(live_lost)} messages to the live recipient lost"
    return len(acked)


def power_cut(disks: list[Disk], nodes: list[ServerProcess], keep: float, seed: int) -> None:
    """At one instant: unsynced writes gone, the node's processes dead."""
    for d in disks:
        d.fs.crash(keep, seed)
    for n in nodes:
        n.kill9()
    for d in disks:
        d.fs.unmount()


def run_traffic(
    addr: tuple[str, int], cycle: int, senders_to_cut: list[Sender] | None = None
) -> tuple[list[Sender], LiveReader]:
    """Even cycles: the cut comes while senders store messages and the live recipient takes
    its share. Odd cycles: the senders are done and the live recipient drains a stored
    backlog when the cut comes: a run of commits that only delete, which nobody waits for."""
    senders = [Sender(addr, i, cycle) for i in range(SENDERS)]
    if cycle % 2 == 0:
        live = LiveReader(addr)
        live.start()
        for s in senders:
            s.start()
        return senders, live
    for s in senders:
        s.start()
    wait_acks(senders, 2000)
    for s in senders:
        s.stop.set()
    for s in senders:
        s.join(timeout=30)
    live = LiveReader(addr, pace=0.002)
    live.start()
    return senders, live


def stop_traffic(senders: list[Sender], live: LiveReader) -> None:
    for t in (*senders, live):
        t.stop.set()
    for t in (*senders, live):
        t.join(timeout=30)


def wait_acks(senders: list[Sender], at_least: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(len(s.acked) for s in senders) >= at_least:
            return
        time.sleep(0.02)
    raise AssertionError("senders got no ACKs before the cut")


def test_lazyfs_loses_unsynced_writes_and_keeps_synced_ones(tmp_path: Path) -> None:
    """The instrument first: without fsync a write is gone after the cut, with it it stays."""
    d = Disk(tmp_path, "probe")
    d.mount()
    try:
        synced = d.fs.mountpoint / "synced"
        with open(synced, "wb") as f:
            f.write(b"durable")
            f.flush()
            os.fsync(f.fileno())
            f.write(b" and lost")
        lost = d.fs.mountpoint / "lost"
        lost.write_bytes(b"never synced")
        assert synced.read_bytes() == b"durable and lost"
        d.fs.crash()
        d.fs.unmount()
        d.mount()
        assert synced.read_bytes() == b"durable"
        assert lost.read_bytes() == b""
    finally:
        d.fs.stop()


@pytest.mark.timeout(400)
@pytest.mark.parametrize(("keep", "cycles"), [(0.0, 2), (0.5, 4)])
def test_power_loss_of_a_single_node_keeps_every_acked_message(
    tmp_path: Path, keep: float, cycles: int
) -> None:
    disk = Disk(tmp_path, "solo")
    disk.mount()
    srv = node(tmp_path, disk, "solo")
    try:
        for cycle in range(cycles):
            srv.start()
            senders, live = run_traffic(srv.addr, cycle)
            wait_acks(senders, 200)
            time.sleep(random.uniform(0.3, TRAFFIC_S))
            power_cut([disk], [srv], keep, seed=cycle)
            stop_traffic(senders, live)
            disk.mount()
            srv.start()  # LMDB must open what the cut left
            resend(srv.addr, senders)
            acked = check_delivery([srv.addr], senders, live)
            SURVIVED.append(f"single node, keep={keep}, cycle {cycle}: {acked} ACKed before")
            srv.stop()
    finally:
        srv.stop()
        disk.fs.stop()
    print(f"power-loss cycles survived so far: {len(SURVIVED)}")


@pytest.mark.timeout(400)
@pytest.mark.parametrize("both", [False, True], ids=["one-node", "both-nodes"])
def test_power_loss_in_a_pair_keeps_every_acked_message(
    tmp_path: Path, server_factory, both: bool
) -> None:
    disks = {n: Disk(tmp_path, n) for n in ("a", "b")}
    for d in disks.values():
        d.mount()
    repl = {"a": free_port(), "b": free_port()}
    proxies = {
        "a": FaultProxy(free_port(), ("127.0.0.1", repl["b"])).start(),
        "b": FaultProxy(free_port(), ("127.0.0.1", repl["a"])).start(),
    }
    nodes = {
        n: node(tmp_path, disks[n], n, "--repl-port", str(repl[n]),
                "--peer", f"127.0.0.1:{proxies[n].listen_port}",
                "--heartbeat", "0.25", "--peer-timeout", "1.0")
        for n in ("a", "b")
    }  # fmt: skip
    a, b = nodes["a"], nodes["b"]

    def wait_paired() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if a.health()["status"] == "ok" and b.health()["status"] == "ok":
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"pair not healthy after the cut\n{a.log()}\n{b.log()}")

    try:
        a.start(accept=("ok", "degraded"))
        b.start()
        wait_paired()
        for cycle in range(2):
            senders, live = run_traffic(a.addr, cycle)
            wait_acks(senders, 200)
            time.sleep(random.uniform(0.3, TRAFFIC_S))
            victims = ["a", "b"] if both else ["a"]
            power_cut([disks[v] for v in victims], [nodes[v] for v in victims], 0.5, cycle)
            stop_traffic(senders, live)
            for v in victims:
                disks[v].mount()
            for v in victims:
                nodes[v].start(accept=("ok", "degraded"))
            wait_paired()
            resend(a.addr, senders)
            acked = check_delivery([a.addr, b.addr], senders, live)
            SURVIVED.append(f"pair, {'both nodes' if both else 'one node'}, cycle {cycle}: "
                            f"{acked} ACKed before")  # fmt: skip
    finally:
        for n in nodes.values():
            n.stop()
        for p in proxies.values():
            p.close()
        for d in disks.values():
            d.fs.stop()
    print(f"power-loss cycles survived so far: {len(SURVIVED)}")
