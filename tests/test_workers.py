"""Several worker processes on one node: routing between them, crashes, aggregated views."""

from __future__ import annotations

import os
import signal
import threading
import time

import iris_native as N
import pytest
from rawclient import RawClient

from iris_fast.client import IrisClient
from iris_fast.server.links import home_of

pytestmark = pytest.mark.timeout(120)


def users_on(workers: int, *homes: int, prefix: str = "u") -> list[str]:
    """One user id per requested home worker."""
    out = []
    for home in homes:
        i = 0
        while home_of(f"{prefix}{home}-{i}", workers) != home:
            i += 1
        out.append(f"{prefix}{home}-{i}")
    return out


def test_users_on_different_workers_talk_live_and_offline(server_factory):
    srv = server_factory("--workers", "3")
    alice, bob, carol = users_on(3, 0, 1, 2)
    a = RawClient(srv.addr)
    a.login(alice)
    b = RawClient(srv.addr)
    b.login(bob)
    a.send((N.SEND, "live-1", bob, b"hi bob"))
    d = b.expect(N.DELIVER)
    assert d[3:] == (alice, "live-1", b"hi bob")
    b.send((N.DELIVER_ACK, d[1]))
    assert a.expect(N.ACK) == (N.ACK, "live-1", 0)
    # Offline recipient on a third worker: stored there, ACKed back across the link.
    a.send((N.SEND, "off-1", carol, b"hi carol"))
    assert a.expect(N.ACK) == (N.ACK, "off-1", N.ACK_STORED)
    c = RawClient(srv.addr)
    c.login(carol)
    assert c.expect(N.DELIVER)[4:] == ("off-1", b"hi carol")
    m = srv.metrics()
    assert m["iris_routed_out_total"] >= 2
    assert m["iris_routed_in_total"] >= 2


def test_health_and_metrics_cover_every_worker(server_factory):
    srv = server_factory("--workers", "3")
    clients = []
    for name in users_on(3, 0, 1, 2) + users_on(3, 0, prefix="v"):
        c = RawClient(srv.addr)
        c.login(name)
        clients.append(c)
    h = srv.health()
    assert h["status"] == "ok"
    assert [w["index"] for w in h["workers"]] == [0, 1, 2]
    assert len({w["pid"] for w in h["workers"]}) == 3
    assert h["connections"] == 4
    # Every connection ends up on its user's home worker.
    assert [w["connections"] for w in h["workers"]] == [2, 1, 1]
    m = srv.metrics()
    assert m["iris_workers_up"] == 3
    assert m["iris_connections"] == 4
    for i in range(3):
        assert f'iris_worker_cpu_seconds_total{{worker="{i}"}}' in m
        assert f'iris_worker_rss_bytes{{worker="{i}"}}' in m
    assert m['iris_worker_connections{worker="0"}'] == 2


def test_a_relogin_on_another_worker_lands_on_the_same_home(server_factory):
    srv = server_factory("--workers", "2")
    (user,) = users_on(2, 1)
    pids = set()
    for _ in range(6):
        c = RawClient(srv.addr)
        c.login(user)
        c.send((N.PING, 1))
        assert c.expect(N.PONG)
        c.close()
    h = srv.health()
    pids = {w["pid"] for w in h["workers"] if w["connections"]}
    assert len(pids) <= 1


@pytest.mark.parametrize("victim", ["sender_home", "receiver_home"])
def test_kill9_of_a_worker_under_traffic_loses_no_acked_message(server_factory, victim):
    srv = server_factory("--workers", "2")
    sender, receiver = users_on(2, 0, 1, prefix=f"k9{victim[0]}")
    n = 300
    received: list[bytes] = []
    stop = threading.Event()

    def receive() -> None:
        r = IrisClient(*srv.addr, timeout=30)
        r.login(receiver)
        while not stop.is_set() and len(set(received)) < n:
            try:
                received.append(r.recv_msg(timeout=0.5))
            except TimeoutError:
                continue
        r.close()

    rt = threading.Thread(target=receive, daemon=True)
    rt.start()
    s = IrisClient(*srv.addr, timeout=30)
    s.login(sender)
    victim_index = 0 if victim == "sender_home" else 1
    victim_pid = srv.health()["workers"][victim_index]["pid"]
    acked = []
    for i in range(n):
        if i == n // 3:
            os.kill(victim_pid, signal.SIGKILL)
        acked.append(f"K{i}".encode())
        s.send_msg(receiver, acked[-1])  # blocks until ACKed; reconnects and resends
    s.close()
    rt.join(timeout=60)
    stop.set()
    assert set(received) == set(acked), f"lost: {sorted(set(acked) - set(received))[:10]}"
    # First occurrences keep the sender's order.
    firsts = list(dict.fromkeys(received))
    assert firsts == acked
    h = srv.health()
    assert h["workers"][victim_index]["restarts"] == 1
    assert h["workers"][victim_index]["pid"] != victim_pid


def test_sigterm_stops_every_worker_cleanly(server_factory):
    srv = server_factory("--workers", "3")
    pids = [w["pid"] for w in srv.health()["workers"]]
    assert srv.terminate() == 0
    time.sleep(0.2)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
