"""Hostile clients against every resource bound: each gets its clear error, the bound's metric
counts it, and a well-behaved pair on the same worker loses nothing and is not held up."""

from __future__ import annotations

import resource
import socket
import time

import iris_native as N
import pytest
from rawclient import RawClient

from iris_fast.client import IrisClient, RateLimitedError

pytestmark = pytest.mark.timeout(180)


class Bystanders:
    """A sender and a receiver on the same worker as the attacker (``--workers 1``)."""

    def __init__(self, server) -> None:
        self.rcv = RawClient(server.addr)
        self.rcv.login("by-r")
        self.snd = RawClient(server.addr)
        self.snd.login("by-s")
        self.n = 0
        self.worst = 0.0

    def check(self) -> None:
        """One message end to end, exactly once; records the slowest round trip."""
        self.n += 1
        tag = f"b{self.n}"
        t0 = time.monotonic()
        self.snd.send((N.SEND, tag, "by-r", tag.encode()))
        d = self.rcv.expect(N.DELIVER)
        assert d[4:] == (tag, tag.encode())
        self.rcv.send((N.DELIVER_ACK, d[1]))
        assert self.snd.expect(N.ACK)[1] == tag
        self.worst = max(self.worst, time.monotonic() - t0)
        assert [f for f in self.rcv.drain(0.01) if f[0] == N.DELIVER] == []


def test_rate_limit_per_connection_gets_a_retry_hint_and_the_connection_survives(server_factory):
    srv = server_factory("--workers", "1", "--conn-rate-msgs", "5", "--conn-rate-msgs-burst", "5")
    by = Bystanders(srv)
    m = RawClient(srv.addr)
    m.login("flooder")
    for i in range(20):
        m.send((N.SEND, f"f{i}", "sink", b"x"))
    frames = [m.next(5) for _ in range(20)]
    acks = [f for f in frames if f[0] == N.ACK]
    errors = [f for f in frames if f[0] == N.ERROR]
    assert len(acks) == 5 and len(errors) == 15
    assert all(e[1] == 11 and "retry in" in e[3] for e in errors)
    by.check()
    # After the hint, the same connection sends again.
    time.sleep(0.3)
    m.send((N.SEND, "later", "sink", b"x"))
    assert m.expect(N.ACK)[1] == "later"
    assert srv.metrics()["iris_rate_limited_connection_total"] >= 15


def test_rate_limit_per_user_spans_its_connections_and_the_client_gets_retry_after(
    server_factory,
):
    srv = server_factory("--workers", "1", "--rate-msgs", "3", "--rate-msgs-burst", "3",
                         "--rate-bytes", "0")  # fmt: skip
    c1 = IrisClient(*srv.addr, timeout=5)
    c1.login("chatty")
    c2 = IrisClient(*srv.addr, timeout=5)
    c2.login("chatty")
    c1.send_msg("x", b"1")
    c2.send_msg("x", b"2")
    c1.send_msg("x", b"3")
    with pytest.raises(RateLimitedError) as err:
        c2.send_msg("x", b"4")
    assert 0 < err.value.retry_after <= 1.0
    time.sleep(err.value.retry_after + 0.05)
    c2.send_msg("x", b"4")  # the connection survived, the hint was right
    assert srv.metrics()["iris_rate_limited_user_total"] >= 1


def test_rate_limit_in_bytes_refuses_a_message_bigger_than_the_burst_for_good(server_factory):
    srv = server_factory("--workers", "1", "--conn-rate-bytes", "1000",
                         "--conn-rate-bytes-burst", "2000")  # fmt: skip
    m = RawClient(srv.addr)
    m.login("big")
    m.send((N.SEND, "huge", "sink", b"z" * 3000))
    e = m.expect(N.ERROR)
    assert e[1] == 11 and "never" in e[3]
    m.send((N.SEND, "small", "sink", b"z" * 100))
    assert m.expect(N.ACK)[1] == "small"


def test_connections_per_address_are_bounded(server_factory):
    srv = server_factory("--workers", "1", "--max-conns-per-ip", "20")
    by = Bystanders(srv)  # 2 connections from 127.0.0.1
    held = [socket.create_connection(srv.addr) for _ in range(18)]
    extra = RawClient(srv.addr)
    e = extra.expect(N.ERROR)
    assert e[1] == 16 and "too many connections from 127.0.0.1" in e[3]
    assert extra.wait_closed()
    # Another source address is not affected.
    other = RawClient(srv.addr, source="127.0.0.2")
    other.login("elsewhere")
    by.check()
    for s in held:
        s.close()
    assert srv.metrics()["iris_conn_limit_rejected_total"] >= 1


def test_mailbox_byte_bound(server_factory):
    srv = server_factory("--workers", "1", "--mailbox-max-bytes", "10000")
    s = RawClient(srv.addr)
    s.login("filler")
    for i in range(5):
        s.send((N.SEND, f"m{i}", "offline-user", b"y" * 3000))
    frames = [s.next(5) for _ in range(5)]
    assert [f[0] for f in frames].count(N.ACK) == 3
    full = [f for f in frames if f[0] == N.ERROR]
    assert full and all(f[1] == 9 and "bytes" in f[3] for f in full)
    assert srv.metrics()["iris_mailbox_bytes_full_total"] == 2
    # Reading the mailbox frees room again.
    r = IrisClient(*srv.addr, timeout=5)
    r.login("offline-user")
    for _ in range(3):
        r.recv(timeout=5)
    r.close()
    time.sleep(0.2)
    s.send((N.SEND, "again", "offline-user", b"y" * 3000))
    assert s.expect(N.ACK)[1] == "again"


