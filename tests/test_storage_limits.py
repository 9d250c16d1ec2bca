"""Storage at its limits: the LMDB map grows under several workers, a full disk refuses writes
with an ERROR and recovers, and reader slots of dead processes are cleared.

Real server processes, real LMDB files; the full disk is a LazyFS mount (tests/lazyfs.py) told
to answer ENOSPC to any write that grows a file.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import iris_native as N
import lmdb
import pytest
from conftest import ServerProcess
from lazyfs import LazyFS
from rawclient import RawClient

from iris_fast import protocol as P


class Sender(threading.Thread):
    """Sends ``count`` messages round-robin to ``recipients``, ``window`` in flight."""

    def __init__(
        self,
        addr: tuple[str, int],
        user: str,
        recipients: list[str],
        count: int,
        body: int,
        window: int = 64,
    ) -> None:
        super().__init__(daemon=True)
        self.addr, self.user, self.recipients = addr, user, recipients
        self.count, self.body, self.window = count, body, window
        self.acked: set[str] = set()
        self.refused: dict[str, tuple] = {}
        self.other: list[tuple] = []
        self.failure: BaseException | None = None
        self.sent = 0
        self.c: RawClient

    def run(self, quiet: float = 0.0) -> None:
        """Send all; with ``quiet``, stop early once the server has said nothing that long
        (messages held by storage wait for their ACK; ``finish`` collects them later)."""
        try:
            self.c = c = RawClient(self.addr, timeout=30)
            c.login(self.user)
            deadline = time.monotonic() + 120
            while len(self.acked) + len(self.refused) < self.count:
                assert time.monotonic() < deadline, "sender timed out"
                done = len(self.acked) + len(self.refused)
                k = min(self.window - (self.sent - done), self.count - self.sent, 32)
                if k > 0:
                    c.send(
                        *[
                            (N.SEND, f"{self.user}-{i}", self.recipients[i % len(self.recipients)],
                             bytes([i % 256]) * self.body)
                            for i in range(self.sent, self.sent + k)
                        ]
                    )  # fmt: skip
                    self.sent += k
                more = self.sent < self.count and self.sent - done < self.window
                if not self._one(0.01 if more else quiet or 30) and not more:
                    assert quiet, f"no answer from the server (closed={c.closed})"
                    return
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.failure = exc

    def _one(self, timeout: float) -> bool:
        f = self.c.next(timeout)
        if f is None:
            return False
        if f[0] == N.ACK:
            self.acked.add(f[1])
        elif f[0] == N.ERROR and f[2]:
            self.refused[f[2]] = f
        else:
            self.other.append(f)
        return True

    def finish(self, timeout: float) -> None:
        """Wait for answers to everything sent."""
        deadline = time.monotonic() + timeout
        while len(self.acked) + len(self.refused) < self.sent:
            if not self._one(max(deadline - time.monotonic(), 0.001)):
                return


def drain(addr: tuple[str, int], user: str, quiet: float = 1.5) -> list[str]:
    c = RawClient(addr, timeout=10)
    c.login(user)
    got: list[str] = []
    while True:
        f = c.next(quiet)
        if f is None:
            break
        if f[0] == N.DELIVER:
            got.append(f[4])
            c.send((N.DELIVER_ACK, f[1]))
    c.sock.close()
    return got


def worker_state(srv: ServerProcess) -> list[tuple[int, int]]:
    return [(w["pid"], w["restarts"]) for w in srv.health()["workers"]]


@pytest.mark.timeout(300)
def test_map_grows_past_its_initial_size_with_four_workers_under_traffic(server_factory) -> None:
    """Every worker adopts the map another one grew (MapResizedError) instead of exiting."""
    initial = 1 << 20
    srv = server_factory("--workers", "4", "--lmdb-map-size", str(initial))
    before = worker_state(srv)
    recipients = [f"grow-rcpt-{k}" for k in range(8)]
    senders = [Sender(srv.addr, f"grow-sender-{i}", recipients, 1500, 2000) for i in range(4)]
    for s in senders:
        s.start()
    for s in senders:
        s.join(timeout=180)
    for s in senders:
        assert s.failure is None, f"{s.user}: {s.failure!r}\n{srv.log()}"
        assert not s.refused and not s.other, (s.refused, s.other)
        assert len(s.acked) == s.count
    data = srv.data_dir / "mailbox" / "data.mdb"
    assert data.stat().st_size > 4 * initial, "the test did not fill past the initial map"
    assert worker_state(srv) == before, f"workers restarted:\n{srv.log()}"
    log = srv.full_log()
    assert "stopping" not in log and "Traceback" not in log, log[-4000:]
    delivered: list[str] = []
    for r in recipients:
        delivered += drain(srv.addr, r)
    assert len(delivered) == len(set(delivered)) == 4 * 1500


@pytest.mark.timeout(300)
def test_full_disk_refuses_with_an_error_keeps_the_worker_and_recovers(tmp_path: Path) -> None:
    fs = LazyFS(tmp_path / "mnt", tmp_path / "disk", tmp_path / "lazyfs.log").start()
    srv = ServerProcess(fs.mountpoint / "data", "full", "--workers", "2")
    srv.log_path = tmp_path / "full.log"
    try:
        srv.start()
        before = worker_state(srv)
        recipients = [f"full-rcpt-{k}" for k in range(4)]
        first = Sender(srv.addr, "full-a", recipients, 300, 1000)
        first.run()
        assert first.failure is None and len(first.acked) == 300, first.failure
        fs.command("full on")
        # The data file must grow for these: the disk refuses, the node must refuse them too.
        during = Sender(srv.addr, "full-b", recipients, 2000, 4000, window=2000)
        during.run(quiet=3.0)
        assert during.failure is None, f"{during.failure!r}\n{srv.log()}"
        assert during.refused, f"nothing was refused on a full disk ({len(during.acked)} ACKed)"
        codes = {f[1] for f in during.refused.values()}
        assert codes == {P.E_STORAGE_UNAVAILABLE}, codes
        assert all("storage unavailable" in f[3] for f in during.refused.values())
        assert not during.other, during.other
        health = srv.health()
        assert health["status"] == "ok", health
        assert any(w["storage"] != "ok" for w in health["workers"]), health
        assert srv.metrics()["iris_storage_unavailable"] >= 1
        assert worker_state(srv) == before, f"a worker exited on the full disk:\n{srv.log()}"
        # The batch that hit the full disk is held, not lost and not ACKed: once space returns
        # it commits and its ACKs come.
        held = during.sent - len(during.acked) - len(during.refused)
        assert held > 0
        fs.command("full off")
        during.finish(30)
        assert len(during.acked) + len(during.refused) == during.sent, (
            f"{during.sent - len(during.acked) - len(during.refused)} never answered"
        )
        after = Sender(srv.addr, "full-c", recipients, 50, 1000)
        after.run()
        assert after.failure is None and len(after.acked) == 50, (after.failure, after.refused)
        assert worker_state(srv) == before
        m = srv.metrics()
        assert m["iris_storage_unavailable"] == 0 and m["iris_storage_commit_failures_total"] >= 1
        # Everything ACKed is there exactly once; nothing refused was stored.
        delivered: list[str] = []
        for r in recipients:
            delivered += drain(srv.addr, r)
        assert len(delivered) == len(set(delivered))
        acked = first.acked | during.acked | after.acked
        refused = set(during.refused) | set(after.refused)
        got = set(delivered)
        assert acked <= got, f"{len(acked - got)} ACKed messages lost"
        assert not (refused & got), f"{len(refused & got)} refused messages were stored"
        assert got == acked, (len(got), len(acked))
    finally:
        srv.stop()
        fs.stop()


READER = """
import lmdb, sys, time
env = lmdb.open(sys.argv[1], max_dbs=300, map_size=1 << 30)
txn = env.begin()
print("reading", flush=True)
time.sleep(600)
"""


def test_stale_reader_of_a_dead_process_is_cleared(server_factory) -> None:
    srv = server_factory("--workers", "2")
    path = str(srv.data_dir / "mailbox")
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, path], stdout=subprocess.PIPE, text=True
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "reading"
        env = lmdb.open(path, max_dbs=300, map_size=1 << 30)
        slot = re.compile(rf"^\s*{reader.pid}\s", re.M)
        try:
            assert slot.search(env.readers()), env.readers()
            reader.send_signal(signal.SIGKILL)
            reader.wait(timeout=10)
            # Its slot pins the snapshot it read until someone clears it; the workers check
            # every few seconds.
            deadline = time.monotonic() + 30
            while slot.search(env.readers()) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not slot.search(env.readers()), env.readers()
        finally:
            env.close()
        assert "stale LMDB reader" in srv.full_log()
        assert srv.metrics()["iris_lmdb_stale_readers_cleared_total"] >= 1
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
