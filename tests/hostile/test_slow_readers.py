"""Clients that make the server write but never read: bounded per connection at every flush.

Each attacker below gets answers it never reads (PONGs, ERRORs), so the server's write buffer
for it can only grow. The worker must cut it once that buffer passes
``--max-conn-pending-writes`` (RSS stays bounded), a fatal error or a login timeout must drop
the connection at once instead of waiting for a flush that never comes, and a well-behaved pair
on the same worker keeps exchanging messages throughout.
"""

from __future__ import annotations

import socket
import time

import iris_native as N
import pytest
from rawclient import RawClient

pytestmark = pytest.mark.timeout(180)

# Per-connection bound for these tests (the server raises it to the delivery window, 1 MiB,
# plus two frames: 1 MiB + 128 KiB).
CONN_BOUND = 1 << 20
# What an attacker tries to make the server hold: far above the bound.
FLOOD_BYTES = 40 << 20


class Pair:
    """A sender and a receiver on the attacker's worker (``--workers 1``)."""

    def __init__(self, addr: tuple[str, int]) -> None:
        self.rcv = RawClient(addr)
        self.rcv.login("pair-r")
        self.snd = RawClient(addr)
        self.snd.login("pair-s")
        self.n = 0

    def check(self, timeout: float = 10.0) -> None:
        self.n += 1
        tag = f"p{self.n}"
        self.snd.send((N.SEND, tag, "pair-r", tag.encode()))
        d = self.rcv.expect(N.DELIVER, timeout=timeout)
        assert d[4:] == (tag, tag.encode())
        self.rcv.send((N.DELIVER_ACK, d[1]))
        assert self.snd.expect(N.ACK, timeout=timeout)[1] == tag


def start(server_factory, *extra: str):
    return server_factory(
        "--workers", "1", "--socket-sndbuf", "16384",
        "--max-conn-pending-writes", str(CONN_BOUND), *extra,
    )  # fmt: skip


def non_reader(addr: tuple[str, int]) -> socket.socket:
    s = socket.socket()
    # A small receive window, so that what the server sends waits in the server's buffers.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(addr)
    s.settimeout(10)
    return s


def flood(sock: socket.socket, chunk: bytes, total: int, pair: Pair) -> bool:
    """Send ``chunk`` until ``total`` bytes went out or the server cut us; True if cut."""
    sent = 0
    deadline = time.monotonic() + 60
    while sent < total and time.monotonic() < deadline:
        try:
            sock.sendall(chunk)
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            # The server stopped reading us and did not cut us: the bug this file is about.
            return False
        sent += len(chunk)
        if sent % (8 * len(chunk)) == 0:
            pair.check()
    return False


