"""The dedup window's promise under load, with real server processes (docs/protocol.md, "Resends").

A sender's resend is recognised as long as that sender stays within its share of the window,
whatever other senders do; the share survives a restart; /metrics shows the window's real span.
"""

from __future__ import annotations

import re
import time

import iris_native as N
import pytest
from rawclient import RawClient

pytestmark = pytest.mark.timeout(120)

BUDGET = 50
FLOOD = 400


def _send_all(c: RawClient, frames: list[tuple]) -> list[tuple]:
    c.send(*frames)
    acks = c.collect(N.ACK, len(frames), timeout=30)
    assert len(acks) == len(frames), f"only {len(acks)} of {len(frames)} ACKs"
    return acks


def _resend(c: RawClient, msg_id: str) -> int:
    """ACK flags of a resend of ``msg_id`` to ``dst``."""
    c.send((N.SEND, msg_id, "dst", b"again"))
    ack = c.expect(N.ACK, timeout=10)
    assert ack[1] == msg_id
    return ack[2]


def _flood(server, n: int = FLOOD) -> RawClient:
    m = RawClient(server.addr)
    m.login("mallory")
    _send_all(m, [(N.SEND, f"m{i}", "dst", b"flood") for i in range(n)])
    return m


def test_a_flood_from_one_sender_does_not_evict_another_senders_entry(server_factory):
    server = server_factory("--workers", "1", "--dedup-entries", str(BUDGET))
    alice = RawClient(server.addr)
    alice.login("alice")
    [ack] = _send_all(alice, [(N.SEND, "a-1", "dst", b"hello")])
    assert ack[2] & N.ACK_DUPLICATE == 0
    mallory = _flood(server)
    # Alice sent one message; mallory sent 8x the whole window since. Alice's resend is still
    # recognised: only mallory paid for mallory's flood.
    assert _resend(alice, "a-1") & N.ACK_DUPLICATE
    # Mallory's own oldest entries went (his newest are still there).
    assert _resend(mallory, "m0") & N.ACK_DUPLICATE == 0
    assert _resend(mallory, f"m{FLOOD - 1}") & N.ACK_DUPLICATE
    m = server.metrics()
    assert m["iris_dedup_entries"] <= BUDGET + 1
    assert m["iris_dedup_evictions_total"] >= FLOOD - BUDGET


def test_a_restart_reloads_recent_entries_with_their_sender_and_drops_old_ones(server_factory):
    age_s = 6.0
    server = server_factory(
        "--workers", "1", "--dedup-entries", str(BUDGET), "--dedup-age", str(age_s)
    )
    alice = RawClient(server.addr)
    alice.login("alice")
    _send_all(alice, [(N.SEND, "a-old", "dst", b"old")])
    time.sleep(age_s + 1.0)
    _send_all(alice, [(N.SEND, "a-new", "dst", b"new")])
    _flood(server).close()
    alice.close()
    assert server.terminate() == 0
    server.restart()
    log = server.full_log()
    # What was reloaded: the entries younger than the age (a-new and the flood), not a-old.
    assert f"reloaded {FLOOD + 1} dedup entries" in log, log[-2000:]
    alice = RawClient(server.addr)
    alice.login("alice")
    # The reload kept each entry in its sender's share: the flood still only evicted mallory's.
    assert _resend(alice, "a-new") & N.ACK_DUPLICATE
    assert _resend(alice, "a-old") & N.ACK_DUPLICATE == 0
    m = server.metrics()
    assert m["iris_dedup_senders"] == 2
    assert m["iris_dedup_entries"] <= BUDGET + 1


def test_metrics_show_the_real_age_and_evictions_before_full_age(server_factory):
    server = server_factory("--workers", "1", "--dedup-entries", str(BUDGET))
    alice = RawClient(server.addr)
    alice.login("alice")
    _send_all(alice, [(N.SEND, "a-1", "dst", b"hello")])
    m = server.metrics()
    assert m["iris_dedup_evictions_total"] == 0
    assert m["iris_dedup_pending"] == 0
    assert m["iris_dedup_bytes"] > 0
    time.sleep(1.5)
    # The oldest entry held is alice's, at least 1.5 s old (generous upper margin: slow CI).
    assert 1.4 <= server.metrics()["iris_dedup_age_seconds"] < 60
    _flood(server)
    m = server.metrics()
    assert m["iris_dedup_evictions_total"] == FLOOD - (BUDGET - 1)
    # Alice's entry is still the oldest: the window still spans from her message.
    assert m["iris_dedup_age_seconds"] >= 1.4


def _reloaded(log: str) -> list[int]:
    return [int(m) for m in re.findall(r"reloaded (\d+) dedup entries", log)]


def test_each_worker_reloads_only_its_own_entries_unless_the_worker_count_changed(
    server_factory,
):
    server = server_factory("--workers", "2")
    alice = RawClient(server.addr)
    alice.login("alice")
    n = 40
    # Recipients spread over both workers (users are homed by a hash of their name).
    _send_all(alice, [(N.SEND, f"a{i}", f"dst{i}", b"x") for i in range(n)])
    alice.close()
    assert server.terminate() == 0
    mark = len(server.full_log())
    server.restart()
    # Each entry is reloaded once, by the worker that owns its recipient (not once per worker).
    assert sum(_reloaded(server.full_log()[mark:])) == n, server.full_log()[mark:]
    assert server.terminate() == 0
    mark = len(server.full_log())
    # One worker now owns every user: it reads every worker's table.
    server.extra[server.extra.index("--workers") + 1] = "1"
    server.restart()
    assert _reloaded(server.full_log()[mark:]) == [n]
    alice = RawClient(server.addr)
    alice.login("alice")
    alice.send(*[(N.SEND, f"a{i}", f"dst{i}", b"x") for i in range(n)])
    acks = alice.collect(N.ACK, n, timeout=30)
    assert len(acks) == n and all(a[2] & N.ACK_DUPLICATE for a in acks), acks


def test_the_nodes_window_age_is_its_shortest_non_empty_workers():
    from iris_fast.server.aggregate import merge_metrics

    def text(age: float) -> str:
        return (
            "# HELP iris_dedup_age_seconds span\n# TYPE iris_dedup_age_seconds gauge\n"
            f"iris_dedup_age_seconds {age}\n"
        )

    merged = merge_metrics(
        {0: text(0.0), 1: text(12.5), 2: text(30.0)}, {0: True, 1: True, 2: True}
    )
    lines = merged.splitlines()
    # Not the sum (42.5), and an empty window (0) has no span to report.
    assert "iris_dedup_age_seconds 12.5" in lines
    assert 'iris_worker_dedup_age_seconds{worker="2"} 30.0' in lines
