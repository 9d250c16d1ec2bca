"""The delivery contract on one node, with a real server process (docs/protocol.md, DESIGN.md)."""

from __future__ import annotations

import time

import iris_native as N
import pytest
from rawclient import RawClient

from iris_fast.client import IrisClient

pytestmark = pytest.mark.timeout(60)


def test_live_delivery_acks_after_the_device_acknowledged(server_factory):
    # A bound far above the test's waits: within it the ACK is end to end (past it the message
    # is stored instead, tests/test_live_ack_timeout.py).
    server = server_factory("--live-ack-timeout", "5")
    rcv = RawClient(server.addr)
    rcv.login("bob")
    snd = RawClient(server.addr)
    snd.login("alice")
    snd.send((N.SEND, "m1", "bob", b"hello bob"))
    d = rcv.expect(N.DELIVER)
    assert d[3:] == ("alice", "m1", b"hello bob")
    # No ACK before the recipient's DELIVER_ACK: the sender must not hear back yet.
    assert snd.next(timeout=0.3) is None
    rcv.send((N.DELIVER_ACK, d[1]))
    ack = snd.expect(N.ACK)
    assert ack == (N.ACK, "m1", 0)
    assert server.metrics()["iris_live_ack_timeouts_total"] == 0


def test_offline_messages_are_stored_then_delivered_in_order_at_login(server):
    c = IrisClient(*server.addr)
    c.login("sender")
    for i in range(20):
        c.send_msg("offline-user", f"M{i}")
    assert c.last_ack_flags & N.ACK_STORED
    c.close()
    r = IrisClient(*server.addr)
    r.login("offline-user")
    got = [r.recv_msg(timeout=5) for _ in range(20)]
    assert got == [f"M{i}".encode() for i in range(20)]
    with pytest.raises(TimeoutError):
        r.recv_msg(timeout=0.3)
    r.close()
    # Acknowledged deliveries leave storage: a second login gets nothing.
    r = RawClient(server.addr)
    r.login("offline-user")
    assert r.next(timeout=0.5) is None


def test_order_per_pair_survives_spill_from_live_to_storage(server_factory):
    # A window of 4 forces most messages through storage while the receiver is online.
    srv = server_factory("--max-inflight", "4")
    rcv = RawClient(srv.addr)
    rcv.login("r")
    a = RawClient(srv.addr)
    a.login("a")
    b = RawClient(srv.addr)
    b.login("b")
    n = 150
    a.send(*[(N.SEND, f"a{i}", "r", f"a{i}".encode()) for i in range(n)])
    b.send(*[(N.SEND, f"b{i}", "r", f"b{i}".encode()) for i in range(n)])
    seen: dict[str, list[int]] = {"a": [], "b": []}
    while len(seen["a"]) + len(seen["b"]) < 2 * n:
        f = rcv.expect(N.DELIVER, timeout=10)
        seen[f[3]].append(int(f[4][1:]))
        rcv.send((N.DELIVER_ACK, f[1]))
    assert seen["a"] == list(range(n))
    assert seen["b"] == list(range(n))
    assert len(a.collect(N.ACK, n)) == n
    assert len(b.collect(N.ACK, n)) == n


@pytest.mark.parametrize("online", [True, False])
def test_same_msg_id_resent_five_times_is_delivered_once(server, online):
    rcv = RawClient(server.addr) if online else None
    if rcv:
        rcv.login("dst")
    snd = RawClient(server.addr)
    snd.login("src")
    for _ in range(5):
        snd.send((N.SEND, "dup-1", "dst", b"once"))
    if rcv is None:
        acks = snd.collect(N.ACK, 5, timeout=5)
        assert acks[0] == (N.ACK, "dup-1", N.ACK_STORED)
        rcv = RawClient(server.addr)
        rcv.login("dst")
    d = rcv.expect(N.DELIVER)
    rcv.send((N.DELIVER_ACK, d[1]))
    assert rcv.next(timeout=0.5) is None, "a resend created a second delivery"
    # Resends after completion are answered with a DUPLICATE ACK, not a new message.
    snd.send((N.SEND, "dup-1", "dst", b"once"))
    acks = [f for f in snd.drain(0.5) if f[0] == N.ACK]
    assert acks and all(f[1] == "dup-1" for f in acks)
    assert acks[-1][2] & N.ACK_DUPLICATE
    assert server.metrics()["iris_messages_deduplicated_total"] >= 5


