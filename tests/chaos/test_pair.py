"""Pair replication with two real nodes: replication, cross-node delivery, degraded mode.

The acceptance tests of the design document (kill -9, partitions, rolling restarts) are in
``test_failures.py``; this file covers the everyday behaviour they build on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import iris_native as N
import pytest
from rawclient import RawClient

from iris_fast import protocol as P
from iris_fast.client import IrisClient

pytestmark = pytest.mark.timeout(180)


def wait_for(pred, timeout: float = 10.0, what: str = "condition") -> float:
    """Poll ``pred`` until true; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if pred():
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_stored_message_is_on_both_nodes_before_its_ack(pair):
    s = RawClient(pair.a.addr)
    s.login("alice")
    for i in range(20):
        s.send((N.SEND, f"m{i}", "bob", b"x%d" % i))
    acks = s.collect(N.ACK, 20)
    # Stored on both nodes, nothing degraded: the flag is STORED only.
    assert {a[2] for a in acks} == {N.ACK_STORED}
    # b applied a's records before a ACKed: bob reads all 20 from b.
    r = RawClient(pair.b.addr)
    r.login("bob")
    got = r.collect(N.DELIVER, 20)
    assert [d[4] for d in got] == [f"m{i}" for i in range(20)]
    r.send((N.DELIVER_ACK, got[-1][1]))
    mb = pair.b.metrics()
    assert mb["iris_repl_records_applied_total"] >= 20
    # bob's DELIVER_ACK on b deletes the message on a too: logging in on a gets nothing.
    wait_for(lambda: pair.a.metrics()["iris_repl_records_applied_total"] >= 20, what="DELs on a")
    r2 = RawClient(pair.a.addr)
    r2.login("bob")
    assert [f for f in r2.drain(0.5) if f[0] == N.DELIVER] == []


def test_a_frozen_peer_withholds_the_ack_until_the_peer_timeout(pair):
    """The ACK above really waits for the peer: with the peer silent (the proxy holds a's
    records and b's acks, no FIN), no ACK comes; after --peer-timeout (1 s here) a gives up on
    the peer and the ACK comes with ACK_DEGRADED. Asynchronous replication would ACK at once."""
    s = RawClient(pair.a.addr)
    s.login("alice")
    pair.ab.blackhole()
    start = time.monotonic()
    s.send((N.SEND, "f1", "bob", b"while b is frozen"))
    # Well below the 1 s peer timeout: withheld, although a's own commit took milliseconds.
    assert s.next(timeout=0.6) is None
    ack = s.expect(N.ACK, timeout=10)
    took = time.monotonic() - start
    assert ack == (N.ACK, "f1", N.ACK_STORED | N.ACK_DEGRADED)
    # The silence is counted from the peer's last heartbeat, up to 0.25 s before the freeze.
    assert took >= 0.6, f"ACK after {took:.2f} s, before the peer timeout"
    assert pair.a.health()["degraded"]
    pair.ab.heal()
    pair.wait_paired()
    # b catches up: bob reads the message from b.
    r = RawClient(pair.b.addr)
    r.login("bob")
    assert r.expect(N.DELIVER)[4:] == ("f1", b"while b is frozen")


def test_a_live_delivery_left_unacknowledged_is_on_both_nodes_before_its_ack(pair):
    """The recipient is online on a but its application is not reading: after
    --live-ack-timeout a stores the message, and the sender's ACK (STORED, not degraded)
    waits until b has it too."""
    idle = IrisClient(*pair.a.addr, timeout=10)
    idle.login("idle-bob")
    s = IrisClient(*pair.a.addr, timeout=10)
    s.login("alice")
    start = time.monotonic()
    mid = s.send_msg("idle-bob", b"kept on both")
    assert time.monotonic() - start < 1.0
    assert s.last_ack_flags == N.ACK_STORED
    # Another device of idle-bob, on b, reads it from b's own mailbox.
    r = RawClient(pair.b.addr)
    r.login("idle-bob")
    assert r.expect(N.DELIVER)[3:] == ("alice", mid, b"kept on both")
    idle.close()
    s.close()


def test_live_delivery_to_a_user_on_the_other_node(pair):
    bob = IrisClient(*pair.b.addr, timeout=10)
    bob.login("bob")
    alice = IrisClient(*pair.a.addr, timeout=10)
    alice.login("alice")
    for i in range(50):
        alice.send_msg("bob", b"hi %d" % i)
        msg = bob.recv(timeout=5)
        assert (msg.sender, msg.body) == ("alice", b"hi %d" % i)
    assert alice.last_ack_flags & N.ACK_DEGRADED == 0
    alice.close()
    bob.close()


