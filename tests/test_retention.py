"""Issue 10: what a node keeps for users who do not read, and for workers that do not answer.

Per-sender share of a mailbox, idle mailboxes evicted from memory, stored mail expiring at its
TTL, and back-pressure on the links between workers (SIGSTOP of a recipient's home worker).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import iris_native as N
import lmdb
import pytest
from rawclient import RawClient
from test_workers import users_on

from iris_fast import protocol as P
from iris_fast.scrape import fetch_metrics

pytestmark = pytest.mark.timeout(180)


def stored_in_lmdb(data_dir: Path, user: str) -> list[int]:
    """The seqs of ``user``'s mailbox as the node's LMDB file holds them (read-only reader)."""
    env = lmdb.open(str(data_dir / "mailbox"), max_dbs=300, readonly=True, lock=True)
    try:
        msgs = env.open_db(b"msgs", create=False)
        prefix = user.encode() + b"\x00"
        seqs = []
        with env.begin(db=msgs) as txn:
            cur = txn.cursor()
            if cur.set_range(prefix):
                for key in cur.iternext(keys=True, values=False):
                    if not key.startswith(prefix):
                        break
                    seqs.append(int.from_bytes(key[len(prefix) :], "big"))
        return seqs
    finally:
        env.close()


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# ---- per-sender share of a mailbox ---------------------------------------------------------


def test_one_sender_cannot_fill_a_mailbox_by_count(server_factory):
    # Sender and recipient on different workers: the refusal travels back as ROUTE_ERROR.
    srv = server_factory("--workers", "2", "--mailbox-per-sender-limit", "3")
    flooder, rcpt = users_on(2, 0, 1, prefix="psa")
    (other,) = users_on(2, 0, prefix="psb")
    f = RawClient(srv.addr)
    f.login(flooder)
    f.send(*[(N.SEND, f"f{i}", rcpt, b"x") for i in range(6)])
    frames = [f.next(5) for _ in range(6)]
    acks = [x for x in frames if x and x[0] == N.ACK]
    errors = [x for x in frames if x and x[0] == N.ERROR]
    assert len(acks) == 3 and len(errors) == 3, frames
    for e in errors:
        assert e[1] == P.E_MAILBOX_FULL
        assert f"holds 3 messages from {flooder!r}" in e[3]
        assert "per-sender limit (--mailbox-per-sender-limit 3)" in e[3]
    # Another sender still gets in.
    o = RawClient(srv.addr)
    o.login(other)
    o.send((N.SEND, "o1", rcpt, b"y"))
    assert o.expect(N.ACK)[1] == "o1"
    assert srv.metrics()["iris_mailbox_sender_full_total"] == 3
    # Nothing refused was kept; once the recipient read its mail the sender has room again.
    r = RawClient(srv.addr)
    r.login(rcpt)
    got = r.collect(N.DELIVER, 4)
    assert sorted(d[4] for d in got) == ["f0", "f1", "f2", "o1"]
    r.send((N.DELIVER_ACK, got[-1][1]))
    assert r.drain(0.3) == []
    r.close()
    wait_for(lambda: stored_in_lmdb(srv.data_dir, rcpt) == [], 10, "the deletions")
    f.send((N.SEND, "f3", rcpt, b"x"))
    assert f.expect(N.ACK)[1] == "f3"


def test_one_sender_cannot_fill_a_mailbox_by_bytes(server_factory):
    srv = server_factory("--workers", "1", "--mailbox-per-sender-max-bytes", "10000")
    f = RawClient(srv.addr)
    f.login("bytes-flooder")
    # One burst in one write: the bound holds before the first of them is committed.
    f.send(*[(N.SEND, f"b{i}", "bytes-rcpt", b"z" * 3000) for i in range(5)])
    frames = [f.next(5) for _ in range(5)]
    assert [x[0] for x in frames].count(N.ACK) == 3, frames
    errors = [x for x in frames if x[0] == N.ERROR]
    assert len(errors) == 2
    for e in errors:
        assert e[1] == P.E_MAILBOX_FULL
        assert "bytes from 'bytes-flooder'" in e[3]
        assert "per-sender limit of 10000 (--mailbox-per-sender-max-bytes)" in e[3]
    o = RawClient(srv.addr)
    o.login("bytes-other")
    o.send((N.SEND, "o", "bytes-rcpt", b"z" * 3000))
    assert o.expect(N.ACK)[1] == "o"
    assert srv.metrics()["iris_mailbox_sender_full_total"] == 2


# ---- idle mailboxes leave memory -------------------------------------------------------------


def test_mailboxes_of_offline_users_are_evicted_and_rebuilt_from_storage(server_factory):
    srv = server_factory("--workers", "1", "--mailbox-cache", "20", "--mailbox-limit", "2")
    s = RawClient(srv.addr)
    s.login("mass-sender")
    s.send((N.SEND, "first-0", "kept-user", b"a"), (N.SEND, "first-1", "kept-user", b"b"))
    assert len(s.collect(N.ACK, 2)) == 2
    n = 300
    for start in range(0, n, 50):
        s.send(*[(N.SEND, f"m{i}", f"offline-{i}", b"hello") for i in range(start, start + 50)])
        assert len(s.collect(N.ACK, 50)) == 50
    # The cache bound plus the sender's own (it has a session), not one per user messaged;
    # the last burst's mailboxes leave once their puts are durable (next insertion or sweep).
    key = 'iris_worker_mailboxes{worker="0"}'
    wait_for(lambda: srv.metrics()[key] <= 21, 10, "the mailbox cache bound")
    m = srv.metrics()
    assert m["iris_mailboxes_evicted_total"] >= n - 20
    # An evicted mailbox is rebuilt from LMDB: its limit still holds, its mail is all there.
    s.send((N.SEND, "first-2", "kept-user", b"c"))
    e = s.expect(N.ERROR)
    assert e[1] == P.E_MAILBOX_FULL and e[2] == "first-2" and "holds 2 messages" in e[3]
    r = RawClient(srv.addr)
    r.login("kept-user")
    assert [d[4] for d in r.collect(N.DELIVER, 2)] == ["first-0", "first-1"]
    r2 = RawClient(srv.addr)
    r2.login("offline-7")
    assert r2.expect(N.DELIVER)[4:] == ("m7", b"hello")


# ---- TTL -----------------------------------------------------------------------------------


def test_stored_mail_expires_at_its_ttl_and_the_sender_hears_nothing(server_factory):
    srv = server_factory("--workers", "2", "--message-ttl", "1.5")
    sender, rcpt = users_on(2, 0, 1, prefix="ttl")
    s = RawClient(srv.addr)
    s.login(sender)
    s.send(*[(N.SEND, f"t{i}", rcpt, b"soon gone") for i in range(20)])
    assert len(s.collect(N.ACK, 20)) == 20
    assert len(stored_in_lmdb(srv.data_dir, rcpt)) == 20
    wait_for(lambda: stored_in_lmdb(srv.data_dir, rcpt) == [], 15, "the TTL sweep")
    assert srv.metrics()["iris_messages_expired_total"] == 20
    r = RawClient(srv.addr)
    r.login(rcpt)
    assert r.drain(1.0) == []
    # The sender was ACKed when the message was stored and is told nothing more.
    assert s.drain(0.5) == []


def test_a_ttl_of_zero_keeps_mail(server_factory):
    srv = server_factory("--workers", "1", "--message-ttl", "0")
    s = RawClient(srv.addr)
    s.login("keeper")
    s.send((N.SEND, "k", "patient", b"still here"))
    assert s.expect(N.ACK)[1] == "k"
    time.sleep(2.5)  # two sweep ticks
    assert len(stored_in_lmdb(srv.data_dir, "patient")) == 1
    assert srv.metrics()["iris_messages_expired_total"] == 0


# ---- back-pressure on worker links ---------------------------------------------------------


def test_a_stopped_home_worker_pauses_its_senders_with_bounded_memory(server_factory):
    limit = 1 << 20
    srv = server_factory(
        "--workers", "2", "--link-max-bytes", str(limit), "--mailbox-per-sender-limit", "0",
        "--conn-rate-bytes", "0", "--rate-bytes", "0", "--conn-rate-msgs", "0", "--rate-msgs", "0",
    )  # fmt: skip
    sender, rcpt = users_on(2, 0, 1, prefix="bp")
    (by_sender,) = users_on(2, 0, prefix="bpby")
    (by_rcpt,) = users_on(2, 0, prefix="bpto")
    victim = srv.health()["workers"][1]["pid"]
    # Logged in before the stop: a new connection could land on the stopped worker.
    by = RawClient(srv.addr)
    by.login(by_sender)
    body = b"p" * 8192
    n = 2048  # 16 MiB: far past the bound and the kernel's socket buffers
    s = RawClient(srv.addr, timeout=60)
    s.login(sender)
    s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
    sent = [0]

    def flood() -> None:
        sock = s.sock
        sock.settimeout(120)
        for i in range(n):
            sock.sendall(N.encode((N.SEND, f"p{i}", rcpt, body)))
            sent[0] = i + 1

    os.kill(victim, signal.SIGSTOP)
    stopped = True
    try:
        t = threading.Thread(target=flood, daemon=True)
        t.start()
        time.sleep(4.0)
        print(f"sender wrote {sent[0]} of {n} messages while the target worker was stopped")
        # The sender is paused: it could not write its whole flood...
        assert sent[0] < n, "the sending worker read everything while its target was stopped"
        m = fetch_metrics("127.0.0.1", srv.http_port, timeout=10)
        # ...and its worker holds the bound plus at most one read, not the flood.
        routed = m['iris_worker_routed_bytes{worker="0"}']
        queued = m['iris_worker_link_queued_bytes{worker="0"}']
        print(f"sending worker: {routed:.0f} bytes unanswered, {queued:.0f} queued on the link")
        assert limit // 2 < routed <= limit + (1 << 20), routed
        assert queued <= limit + (1 << 20), queued
        assert m["iris_link_backpressure_total"] >= 1
        # Only the senders to the stopped worker wait: one on the same worker to a user homed
        # there goes on.
        by.send((N.SEND, "by-1", by_rcpt, b"not held up"))
        assert by.expect(N.ACK, timeout=10)[1] == "by-1"
        os.kill(victim, signal.SIGCONT)
        stopped = False
        t.join(timeout=90)
        assert not t.is_alive() and sent[0] == n
        acks = s.collect(N.ACK, n, timeout=90)
        assert len(acks) == n
    finally:
        if stopped:
            os.kill(victim, signal.SIGCONT)
    acked = {a[1] for a in acks}
    assert len(acked) == n
    r = RawClient(srv.addr, timeout=30)
    r.login(rcpt)
    got: list[str] = []
    deadline = time.monotonic() + 90
    while len(got) < n and time.monotonic() < deadline:
        f = r.next(10)
        if f is None:
            break
        if f[0] == N.DELIVER:
            got.append(f[4])
            if len(got) % 32 == 0 or len(got) == n:  # the window is 1 MiB: 128 of these
                r.send((N.DELIVER_ACK, f[1]))
    assert sorted(got) == sorted(acked)  # every ACKed message, once
    assert got == [f"p{i}" for i in range(n)]  # in order
    assert [f for f in r.drain(0.5) if f[0] == N.DELIVER] == []
    m = srv.metrics()
    assert m["iris_routed_bytes"] == 0


@pytest.mark.parametrize(
    "option", ["--message-ttl", "--mailbox-per-sender-limit", "--mailbox-per-sender-max-bytes"]
)
def test_negative_retention_settings_are_refused_at_start(tmp_path, option):
    cmd = [sys.executable, "-m", "iris_fast", "serve", "--data-dir", str(tmp_path / "d"),
           "--port", "0", "--http-port", "0", option, "-1"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert r.returncode == 2
    assert f"{option} must not be negative (0 turns it off)" in r.stderr
