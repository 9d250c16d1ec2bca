"""The acceptance tests of the design document: kill -9, SIGTERM, rolling restarts, partitions.

Two real nodes on loopback replicate through fault-injecting proxies (``faultproxy.py``); the
tests kill them with real signals and cut their link for real.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import iris_native as N
import lmdb
import pytest
from rawclient import RawClient

from iris_fast.client import AsyncIrisClient, IrisClient

pytestmark = pytest.mark.timeout(300)


def wait_for(pred, timeout: float = 15.0, what: str = "condition") -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if pred():
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def _send_burst(addr, sender: str, to: str, bodies: list[bytes]) -> int:
    """Pipeline every message through one client; returns the OR of the ACK flags seen."""
    c = AsyncIrisClient(*addr, timeout=60)
    await c.login(sender)
    await c.send_many([(to, b, f"{sender}-{i}") for i, b in enumerate(bodies)])
    flags = c.last_ack_flags
    await c.close()
    return flags


def receive_exactly(addr, user: str, n: int, quiet_s: float = 0.5) -> list:
    """Log ``user`` in at ``addr``, take ``n`` messages, then make sure nothing else comes."""
    c = IrisClient(*addr, timeout=30)
    c.login(user)
    got = [c.recv(timeout=30) for _ in range(n)]
    with pytest.raises(TimeoutError):
        extra = c.recv(timeout=quiet_s)
        got.append(extra)
    assert c.duplicates_dropped == 0, f"{c.duplicates_dropped} redeliveries on the wire"
    c.close()
    return got


def test_zero_loss_when_the_node_dies_right_after_the_last_ack(pair):
    """1,000 messages through a, kill -9 a right after the last ACK, read them all from b;
    five cycles of send, kill, count, restore."""
    for cycle in range(5):
        bodies = [b"%d-%d" % (cycle, i) for i in range(1000)]
        flags = asyncio.run(_send_burst(pair.a.addr, f"snd{cycle}", f"rcv{cycle}", bodies))
        assert not flags & N.ACK_DEGRADED
        pair.a.kill9()
        got = receive_exactly(pair.b.addr, f"rcv{cycle}", 1000)
        assert [m.body for m in got] == bodies, f"cycle {cycle}: order or content differs"
        pair.a.start(accept=("ok", "degraded"))
        pair.wait_paired()
        # a caught up on b's deletions: the delivered messages are gone from a's copy too.
        r = RawClient(pair.a.addr)
        r.login(f"rcv{cycle}")
        assert [f for f in r.drain(0.3) if f[0] == N.DELIVER] == []
        r.close()


@pytest.mark.parametrize("stop", ["sigterm", "kill9"])
def test_graceful_and_kill9_both_keep_100_of_100(pair, stop):
    bodies = [b"m%d" % i for i in range(100)]
    asyncio.run(_send_burst(pair.a.addr, "s", "r", bodies))
    if stop == "sigterm":
        assert pair.a.terminate() == 0
    else:
        pair.a.kill9()
    got = receive_exactly(pair.b.addr, "r", 100)
    assert [m.body for m in got] == bodies


class Traffic:
    """``n`` senders in threads, each sending numbered messages one by one to its own
    recipient until stopped, with failover over both nodes; counts errors."""

    def __init__(self, nodes, n: int, first: int = 0) -> None:
        self.nodes = nodes
        self.n = n
        self.first = first
        self.sent: dict[str, int] = {}
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]

    def _run(self, i: int) -> None:
        primary = self.nodes[(self.first + i) % len(self.nodes)]
        others = [a for a in self.nodes if a != primary]
        c = IrisClient(*primary, nodes=others, timeout=30)
        name = f"tx{i}"
        self.sent[name] = 0
        try:
            c.login(name)
            k = 0
            while not self.stop.is_set() and k < 5000:
                c.send_msg(f"rx{i}", b"%d" % k, msg_id=f"{name}-{k}")
                k += 1
                self.sent[name] = k
        except Exception as exc:  # noqa: BLE001 - every client-visible error is a failure
            self.errors.append(f"{name}: {exc!r}")
        finally:
            c.close()

    def start(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def check_delivered(self, addr) -> int:
        """Every ACKed message of every sender delivered once, in order; returns the total."""
        total = 0
        for i in range(self.n):
            n = self.sent[f"tx{i}"]
            got = receive_exactly(addr, f"rx{i}", n)
            assert [int(m.body) for m in got] == list(range(n)), f"rx{i}"
            total += n
        return total


def test_kill_a_during_traffic_from_20_senders(pair):
    """Every ACKed message is delivered exactly once; the unACKed ones are resent by the
    clients to b and delivered exactly once."""
    traffic = Traffic(pair.nodes, 20).start()
    wait_for(lambda: sum(traffic.sent.values()) >= 400, what="traffic")
    pair.a.kill9()
    before = sum(traffic.sent.values())
    wait_for(lambda: sum(traffic.sent.values()) >= before + 400, what="traffic on b")
    traffic.finish()
    assert traffic.errors == []
    total = traffic.check_delivered(pair.b.addr)
    assert total >= 800


def test_kill_the_replica_then_it_catches_up_and_copies_match(pair):
    pair.b.kill9()
    # a carries on at once (degraded), without waiting for the heartbeat timeout.
    s = RawClient(pair.a.addr)
    s.login("alice")
    t0 = time.monotonic()
    for i in range(500):
        s.send((N.SEND, f"k{i}", f"user{i % 7}", b"body %d" % i))
    acks = s.collect(N.ACK, 500, timeout=30)
    assert all(a[2] & N.ACK_DEGRADED for a in acks)
    assert time.monotonic() - t0 < 30
    # Deliver a few to make deletions part of what b must catch up on.
    r = IrisClient(*pair.a.addr, timeout=10)
    r.login("user0")
    for _ in range(10):
        r.recv(timeout=5)
    r.close()
    pair.b.start(accept=("ok", "degraded"))
    pair.wait_paired()
    assert "catch-up complete" in pair.a.full_log()
    m = pair.a.metrics()
    assert m["iris_repl_catchup_records_total"] >= 500
    # Stop both cleanly and compare the two LMDB files' mailboxes byte for byte.
    assert pair.a.terminate() == 0
    assert pair.b.terminate() == 0
    assert mailbox_rows(pair.a.data_dir) == mailbox_rows(pair.b.data_dir)
    assert len(mailbox_rows(pair.a.data_dir)) == 500 - 10


def mailbox_rows(data_dir: Path) -> list[tuple[bytes, bytes]]:
    env = lmdb.open(str(data_dir / "mailbox"), max_dbs=300, readonly=True, lock=False)
    try:
        db = env.open_db(b"msgs", create=False)
        with env.begin(db=db) as txn:
            return list(txn.cursor())
    finally:
        env.close()


def test_rolling_restart_under_traffic_has_no_client_visible_errors(pair):
    traffic = Traffic(pair.nodes, 6).start()
    wait_for(lambda: sum(traffic.sent.values()) >= 200, what="traffic")
    for node in (pair.a, pair.b):
        assert node.terminate() == 0
        node.start(accept=("ok", "degraded"))
        pair.wait_paired()
        before = sum(traffic.sent.values())
        wait_for(lambda b=before: sum(traffic.sent.values()) >= b + 100, what="traffic resumed")
    traffic.finish()
    assert traffic.errors == []
    traffic.check_delivered(pair.a.addr)


def test_split_brain_is_detected_and_merged(pair):
    pair.partition()
    took = wait_for(
        lambda: pair.a.health()["role"] == "alone" and pair.b.health()["role"] == "alone",
        what="both sides alone",
    )
    print(f"partition detected by heartbeats in {took:.2f} s")
    # Both sides take writes for the same mailbox while cut off.
    flags_a = asyncio.run(_send_burst(pair.a.addr, "sa", "shared", [b"a%d" % i for i in range(50)]))
    flags_b = asyncio.run(_send_burst(pair.b.addr, "sb", "shared", [b"b%d" % i for i in range(50)]))
    assert flags_a & N.ACK_DEGRADED and flags_b & N.ACK_DEGRADED
    pair.heal()
    pair.wait_paired()
    for node in (pair.a, pair.b):
        wait_for(lambda n=node: n.metrics()["iris_repl_split_brains_total"] >= 1,
                 what="split brain counted")  # fmt: skip
        assert "SPLIT BRAIN" in node.full_log()
    # Mailboxes merged: either node delivers all 100, once, each side's in order.
    got = receive_exactly(pair.b.addr, "shared", 100)
    by_sender: dict[str, list[bytes]] = {"sa": [], "sb": []}
    for m in got:
        by_sender[m.sender].append(m.body)
    assert by_sender == {"sa": [b"a%d" % i for i in range(50)],
                         "sb": [b"b%d" % i for i in range(50)]}  # fmt: skip
    # ...and the deletions reach a: nothing is delivered a second time from a's copy. b's
    # deletions are b's records: wait until a has acknowledged all of them (b's lag 0; the
    # lazy commit of a deletion takes at most 50 ms, receive_exactly waited 0.5 s).
    wait_for(lambda: pair.b.metrics()["iris_repl_lag_records"] == 0, what="a has b's deletions")
    r = RawClient(pair.a.addr)
    r.login("shared")
    assert [f for f in r.drain(0.5) if f[0] == N.DELIVER] == []


def test_failover_time_for_a_client_of_the_dead_node(pair):
    """From kill -9 of a to the first ACKed send through b by a client that was on a."""
    times = []
    for run in range(3):
        c = IrisClient(*pair.a.addr, nodes=[pair.b.addr], timeout=30)
        c.login(f"fo{run}")
        c.send_msg("peer", b"before")
        t0 = time.monotonic()
        pair.a.kill9()
        c.send_msg("peer", b"after")
        times.append(time.monotonic() - t0)
        c.close()
        pair.a.start(accept=("ok", "degraded"))
        pair.wait_paired()
    print(f"failover times: {[round(t, 3) for t in times]}")
    assert max(times) < 10