def test_both_nodes_take_writes_for_one_mailbox_in_order(pair):
    """Senders on both nodes, one recipient: every message once, each sender's in order."""
    s1 = IrisClient(*pair.a.addr, timeout=10)
    s1.login("s1")
    s2 = IrisClient(*pair.b.addr, timeout=10)
    s2.login("s2")
    for i in range(30):
        s1.send_msg("rcpt", b"%d" % i)
        s2.send_msg("rcpt", b"%d" % i)
    r = IrisClient(*pair.a.addr, timeout=10)
    r.login("rcpt")
    got: dict[str, list[int]] = {"s1": [], "s2": []}
    for _ in range(60):
        m = r.recv(timeout=5)
        got[m.sender].append(int(m.body))
    assert got == {"s1": list(range(30)), "s2": list(range(30))}
    assert r.duplicates_dropped == 0
    r.close()


def test_peer_down_means_degraded_acks_and_health(pair):
    pair.b.kill9()
    wait_for(lambda: pair.a.health()["degraded"], what="a degraded")
    h = pair.a.health()
    assert h["status"] == "degraded" and h["role"] == "alone"
    s = RawClient(pair.a.addr)
    ok = s.login("alice")
    assert ok[2] & 1, "LOGIN_OK flag bit 0 says degraded"
    s.send((N.SEND, "d1", "bob", b"one copy"))
    assert s.expect(N.ACK) == (N.ACK, "d1", N.ACK_STORED | N.ACK_DEGRADED)
    m = pair.a.metrics()
    assert m["iris_repl_degraded"] == 1
    assert m["iris_repl_degraded_acks_total"] >= 1
    assert m["iris_repl_failovers_total"] >= 1
    assert m["iris_repl_lag_records"] >= 1
    # b comes back, catches up without an operator, and the pair is healthy again.
    pair.b.start(accept=("ok", "degraded"))
    pair.wait_paired()
    r = RawClient(pair.b.addr)
    r.login("bob")
    assert r.expect(N.DELIVER)[4:] == ("d1", b"one copy")
    assert pair.a.metrics()["iris_repl_lag_records"] == 0


def test_status_shows_the_pair(pair):
    out = subprocess.run(
        [sys.executable, "-m", "iris_fast", "status", "--json",
         "--http", f"127.0.0.1:{pair.a.http_port},127.0.0.1:{pair.b.http_port}"],
        capture_output=True, text=True, timeout=30, cwd="/",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["role"] for r in rows] == ["paired", "paired"]
    assert [r["peer_node"] for r in rows] == ["b", "a"]
    assert all(r["lag_records"] == 0 for r in rows)
    pair.b.kill9()
    wait_for(lambda: pair.a.health()["degraded"], what="a degraded")
    out = subprocess.run(
        [sys.executable, "-m", "iris_fast", "status",
         "--http", f"127.0.0.1:{pair.a.http_port},127.0.0.1:{pair.b.http_port}"],
        capture_output=True, text=True, timeout=30, cwd="/",
    )  # fmt: skip
    assert out.returncode == 1
    assert "alone" in out.stdout and "DOWN" in out.stdout


def test_a_misconfigured_peer_is_refused_with_a_reason(server_factory, tmp_path):
    from iris_fast.ports import free_port

    ra, rb = free_port(), free_port()
    a = server_factory("--workers", "2", "--repl-port", str(ra), "--peer", f"127.0.0.1:{rb}",
                       node_id="a", start=False)  # fmt: skip
    b = server_factory("--workers", "1", "--repl-port", str(rb), "--peer", f"127.0.0.1:{ra}",
                       node_id="b", start=False)  # fmt: skip
    a.start(accept=("degraded",))
    b.start(accept=("degraded",))
    wait_for(lambda: "same --workers" in a.full_log() + b.full_log(), what="refusal logged")
    assert a.health()["degraded"] and b.health()["degraded"]
    wait_for(
        lambda: (
            a.metrics().get("iris_repl_links_refused_total", 0)
            + b.metrics().get("iris_repl_links_refused_total", 0)
            > 0
        ),
        what="refusal counted",
    )


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"\x00\x00\x00\x05GET /", "bad frame"),
        (N.encode((N.REPL_ACK, 0, 5)), "first frame must be REPL_HELLO"),
        (N.encode((N.REPL_HELLO, 9, "x", 1, 2, 0, [(0, 0)])), "protocol version 9"),
        (N.encode((N.REPL_HELLO, N.REPL_VERSION, "b", 1, 2, 0, [(0, 0)])), "has our node id"),
        (N.encode((N.REPL_HELLO, N.REPL_VERSION, "zz", 1, 2, 0, [(7, 0)])), "expected one of 0..1"),
        (b"\xff\xff\xff\xff", "bad frame"),
    ],
)
def test_hostile_bytes_on_the_replication_port_are_refused(pair, payload, reason):
    """Whatever reaches the replication port that is not a proper peer gets the link closed,
    with the reason in the log; the pair keeps replicating."""
    import socket

    with socket.create_connection(("127.0.0.1", pair.repl_b), timeout=5) as s:
        s.sendall(payload)
        s.settimeout(5)
        assert s.recv(100) == b"", "the node closes the link"
    wait_for(lambda: reason in pair.b.full_log(), what=f"{reason!r} logged")
    alice = IrisClient(*pair.a.addr, timeout=10)
    alice.login("alice")
    alice.send_msg("zed", b"still replicating")
    assert alice.last_ack_flags == N.ACK_STORED
    alice.close()
    assert pair.b.health()["status"] == "ok"


