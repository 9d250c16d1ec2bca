"""One copy per (sender, msg_id) across the pair, whatever the interleaving of a resend.

The sender's client resends an unACKed message to the other node after a reconnect. If the first
node's copy has not reached the second yet (the proxy holds a's replication stream), both nodes
take the message: each test here makes that happen at one race point, lets replication finish,
then reads both nodes' LMDB files: the same single copy on both (or none, once delivered and
acknowledged), and the recipient gets it once.
"""

from __future__ import annotations

import time
from pathlib import Path

import iris_native as N
import lmdb
import pytest
from rawclient import RawClient

from iris_fast import protocol as P
from iris_fast.storage.mailbox import decode_value

pytestmark = pytest.mark.timeout(120)

MSG = "dup-1"
# Long enough that the blackholed stream is not given up on while a test works (the proxy
# holds a's records for a few seconds at most), so the race is resolved by replication itself.
SLOW_PEER = ("--peer-timeout", "8")


def copies(node, user: str = "bob", msg_id: str = MSG) -> list[int]:
    """Seqs of the stored messages ``msg_id`` of ``user`` in ``node``'s LMDB file."""
    env = lmdb.open(str(Path(node.data_dir) / "mailbox"), readonly=True, max_dbs=300)
    try:
        db = env.open_db(b"msgs", create=False)
        prefix = user.encode() + b"\x00"
        out = []
        with env.begin(db=db) as txn:
            cur = txn.cursor()
            if cur.set_range(prefix):
                for key, value in cur:
                    if not key.startswith(prefix):
                        break
                    if decode_value(value)[1] == msg_id:
                        out.append(int.from_bytes(key[len(prefix) :], "big"))
        return out
    finally:
        env.close()


def settle(pair, expect: int, timeout: float = 15.0) -> list[int]:
    """Until both nodes hold the same ``expect`` copies of MSG; returns their seqs."""
    deadline = time.monotonic() + timeout
    seen: tuple = ()
    while time.monotonic() < deadline:
        seen = (copies(pair.a), copies(pair.b))
        if seen[0] == seen[1] and len(seen[0]) == expect:
            return seen[0]
        time.sleep(0.05)
    raise AssertionError(f"copies of {MSG} on a, b: {seen}; expected the same {expect} on both")


def deliveries(frames: list[tuple]) -> list[tuple]:
    return [f for f in frames if f[0] == N.DELIVER and f[4] == MSG]


def first_copy_on_a(pair) -> None:
    """alice sends MSG to a, whose stream to b is held; she gives up on a (no ACK)."""
    pair.ab.blackhole()
    s = RawClient(pair.a.addr)
    s.login("alice")
    s.send((N.SEND, MSG, "bob", b"once"))
    deadline = time.monotonic() + 10
    while not copies(pair.a) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(copies(pair.a)) == 1 and copies(pair.b) == []
    assert s.next(timeout=0.2) is None, "no ACK: b cannot have it"
    s.close()


def nobody_gets_it_again(pair) -> None:
    for node in (pair.a, pair.b):
        r = RawClient(node.addr)
        r.login("bob")
        assert deliveries(r.drain(0.5)) == []
        r.close()


def test_stored_on_both_nodes_keeps_one(pair_factory):
    pair = pair_factory(2, *SLOW_PEER)
    first_copy_on_a(pair)
    s = RawClient(pair.b.addr)
    s.login("alice")
    s.send((N.SEND, MSG, "bob", b"once"))
    assert s.expect(N.ACK, timeout=10) == (N.ACK, MSG, N.ACK_STORED)
    pair.ab.heal()
    [seq] = settle(pair, 1)
    r = RawClient(pair.a.addr)
    r.login("bob")
    got = deliveries(r.drain(1.0))
    assert [(d[4], d[5]) for d in got] == [(MSG, b"once")]
    r.send((N.DELIVER_ACK, got[-1][1]))
    settle(pair, 0)
    r.close()
    nobody_gets_it_again(pair)


@pytest.mark.parametrize("live_timeout", ["30", "0.05"])
def test_live_on_the_other_node_unacknowledged_keeps_one(pair_factory, live_timeout):
    """b delivers the resend live to bob, who has not acknowledged it when a's copy arrives.
    30 s: still a live delivery then; 0.05 s: b has stored it meanwhile (its own copy)."""
    pair = pair_factory(2, *SLOW_PEER, "--live-ack-timeout", live_timeout)
    bob = RawClient(pair.b.addr)
    bob.login("bob")
    first_copy_on_a(pair)
    s = RawClient(pair.b.addr)
    s.login("alice")
    s.send((N.SEND, MSG, "bob", b"once"))
    d = bob.expect(N.DELIVER)
    assert d[4] == MSG
    pair.ab.heal()
    # Durable on both nodes now (a's copy, or the lower of two): the sender hears STORED.
    assert s.expect(N.ACK, timeout=10) == (N.ACK, MSG, N.ACK_STORED)
    settle(pair, 1)
    assert deliveries(bob.drain(0.5)) == [], "not delivered a second time"
    bob.send((N.DELIVER_ACK, d[1]))
    settle(pair, 0)
    assert deliveries(bob.drain(0.5)) == []
    bob.close()
    nobody_gets_it_again(pair)


