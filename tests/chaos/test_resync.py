"""Stream identity and full copies: a node whose data directory was wiped, or restored from an
older copy, must not be trusted on its LSN claim (docs/replication.md, "Stream identity").

Each test fails on the code before the stream epoch existed: the origin either looped forever on
"LSN not in the log" (the pair never healed) or trimmed records the peer never had.
"""

from __future__ import annotations

import shutil
import time

import iris_native as N
import pytest
from rawclient import RawClient

from chaos.test_failures import mailbox_rows, receive_exactly, wait_for
from iris_fast.client import IrisClient

pytestmark = pytest.mark.timeout(300)


def send_batch(addr, sender: str, tag: str, n: int, users: int = 7) -> list[int]:
    """``n`` SENDs from ``sender`` to ``users`` recipients; returns the ACK flags."""
    s = RawClient(addr, timeout=30)
    s.login(sender)
    for i in range(n):
        s.send((N.SEND, f"{tag}{i}", f"user{i % users}", b"%s %d" % (tag.encode(), i)))
    acks = s.collect(N.ACK, n, timeout=60)
    s.sock.close()
    # ACKs of recipients on different workers may come in any order.
    assert sorted(a[1] for a in acks) == sorted(f"{tag}{i}" for i in range(n))
    return [a[2] for a in acks]


def wait_lag_zero(*nodes) -> None:
    for n in nodes:
        wait_for(lambda n=n: n.metrics()["iris_repl_lag_records"] == 0, what="lag 0")


def expected(tags: list[tuple[str, int]], users: int = 7) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {f"user{u}": [] for u in range(users)}
    for tag, n in tags:
        for i in range(n):
            out[f"user{i % users}"].append(b"%s %d" % (tag.encode(), i))
    return out


def test_a_wiped_node_gets_a_full_copy_of_its_peer(pair):
    """Replace b: stop it, wipe its data directory, start it. b gets every mailbox a has (both
    streams, both workers), byte for byte, and the pair is healthy again."""
    assert set(send_batch(pair.a.addr, "alice", "a", 200)) == {N.ACK_STORED}
    assert set(send_batch(pair.b.addr, "bob", "b", 60)) == {N.ACK_STORED}
    # Deletions too: user0 reads its messages on b.
    r = RawClient(pair.b.addr)
    r.login("user0")
    got = r.collect(N.DELIVER, 29 + 9)
    r.send((N.DELIVER_ACK, got[-1][1]))
    # a has b's 60 PUTs and then the 38 deletions.
    wait_for(lambda: pair.a.metrics()["iris_repl_records_applied_total"] >= 98, what="DELs on a")
    r.sock.close()
    wait_lag_zero(pair.a, pair.b)
    pair.b.kill9()
    shutil.rmtree(pair.b.data_dir)
    pair.b.data_dir.mkdir()
    pair.b.start(accept=("ok", "degraded"))
    pair.wait_paired()
    assert "full copy" in pair.a.full_log()
    assert pair.a.metrics()["iris_repl_full_copies_sent_total"] >= 2  # one per stream
    assert pair.b.metrics()["iris_repl_full_copies_applied_total"] >= 2
    # The copied PUTs entered b's dedup window: a resend to b of a message a stored is recognised.
    s = RawClient(pair.b.addr)
    s.login("alice")
    s.send((N.SEND, "a5", "user5", b"a 5"))
    assert s.expect(N.ACK)[2] & N.ACK_DUPLICATE
    s.sock.close()
    wait_lag_zero(pair.a, pair.b)
    assert pair.a.terminate() == 0
    assert pair.b.terminate() == 0
    rows = mailbox_rows(pair.a.data_dir)
    assert len(rows) == 200 + 60 - 38
    assert mailbox_rows(pair.b.data_dir) == rows


def test_a_node_restored_from_an_older_copy_loses_nothing(pair):
    """b comes back on an older copy of its data directory: its applied LSN is behind what it
    acknowledged and a's log no longer holds the records between. a sends a full copy (no
    trim of the records b never had) and b ends up with everything, in order, once each."""
    send_batch(pair.a.addr, "alice", "one", 70)
    wait_lag_zero(pair.a, pair.b)
    assert pair.b.terminate() == 0
    backup = pair.b.data_dir.parent / "b-backup"
    shutil.copytree(pair.b.data_dir, backup)
    pair.b.start(accept=("ok", "degraded"))
    pair.wait_paired()
    assert set(send_batch(pair.a.addr, "alice", "two", 70)) == {N.ACK_STORED}
    wait_lag_zero(pair.a)  # acknowledged by b, so trimmed from a's log
    pair.b.kill9()
    # Records b never had, ACKed degraded: they are only in a's log.
    assert all(f & N.ACK_DEGRADED for f in send_batch(pair.a.addr, "alice", "three", 70))
    shutil.rmtree(pair.b.data_dir)
    shutil.copytree(backup, pair.b.data_dir)
    pair.b.start(accept=("ok", "degraded"))
    pair.wait_paired()
    assert "full copy" in pair.a.full_log()
    wait_lag_zero(pair.a, pair.b)
    pair.a.kill9()
    want = expected([("one", 70), ("two", 70), ("three", 70)])
    for user, bodies in want.items():
        assert [m.body for m in receive_exactly(pair.b.addr, user, len(bodies))] == bodies