def test_a_crashed_worker_rejoins_the_pair_and_catches_up(pair):
    """kill -9 of one worker (not the node): its streams drop, the supervisor restarts it, and
    both directions of its streams resume where they were."""
    import os
    import signal

    from iris_fast.server.links import home_of

    users = [u for u in (f"w1-{i}" for i in range(200)) if home_of(u, 2) == 1][:5]
    victim = next(w for w in pair.a.health()["workers"] if w["index"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    # b goes on with a's worker 1 gone: its stream 1 is degraded, and it keeps taking writes.
    s = IrisClient(*pair.b.addr, timeout=10)
    s.login("sender")
    for u in users:
        s.send_msg(u, b"while a's worker 1 was down")
    pair.wait_paired()
    for u in users:
        r = IrisClient(*pair.a.addr, timeout=10)
        r.login(u)
        assert r.recv(timeout=10).body == b"while a's worker 1 was down"
        r.close()
    s.close()


def test_a_group_commit_over_16_mib_replicates_and_is_acked(pair_factory):
    """300 SENDs of 60 KB land in one group commit of 18 MB, above one replication frame's
    16 MiB: the origin splits the commit by bytes, every SEND is ACKed without the degraded
    flag, and every message is on the peer. To make it one commit, the worker is stopped
    (SIGSTOP) while 300 clients each write one SEND, so its next loop tick reads all of them."""
    import os
    import signal

    # A peer timeout well above the stop, so the link stays up (no catch-up path involved).
    pair = pair_factory(1, "--peer-timeout", "10")
    bodies = [bytes([i % 251]) * 60_000 for i in range(300)]
    clients = []
    for i in range(300):
        c = RawClient(pair.a.addr, timeout=30)
        c.login(f"big-s{i}")
        clients.append(c)
    worker = pair.a.health()["workers"][0]["pid"]
    os.kill(worker, signal.SIGSTOP)
    try:
        for i, c in enumerate(clients):
            c.send((N.SEND, f"big-{i}", "big-rcpt", bodies[i]))
    finally:
        os.kill(worker, signal.SIGCONT)
    for i, c in enumerate(clients):
        assert c.expect(N.ACK, timeout=30) == (N.ACK, f"big-{i}", N.ACK_STORED), i
        c.sock.close()
    m = pair.a.metrics()
    assert m["iris_repl_records_sent_total"] >= 300
    # More than one frame per 16 MiB: the commit went out in several REPL_APPENDs.
    assert m["iris_repl_appends_sent_total"] >= 2
    assert "exceeds max_frame" not in pair.a.full_log()
    r = IrisClient(*pair.b.addr, timeout=30)
    r.login("big-rcpt")
    got = {r.recv(timeout=30).body for _ in range(300)}
    assert got == set(bodies)
    r.close()


def test_the_largest_client_frame_with_a_long_sender_replicates(pair_factory):
    """The largest message a 16 MiB client frame can carry (its DELIVER fills the frame), from
    and to 200-byte user ids: its replication record is larger than the client frame (it adds
    the recipient). It is logged, replicated, ACKed and on the peer, instead of failing to
    encode inside the SEND handler."""
    pair = pair_factory(1, "--max-frame", str(16 << 20), "--mailbox-max-bytes", str(64 << 20))
    sender, to = "s" * 200, "r" * 200
    s = RawClient(pair.a.addr, timeout=30)
    s.login(sender)
    # The body takes the rest of the DELIVER that --max-frame allows (a SEND whose DELIVER
    # would not fit is refused: tests/hostile/test_frame_bounds.py).
    body = b"x" * ((16 << 20) - P.deliver_len(sender, "g1", 0))
    s.send((N.SEND, "g1", to, body))
    assert s.expect(N.ACK, timeout=60) == (N.ACK, "g1", N.ACK_STORED)
    s.sock.close()
    # On b's disk (delivering it to a client is the client protocol's business, not this test's).
    assert pair.b.terminate() == 0
    from chaos.test_failures import mailbox_rows
    from iris_fast.storage.mailbox import decode_value

    [(key, value)] = mailbox_rows(pair.b.data_dir)
    got_sender, msg_id, _ts, got_body = decode_value(value)
    assert (key[:201], got_sender, msg_id, got_body == body) == (
        to.encode() + b"\x00",
        sender,
        "g1",
        True,
    )