def test_hundred_offline_messages_survive_kill9_exactly_once(server):
    c = IrisClient(*server.addr)
    c.login("kill_sender")
    for i in range(100):
        c.send_msg("kill_receiver", f"KILL_{i}")
    c.close()
    server.kill9()
    server.restart()
    r = RawClient(server.addr)
    r.login("kill_receiver")
    frames = r.collect(N.DELIVER, 100, timeout=10)
    assert [f[5] for f in frames] == [f"KILL_{i}".encode() for i in range(100)]
    r.send((N.DELIVER_ACK, frames[-1][1]))
    assert r.next(timeout=0.5) is None, "more than 100 deliveries"


def test_sigterm_with_pending_deliveries_loses_nothing(server):
    rcv = RawClient(server.addr)
    rcv.login("slowpoke")
    snd = RawClient(server.addr)
    snd.login("fast")
    snd.send(*[(N.SEND, f"p{i}", "slowpoke", f"P{i}".encode()) for i in range(50)])
    # Delivered live but never acknowledged by the device...
    assert len(rcv.collect(N.DELIVER, 50)) == 50
    assert server.terminate() == 0
    server.restart()
    # ...so they were stored on the way down and come back, in order.
    rcv = RawClient(server.addr)
    rcv.login("slowpoke")
    frames = rcv.collect(N.DELIVER, 50)
    assert [f[5] for f in frames] == [f"P{i}".encode() for i in range(50)]
    rcv.send((N.DELIVER_ACK, frames[-1][1]))
    # The sender never got its ACKs (the node went down first): resending is safe.
    snd = RawClient(server.addr)
    snd.login("fast")
    snd.send(*[(N.SEND, f"p{i}", "slowpoke", f"P{i}".encode()) for i in range(50)])
    acks = snd.collect(N.ACK, 50)
    assert all(a[2] & N.ACK_DUPLICATE for a in acks)
    assert rcv.next(timeout=0.5) is None


def test_slow_reader_is_bounded_and_catches_up(server_factory):
    srv = server_factory("--max-inflight", "16")
    rcv = RawClient(srv.addr)
    rcv.login("slow")
    snd = RawClient(srv.addr)
    snd.login("firehose")
    n = 500
    snd.send(*[(N.SEND, f"s{i}", "slow", f"S{i}".encode()) for i in range(n)])
    # 16 go out live and wait for the device; the other 484 are made durable and ACKed.
    acks = snd.collect(N.ACK, n - 16, timeout=10)
    assert len(acks) == n - 16 and all(a[2] & N.ACK_STORED for a in acks)
    m = srv.metrics()
    assert m["iris_inflight_deliveries"] == 16
    assert m["iris_messages_stored_total"] == n - 16
    got = []
    while len(got) < n:
        f = rcv.expect(N.DELIVER, timeout=10)
        got.append(f[5])
        rcv.send((N.DELIVER_ACK, f[1]))
    assert got == [f"S{i}".encode() for i in range(n)]
    # The 16 live ones are ACKed once the device acknowledged them.
    late = snd.collect(N.ACK, 16, timeout=10)
    assert sorted(a[1] for a in late) == sorted(f"s{i}" for i in range(16))


def test_mailbox_limit_refuses_with_a_clear_error(server_factory):
    srv = server_factory("--mailbox-limit", "5")
    snd = RawClient(srv.addr)
    snd.login("x")
    snd.send(*[(N.SEND, f"q{i}", "full", b"z") for i in range(5)])
    assert len(snd.collect(N.ACK, 5)) == 5
    snd.send((N.SEND, "q5", "full", b"z"))
    err = snd.expect(N.ERROR)
    assert err[1] == 9 and err[2] == "q5" and "limit" in err[3]
    # The refused message is not in the dedup window: once there is room it can be resent.
    rcv = RawClient(srv.addr)
    rcv.login("full")
    frames = rcv.collect(N.DELIVER, 5)
    rcv.send((N.DELIVER_ACK, frames[-1][1]))
    snd.send((N.SEND, "q5", "full", b"z"))
    assert rcv.expect(N.DELIVER)[4] == "q5"