def test_ten_thousand_connections_that_never_log_in(server_factory):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 12_000)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    n = min(10_000, want - 500)
    srv = server_factory("--workers", "2", "--login-timeout", "2", "--max-conns-per-ip", "30000")
    by = Bystanders(srv)
    socks = []
    for i in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(srv.addr)
        socks.append(s)
        if i % 1000 == 999:
            by.check()
    # Everything still works while they are held; then the server closes every one of them.
    by.check()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if srv.metrics()["iris_login_timeouts_total"] >= n:
            break
        by.check()
        time.sleep(0.2)
    m = srv.metrics()
    assert m["iris_login_timeouts_total"] >= n
    assert m["iris_connections"] <= 2 + 10
    for s in socks:
        s.close()
    print(
        f"{n} idle unauthenticated connections: bystander worst round trip {by.worst * 1000:.1f} ms"
    )
    assert by.worst < 5.0


def test_a_client_that_never_reads_is_bounded_and_others_are_not_held_up(server_factory):
    srv = server_factory("--workers", "1", "--max-inflight", "64")
    by = Bystanders(srv)
    # The victim logs in and never reads; its socket buffers fill up.
    victim = socket.create_connection(srv.addr)
    victim.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    victim.sendall(N.encode((N.LOGIN, 1, "sleepy", "")))
    time.sleep(0.2)
    s = RawClient(srv.addr)
    s.login("pusher")
    body = b"p" * 4000
    for i in range(500):
        s.send((N.SEND, f"p{i}", "sleepy", body))
    # The first 64 went live into its window (their ACKs wait for its DELIVER_ACK); the
    # rest are stored and ACKed at once.
    acks = s.collect(N.ACK, 436, timeout=30)
    assert len(acks) == 436
    by.check()
    m = srv.metrics()
    assert m["iris_inflight_deliveries"] <= 64
    assert m["iris_delivery_window_full_total"] >= 1
    # It goes away without reading: its 64 in-flight deliveries are stored, then ACKed.
    victim.close()
    assert len(s.collect(N.ACK, 64, timeout=30)) == 64
    # Nothing was lost: once it reads, the sleepy client gets all 500, in order.
    r = IrisClient(*srv.addr, timeout=10)
    r.login("sleepy")
    got = [r.recv(timeout=10).msg_id for _ in range(500)]
    assert got == [f"p{i}" for i in range(500)]


def test_pending_writes_bound_pauses_reading_instead_of_growing(server_factory):
    # A small kernel send buffer per socket, so that what slow readers do not take waits in
    # the worker (by default loopback autotuning lets the kernel absorb megabytes each).
    srv = server_factory(
        "--workers", "1", "--max-pending-writes", "100000", "--socket-sndbuf", "16384"
    )  # fmt: skip
    victims = []
    for i in range(4):
        v = socket.create_connection(srv.addr)
        v.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        v.sendall(N.encode((N.LOGIN, 1, f"slow{i}", "")))
        victims.append(v)
    time.sleep(0.2)
    s = RawClient(srv.addr)
    s.login("pusher")
    for k in range(200):
        s.send((N.SEND, f"w{k}", f"slow{k % 4}", b"q" * 20_000))
    s.drain(1.0)
    m = srv.metrics()
    assert m["iris_write_backpressure_total"] >= 1
    for v in victims:
        v.close()
    # With the slow readers gone, the worker reads again and serves the sender.
    time.sleep(0.5)
    s.send((N.SEND, "after", "someone", b"x"))
    assert "after" in [f[1] for f in s.drain(2.0) if f[0] == N.ACK]
    by = Bystanders(srv)
    by.check()


def test_replayed_frames_do_nothing_twice(server_factory):
    srv = server_factory("--workers", "1")
    r = RawClient(srv.addr)
    r.login("replay-r")
    s = RawClient(srv.addr)
    s.login("replay-s")
    send = (N.SEND, "once", "replay-r", b"only once")
    s.send(send)
    d = r.expect(N.DELIVER)
    r.send((N.DELIVER_ACK, d[1]))
    assert s.expect(N.ACK) == (N.ACK, "once", 0)
    for _ in range(3):
        s.send(send)  # a replayed SEND: recognised by the dedup window
        assert s.expect(N.ACK) == (N.ACK, "once", N.ACK_DUPLICATE)
    r.send((N.DELIVER_ACK, d[1]))  # a replayed DELIVER_ACK: nothing left to acknowledge
    s.send((N.LOGIN, 1, "replay-s", ""))  # a replayed LOGIN
    assert s.expect(N.ERROR)[1] == 8
    assert [f for f in r.drain(0.3) if f[0] == N.DELIVER] == []