def test_a_peer_claiming_more_than_we_have_gets_no_trim(pair):
    """a comes back on an older copy of its own data directory: b has applied LSNs of a's stream
    that a's log never had, then a logs new records under the same numbers while cut off. b's
    claim must not trim them or ACK them as replicated: a takes a new stream epoch and sends a
    full copy, and b has every message a ACKed."""
    send_batch(pair.a.addr, "alice", "one", 40)
    wait_lag_zero(pair.a, pair.b)
    assert pair.a.terminate() == 0
    backup = pair.a.data_dir.parent / "a-backup"
    shutil.copytree(pair.a.data_dir, backup)
    pair.a.start(accept=("ok", "degraded"))
    pair.wait_paired()
    send_batch(pair.a.addr, "alice", "two", 40)
    wait_lag_zero(pair.a)
    assert pair.a.terminate() == 0
    shutil.rmtree(pair.a.data_dir)
    shutil.copytree(backup, pair.a.data_dir)
    pair.partition()
    pair.a.start(accept=("ok", "degraded"))
    # Fewer records than b is ahead by: their LSNs are all at or below b's claim.
    assert all(f & N.ACK_DEGRADED for f in send_batch(pair.a.addr, "alice", "three", 10))
    time.sleep(0.5)
    pair.heal()
    pair.wait_paired()
    wait_lag_zero(pair.a, pair.b)
    pair.a.kill9()
    want = expected([("one", 40), ("two", 40), ("three", 10)])
    for user, bodies in want.items():
        assert [m.body for m in receive_exactly(pair.b.addr, user, len(bodies))] == bodies
    assert "new stream epoch" in pair.a.full_log()


def test_seq_order_survives_a_failover_to_a_node_whose_clock_lags(pair_factory):
    """b's clock is an hour behind a's. A sender writes m1 through a while a's stream to b is
    cut (b has not seen m1), then m2 through b. b must not number m2 below m1: it knows a's
    sequence clock from the heartbeats of the link that is still up, and its own counter never
    goes below what either node issued. Once healed, the recipient gets m1 then m2."""
    pair = pair_factory(2, start=False)
    pair.b.env["IRIS_TEST_CLOCK_OFFSET_S"] = "-3600"
    pair.start()
    pair.ab.blackhole()  # a's stream to b only; b's stream to a (and its heartbeats) stay up
    wait_for(lambda: pair.a.health()["degraded"], what="a's stream cut")
    s = RawClient(pair.a.addr)
    s.login("mover")
    s.send((N.SEND, "m1", "rcpt", b"first"))
    assert s.expect(N.ACK)[2] & N.ACK_DEGRADED
    s.sock.close()
    time.sleep(1.5)  # several heartbeats (every 0.25 s) from a reach b
    s = RawClient(pair.b.addr)
    s.login("mover")
    s.send((N.SEND, "m2", "rcpt", b"second"))
    assert s.expect(N.ACK)[2] & N.ACK_STORED
    s.sock.close()
    pair.ab.heal()
    pair.wait_paired()
    wait_lag_zero(pair.a, pair.b)
    for node in (pair.b, pair.a):
        r = RawClient(node.addr)
        r.login("rcpt")
        got = r.collect(N.DELIVER, 2)
        assert [d[5] for d in got] == [b"first", b"second"], node.node_id
        r.sock.close()


def test_commits_lost_to_a_power_cut_do_not_alias_new_records(pair_factory):
    """A power cut loses a's last deletion batch after b applied it (deletions are committed
    without fsync): a restarts on its older state after a reboot and, cut off from b, logs more
    new records than it lost, under the same LSNs. b's claim is then within a's log, and only
    the reboot says its numbers mean other records: a takes a new epoch and b gets a full copy,
    so none of the new messages is missed. (The power cut is played by restoring a copy of a's
    data directory taken before the deletions, and IRIS_TEST_BOOT_ID stands in for the reboot.)"""
    pair = pair_factory(1)
    send_batch(pair.a.addr, "alice", "one", 20, users=1)
    wait_lag_zero(pair.a, pair.b)
    assert pair.a.terminate() == 0
    synced = pair.a.data_dir.parent / "a-synced"
    shutil.copytree(pair.a.data_dir, synced)
    pair.a.start(accept=("ok", "degraded"))
    pair.wait_paired()
    r = RawClient(pair.a.addr)
    r.login("user0")
    got = r.collect(N.DELIVER, 20)
    r.send((N.DELIVER_ACK, got[-1][1]))
    wait_for(lambda: pair.b.metrics()["iris_repl_records_applied_total"] >= 40, what="DELs on b")
    r.sock.close()
    pair.a.kill9()
    shutil.rmtree(pair.a.data_dir)
    shutil.copytree(synced, pair.a.data_dir)
    pair.a.env["IRIS_TEST_BOOT_ID"] = "after-a-power-cut"
    pair.partition()
    pair.a.start(accept=("ok", "degraded"))
    assert all(f & N.ACK_DEGRADED for f in send_batch(pair.a.addr, "alice", "two", 30, users=1))
    pair.heal()
    pair.wait_paired()
    wait_lag_zero(pair.a, pair.b)
    pair.a.kill9()
    # Every new message is there, in order, once. The 20 deleted ones may come back with the
    # copy (a lost their deletion, as any deletion lost to a power cut: redelivered), or not
    # (b's dedup window knows them): at most once each.
    c = IrisClient(*pair.b.addr, timeout=30)
    c.login("user0")
    got = []
    with pytest.raises(TimeoutError):
        while len(got) < 100:
            got.append(c.recv(timeout=1.5).body)
    assert c.duplicates_dropped == 0
    c.close()
    assert [b for b in got if b.startswith(b"two")] == [b"two %d" % i for i in range(30)]
    ones = [b for b in got if b.startswith(b"one")]
    assert len(ones) == len(set(ones))