def wait_metric(srv, name: str, cond, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = srv.metrics()
        if cond(m.get(name, 0)) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


@pytest.mark.parametrize("logged_in", [False, True], ids=["anonymous", "logged-in"])
def test_ping_flood_that_never_reads_is_cut_and_rss_stays_bounded(server_factory, logged_in):
    srv = start(server_factory, "--login-timeout", "120")
    pair = Pair(srv.addr)
    pair.check()
    rss0 = srv.metrics()["iris_rss_bytes"]
    s = non_reader(srv.addr)
    if logged_in:
        s.sendall(N.encode((N.LOGIN, 1, "pinger", "")))
    pings = b"".join(N.encode((N.PING, i)) for i in range(1 << 16))  # 832 KiB
    assert flood(s, pings, FLOOD_BYTES, pair), "the server kept reading a client that never reads"
    m = wait_metric(srv, 'iris_frames_rejected_total{reason="slow_reader"}', lambda v: v >= 1)
    assert m['iris_frames_rejected_total{reason="slow_reader"}'] == 1
    # Bounded by the connection's bound (plus a few reads' worth of transient frames: about
    # 7-9 MB measured), not by the 40 MiB of PONGs the attacker asked for.
    grew = m["iris_rss_bytes"] - rss0
    assert grew < FLOOD_BYTES // 2, f"worker RSS grew by {grew} bytes"
    assert m["iris_pending_write_bytes"] == 0
    assert m["iris_connections"] == 2
    assert "cutting" in srv.full_log() and "limit" in srv.full_log()
    s.close()
    pair.check()


def test_send_flood_that_never_reads_its_errors_is_cut(server_factory):
    # Every SEND to an invalid recipient gets an ERROR (a refusal, not a protocol error: the
    # connection is not closed for it) that the attacker never reads.
    srv = start(server_factory)
    pair = Pair(srv.addr)
    s = non_reader(srv.addr)
    s.sendall(N.encode((N.LOGIN, 1, "sender-flood", "")))
    sends = N.encode_batch([(N.SEND, f"f{i:06d}", "no\0body", b"x") for i in range(20_000)])
    assert flood(s, sends, FLOOD_BYTES, pair), "the server kept reading a client that never reads"
    m = wait_metric(srv, 'iris_frames_rejected_total{reason="slow_reader"}', lambda v: v >= 1)
    assert m['iris_frames_rejected_total{reason="slow_reader"}'] == 1
    assert m["iris_connections"] == 2
    s.close()
    pair.check()


def test_fatal_errors_and_login_timeouts_do_not_wait_for_a_client_that_never_reads(
    server_factory,
):
    srv = start(server_factory, "--login-timeout", "1.5")
    pair = Pair(srv.addr)
    # Enough answers to fill the kernel's buffers, not enough to reach the bound: what is left
    # waits in the worker, and a graceful close would wait for it forever.
    pings = b"".join(N.encode((N.PING, i)) for i in range(40_000))  # 520 KB
    anonymous = non_reader(srv.addr)
    anonymous.sendall(pings)
    flooder = non_reader(srv.addr)
    flooder.sendall(N.encode((N.LOGIN, 1, "login-flood", "")) + pings)
    # Then LOGIN again and again: ALREADY_LOGGED_IN until TOO_MANY_ERRORS, which is fatal.
    flooder.sendall(N.encode((N.LOGIN, 1, "login-flood", "")) * 40)
    m = wait_metric(srv, "iris_connections", lambda v: v <= 2, timeout=15)
    assert m["iris_connections"] == 2, "a cut connection still waits for its client to read"
    assert m["iris_login_timeouts_total"] >= 1
    assert m['iris_frames_rejected_total{reason="too_many_errors"}'] == 1
    assert m.get('iris_frames_rejected_total{reason="slow_reader"}', 0) == 0
    pair.check()
    # What reached the clients ends: no connection stays half alive.
    for sock in (anonymous, flooder):
        try:
            while sock.recv(1 << 16):
                pass
        except ConnectionResetError:
            pass
        sock.close()
    pair.check()


def test_a_client_that_never_reads_cannot_hold_the_worker_paused(server_factory):
    # The worker bound is below the connection bound: one non-reader passes it, the worker
    # pauses reading from everyone (checked at this flush, not at the next transition), and
    # since that client will never drain, it is cut after a few seconds of pause.
    srv = start(server_factory, "--max-pending-writes", "300000", "--login-timeout", "120")
    pair = Pair(srv.addr)
    pair.check()
    s = non_reader(srv.addr)
    s.sendall(N.encode((N.LOGIN, 1, "hostage-taker", "")))
    s.sendall(b"".join(N.encode((N.PING, i)) for i in range(60_000)))  # 780 KB of PONGs
    m = wait_metric(srv, "iris_write_backpressure_total", lambda v: v >= 1)
    assert m["iris_write_backpressure_total"] >= 1, "the worker bound was not enforced"
    t0 = time.monotonic()
    pair.check(timeout=30)  # held while reads are paused, served once the hog is cut
    m = srv.metrics()
    assert m['iris_frames_rejected_total{reason="slow_reader"}'] == 1
    assert m["iris_connections"] == 2
    print(f"pair waited {time.monotonic() - t0:.1f} s behind the paused reads")
    s.close()
    pair.check()