def test_group_commit_batches_an_offline_burst(server):
    import asyncio

    from iris_fast.client import AsyncIrisClient

    async def burst() -> None:
        async with AsyncIrisClient(*server.addr) as ac:
            await ac.login("burster")
            await ac.send_many([("sleeper", f"B{i}") for i in range(2000)])

    asyncio.run(burst())
    m = server.metrics()
    assert m["iris_messages_stored_total"] == 2000
    # Many messages per transaction: far fewer fsyncs than messages.
    assert m["iris_lmdb_fsyncs_total"] < 1000
    assert m["iris_lmdb_batch_size_sum"] >= 2000


def test_second_device_gets_what_the_first_has_in_flight(server):
    first = RawClient(server.addr)
    first.login("phone")
    snd = RawClient(server.addr)
    snd.login("friend")
    snd.send((N.SEND, "r1", "phone", b"one"))
    d1 = first.expect(N.DELIVER)
    assert d1[5] == b"one"  # live, not acknowledged yet
    second = RawClient(server.addr)
    second.login("phone")
    # The in-flight live delivery is made durable (ACKed to the sender as stored)...
    assert snd.expect(N.ACK) == (N.ACK, "r1", N.ACK_STORED)
    # ...and reaches the second device too.
    d2 = second.expect(N.DELIVER)
    assert d2[4:] == ("r1", b"one")
    first.send((N.DELIVER_ACK, d1[1]))
    second.send((N.DELIVER_ACK, d2[1]))
    assert first.next(timeout=0.3) is None


def test_a_user_on_two_devices_gets_every_message_on_both(server):
    phone = RawClient(server.addr)
    phone.login("two-devices")
    laptop = RawClient(server.addr)
    laptop.login("two-devices")
    snd = RawClient(server.addr)
    snd.login("chatty")
    n = 30
    snd.send(*[(N.SEND, f"d{i}", "two-devices", f"D{i}".encode()) for i in range(n)])
    assert len(snd.collect(N.ACK, n)) == n
    for dev in (phone, laptop):
        frames = dev.collect(N.DELIVER, n)
        assert [f[5] for f in frames] == [f"D{i}".encode() for i in range(n)]
        dev.send((N.DELIVER_ACK, frames[-1][1]))
    time.sleep(0.3)
    # Both acknowledged: nothing is left for a third login.
    tablet = RawClient(server.addr)
    tablet.login("two-devices")
    assert tablet.next(timeout=0.5) is None


def test_a_message_stays_until_every_online_device_acknowledged_it(server):
    a = RawClient(server.addr)
    a.login("multi")
    b = RawClient(server.addr)
    b.login("multi")
    snd = RawClient(server.addr)
    snd.login("s")
    snd.send((N.SEND, "x1", "multi", b"X"))
    da = a.expect(N.DELIVER)
    db = b.expect(N.DELIVER)
    a.send((N.DELIVER_ACK, da[1]))  # only one device acknowledges
    time.sleep(0.3)
    c = RawClient(server.addr)
    c.login("multi")
    assert c.expect(N.DELIVER)[4] == "x1"  # still stored: b has not acknowledged
    b.send((N.DELIVER_ACK, db[1]))


def test_deliveries_pending_on_a_closed_connection_are_kept(server):
    rcv = RawClient(server.addr)
    rcv.login("flaky")
    snd = RawClient(server.addr)
    snd.login("steady")
    snd.send(*[(N.SEND, f"c{i}", "flaky", f"C{i}".encode()) for i in range(10)])
    frames = rcv.collect(N.DELIVER, 10)
    assert len(frames) == 10
    rcv.send((N.DELIVER_ACK, frames[3][1]))  # the first four are acknowledged...
    time.sleep(0.2)
    rcv.close()  # ...the other six were delivered live and never acknowledged
    # They are stored on close, so the sender gets every ACK: 4 as delivered, 6 as stored.
    acks = {a[1]: a[2] for a in snd.collect(N.ACK, 10)}
    assert len(acks) == 10
    assert all(acks[f"c{i}"] == 0 for i in range(4))
    assert all(acks[f"c{i}"] == N.ACK_STORED for i in range(4, 10))
    again = RawClient(server.addr)
    again.login("flaky")
    got = again.collect(N.DELIVER, 6)
    assert [f[5] for f in got] == [f"C{i}".encode() for i in range(4, 10)]
    again.send((N.DELIVER_ACK, got[-1][1]))
    assert again.next(timeout=0.3) is None