def test_delivered_on_the_other_node_leaves_none(pair_factory):
    """b delivers the resend live and bob acknowledges it before a's copy arrives: a's copy
    must go too (b sends its deletion back)."""
    pair = pair_factory(2, *SLOW_PEER, "--live-ack-timeout", "30")
    bob = RawClient(pair.b.addr)
    bob.login("bob")
    first_copy_on_a(pair)
    s = RawClient(pair.b.addr)
    s.login("alice")
    s.send((N.SEND, MSG, "bob", b"once"))
    d = bob.expect(N.DELIVER)
    bob.send((N.DELIVER_ACK, d[1]))
    assert s.expect(N.ACK, timeout=10) == (N.ACK, MSG, 0)
    pair.ab.heal()
    settle(pair, 0)
    assert deliveries(bob.drain(0.5)) == []
    bob.close()
    nobody_gets_it_again(pair)


def test_live_ack_waits_for_the_dedup_record_on_the_peer(pair_factory):
    """The ACK of a live delivery comes only once the peer has the message's dedup record: a
    resend to the peer right after that ACK is a duplicate there, not a second message."""
    pair = pair_factory(2, *SLOW_PEER, "--live-ack-timeout", "30")
    bob = RawClient(pair.a.addr)
    bob.login("bob")
    s = RawClient(pair.a.addr)
    s.login("alice")
    pair.ab.blackhole()
    s.send((N.SEND, MSG, "bob", b"once"))
    d = bob.expect(N.DELIVER)
    bob.send((N.DELIVER_ACK, d[1]))
    # Delivered, but the peer cannot have heard of it: no ACK yet.
    assert s.next(timeout=0.5) is None
    pair.ab.heal()
    assert s.expect(N.ACK, timeout=10) == (N.ACK, MSG, 0)
    s2 = RawClient(pair.b.addr)
    s2.login("alice")
    s2.send((N.SEND, MSG, "bob", b"once"))
    assert s2.expect(N.ACK, timeout=10) == (N.ACK, MSG, N.ACK_DUPLICATE)
    settle(pair, 0)
    nobody_gets_it_again(pair)


def test_resend_while_the_peers_copy_is_applied_waits_for_it(pair):
    """b has a's PUT but has not made it durable yet (the test holds b's LMDB write lock, which
    stalls b's writer, not its event loop): a resend to b is not ACKed before b has the copy."""
    env = lmdb.open(str(Path(pair.b.data_dir) / "mailbox"), max_dbs=300)
    try:
        txn = env.begin(write=True)
        try:
            s1 = RawClient(pair.a.addr)
            s1.login("alice")
            s1.send((N.SEND, MSG, "bob", b"once"))
            time.sleep(0.5)  # a's record reaches b, whose writer waits for the lock
            s2 = RawClient(pair.b.addr)
            s2.login("alice")
            s2.send((N.SEND, MSG, "bob", b"once"))
            assert s2.next(timeout=0.5) is None, "ACKed before b holds a copy"
        finally:
            txn.abort()
    finally:
        env.close()
    assert s2.expect(N.ACK, timeout=10) == (N.ACK, MSG, N.ACK_STORED | N.ACK_DUPLICATE)
    assert s1.expect(N.ACK, timeout=10) == (N.ACK, MSG, N.ACK_STORED)
    settle(pair, 1)
    r = RawClient(pair.b.addr)
    r.login("bob")
    got = deliveries(r.drain(1.0))
    assert len(got) == 1


def test_a_deletion_seen_from_both_nodes_counts_once(pair_factory):
    """bob has m1 in flight on both nodes; his ack on b deletes it there and (replicated) on a;
    his ack of the same message on a must not take a second message off a's count, or the
    mailbox would take one more message than --mailbox-limit."""
    pair = pair_factory(2, "--mailbox-limit", "3", "--max-inflight", "1")
    s = RawClient(pair.a.addr)
    s.login("alice")
    s.send(*[(N.SEND, f"m{i}", "bob", b"x") for i in (1, 2, 3)])
    assert [f[2] for f in s.collect(N.ACK, 3)] == [N.ACK_STORED] * 3
    on_a = RawClient(pair.a.addr)
    on_a.login("bob")
    da = on_a.expect(N.DELIVER)
    on_b = RawClient(pair.b.addr)
    on_b.login("bob")
    db = on_b.expect(N.DELIVER)
    assert da[4] == db[4] == "m1"
    applied = pair.a.metrics()["iris_repl_records_applied_total"]
    on_b.send((N.DELIVER_ACK, db[1]))
    deadline = time.monotonic() + 10
    while pair.a.metrics()["iris_repl_records_applied_total"] <= applied:
        assert time.monotonic() < deadline, "b's deletion never applied on a"
        time.sleep(0.05)
    on_a.send((N.DELIVER_ACK, da[1]))
    assert on_a.expect(N.DELIVER)[4] == "m2"  # the ack was processed
    # m2, m3 stored: one more fits, the next one does not.
    s.send((N.SEND, "m4", "bob", b"x"))
    assert s.expect(N.ACK) == (N.ACK, "m4", N.ACK_STORED)
    s.send((N.SEND, "m5", "bob", b"x"))
    err = s.expect(N.ERROR)
    assert err[1:3] == (P.E_MAILBOX_FULL, "m5"), err
