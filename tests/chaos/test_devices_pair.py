"""Issue 10: a device's cursor is replicated -- a device that reconnects to the other node of a
pair resumes where it acknowledged (docs/replication.md, REC_CURSOR)."""

from __future__ import annotations

import shutil
import time

import iris_native as N
import pytest
from rawclient import RawClient
from test_retention import stored_in_lmdb, wait_for
from test_workers import users_on

pytestmark = pytest.mark.timeout(180)


def login(addr: tuple[str, int], user: str, device: str) -> RawClient:
    c = RawClient(addr)
    c.send((N.LOGIN, 1, user, "", device))
    c.expect(N.LOGIN_OK)
    return c


def test_a_device_resumes_from_its_cursor_on_the_other_node(pair):
    sender, rcpt = users_on(2, 0, 1, prefix="pdev")
    for device in ("phone", "laptop"):
        login(pair.a.addr, rcpt, device).close()
    s = RawClient(pair.a.addr)
    s.login(sender)
    s.send(*[(N.SEND, f"p{i}", rcpt, f"P{i}".encode()) for i in range(10)])
    assert {a[2] for a in s.collect(N.ACK, 10)} == {N.ACK_STORED}
    phone = login(pair.a.addr, rcpt, "phone")
    got = phone.collect(N.DELIVER, 10)
    phone.send((N.DELIVER_ACK, got[-1][1]))
    laptop = login(pair.a.addr, rcpt, "laptop")
    got = laptop.collect(N.DELIVER, 10)
    laptop.send((N.DELIVER_ACK, got[3][1]))  # the laptop has the first four...
    time.sleep(0.5)
    laptop.close()
    phone.close()
    assert len(stored_in_lmdb(pair.b.data_dir, rcpt)) == 6
    # ...and on b it gets the other six: nothing again, nothing missing.
    laptop = login(pair.b.addr, rcpt, "laptop")
    got = laptop.collect(N.DELIVER, 6)
    assert [f[5] for f in got] == [f"P{i}".encode() for i in range(4, 10)]
    assert laptop.drain(0.5) == []
    laptop.send((N.DELIVER_ACK, got[-1][1]))
    wait_for(
        lambda: (
            stored_in_lmdb(pair.a.data_dir, rcpt) == []
            and stored_in_lmdb(pair.b.data_dir, rcpt) == []
        ),
        20,
        "deletion on both nodes once both devices acked",
    )
    # The phone, back on b, gets nothing a second time either.
    phone = login(pair.b.addr, rcpt, "phone")
    assert phone.drain(0.5) == []


def test_a_full_copy_carries_the_device_cursors(pair):
    """A node rebuilt from an empty data directory gets the cursors with the messages: a device
    that had acknowledged part of its mailbox resumes there on the rebuilt node."""
    sender, rcpt = users_on(2, 0, 1, prefix="fdev")
    for device in ("phone", "laptop"):
        login(pair.a.addr, rcpt, device).close()
    s = RawClient(pair.a.addr)
    s.login(sender)
    s.send(*[(N.SEND, f"f{i}", rcpt, f"F{i}".encode()) for i in range(10)])
    assert {a[2] for a in s.collect(N.ACK, 10)} == {N.ACK_STORED}
    s.close()
    laptop = login(pair.a.addr, rcpt, "laptop")
    got = laptop.collect(N.DELIVER, 10)
    laptop.send((N.DELIVER_ACK, got[3][1]))  # the first four
    time.sleep(0.5)
    laptop.close()
    wait_for(lambda: pair.a.metrics()["iris_repl_lag_records"] == 0, 20, "lag 0 on a")
    pair.b.kill9()
    shutil.rmtree(pair.b.data_dir)
    pair.b.data_dir.mkdir()
    pair.b.start(accept=("ok", "degraded"))
    pair.wait_paired()
    assert pair.b.metrics()["iris_repl_full_copies_applied_total"] >= 2
    assert len(stored_in_lmdb(pair.b.data_dir, rcpt)) == 10  # the phone has none of them
    laptop = login(pair.b.addr, rcpt, "laptop")
    got = laptop.collect(N.DELIVER, 6)
    assert [f[5] for f in got] == [f"F{i}".encode() for i in range(4, 10)]
    assert laptop.drain(0.5) == []
    laptop.close()
    phone = login(pair.b.addr, rcpt, "phone")
    assert [f[5] for f in phone.collect(N.DELIVER, 10)] == [f"F{i}".encode() for i in range(10)]
