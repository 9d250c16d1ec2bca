"""The dedup window's fair split holds on the peer too: replicated entries keep their sender."""

from __future__ import annotations

import time

import iris_native as N
import pytest
from rawclient import RawClient

pytestmark = pytest.mark.timeout(180)

BUDGET = 50
FLOOD = 300


def _ack_deliveries(r: RawClient, n: int, timeout: float = 30.0) -> None:
    """Acknowledge ``n`` deliveries one by one, so that they complete live (REC_DEDUP)."""
    deadline = time.monotonic() + timeout
    got = 0
    while got < n and time.monotonic() < deadline:
        f = r.next(timeout=max(deadline - time.monotonic(), 0.01))
        if f is not None and f[0] == N.DELIVER:
            r.send((N.DELIVER_ACK, f[1]))
            got += 1
    assert got == n, f"only {got} of {n} deliveries"


def test_a_flood_on_one_node_does_not_evict_anothers_entry_on_the_peer(pair_factory):
    pair = pair_factory(1, "--dedup-entries", str(BUDGET))
    dst = RawClient(pair.a.addr)
    dst.login("dst")
    alice = RawClient(pair.a.addr)
    alice.login("alice")
    alice.send((N.SEND, "a-1", "dst", b"hello"))
    _ack_deliveries(dst, 1)
    ack = alice.expect(N.ACK, timeout=10)
    # Delivered live: its entry reaches b as a REC_DEDUP record, not with a stored message.
    assert ack[1] == "a-1" and ack[2] & N.ACK_STORED == 0, ack
    mallory = RawClient(pair.a.addr)
    mallory.login("mallory")
    mallory.send(*[(N.SEND, f"m{i}", "dst", b"flood") for i in range(FLOOD)])
    _ack_deliveries(dst, FLOOD)
    assert len(mallory.collect(N.ACK, FLOOD, timeout=30)) == FLOOD
    # Every entry has reached b (they are logged lazily, in batches).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if pair.a.metrics()["iris_repl_lag_records"] == 0 and (
            pair.b.metrics()["iris_repl_records_applied_total"] >= FLOOD + 1
        ):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"b never saw the flood: {pair.b.metrics()}")
    # Alice resends to the other node (as after a failover): still recognised there.
    alice_b = RawClient(pair.b.addr)
    alice_b.login("alice")
    alice_b.send((N.SEND, "a-1", "dst", b"hello"))
    ack = alice_b.expect(N.ACK, timeout=10)
    assert ack[1] == "a-1" and ack[2] & N.ACK_DUPLICATE, ack
