"""Issue 10: per-device cursors -- every device of a user gets every message, offline or not
(docs/architecture.md, "Issue 10: per-device cursors"), with real server processes."""

from __future__ import annotations

import asyncio
import time

import iris_native as N
import pytest
from rawclient import RawClient
from test_retention import stored_in_lmdb, wait_for

from iris_fast.client import AsyncIrisClient, IrisClient

pytestmark = pytest.mark.timeout(90)


def login(addr: tuple[str, int], user: str, device: str) -> RawClient:
    c = RawClient(addr)
    c.send((N.LOGIN, 1, user, "", device))
    c.expect(N.LOGIN_OK)
    return c


def register(addr: tuple[str, int], user: str, *devices: str) -> None:
    """Log each device in once, then leave: the user now has these known devices."""
    for device in devices:
        login(addr, user, device).close()
    time.sleep(0.2)


def send_n(addr: tuple[str, int], to: str, n: int, prefix: str = "m") -> None:
    s = RawClient(addr)
    s.login(f"sender-of-{to}")
    s.send(*[(N.SEND, f"{prefix}{i}", to, f"{prefix.upper()}{i}".encode()) for i in range(n)])
    assert len(s.collect(N.ACK, n)) == n
    s.close()


def test_a_device_offline_while_another_acked_still_gets_every_message(server):
    register(server.addr, "wa", "phone", "laptop")
    phone = login(server.addr, "wa", "phone")
    send_n(server.addr, "wa", 10)
    got = phone.collect(N.DELIVER, 10)
    assert [f[5] for f in got] == [f"M{i}".encode() for i in range(10)]
    phone.send((N.DELIVER_ACK, got[-1][1]))
    time.sleep(0.3)
    # The phone has them all; the laptop, offline, has not: they stay stored.
    assert len(stored_in_lmdb(server.data_dir, "wa")) == 10
    laptop = login(server.addr, "wa", "laptop")
    got = laptop.collect(N.DELIVER, 10)
    assert [f[5] for f in got] == [f"M{i}".encode() for i in range(10)]
    laptop.send((N.DELIVER_ACK, got[-1][1]))
    wait_for(lambda: stored_in_lmdb(server.data_dir, "wa") == [], 10, "deletion once both acked")
    # Neither device gets anything a second time.
    for c in (phone, laptop):
        c.close()
    for device in ("phone", "laptop"):
        again = login(server.addr, "wa", device)
        assert again.drain(0.5) == []
        again.close()


def test_a_new_device_gets_what_is_still_stored_and_the_client_api_takes_a_device(server):
    register(server.addr, "api", "phone")
    send_n(server.addr, "api", 3)  # the phone is offline: stored
    tablet = IrisClient(*server.addr, device="tablet")
    tablet.login("api")
    got = [tablet.recv(timeout=5) for _ in range(3)]
    assert [m.body for m in got] == [b"M0", b"M1", b"M2"]
    tablet.close()
    # The phone (a known device) still gets them too.
    phone = IrisClient(*server.addr)
    phone.login("api", device="phone")
    assert [phone.recv(timeout=5).body for _ in range(3)] == [b"M0", b"M1", b"M2"]
    phone.close()
    wait_for(lambda: stored_in_lmdb(server.data_dir, "api") == [], 10, "deletion once all had it")


def test_a_forgotten_device_no_longer_pins_messages(server_factory):
    srv = server_factory("--device-ttl", "1")
    register(srv.addr, "lost", "phone", "old-phone")
    phone = login(srv.addr, "lost", "phone")
    send_n(srv.addr, "lost", 3)
    got = phone.collect(N.DELIVER, 3)
    phone.send((N.DELIVER_ACK, got[-1][1]))
    time.sleep(0.3)
    assert len(stored_in_lmdb(srv.data_dir, "lost")) == 3  # old-phone may still come back
    # Past --device-ttl, old-phone is forgotten and what only it lacked goes (phone, online,
    # is never forgotten)...
    wait_for(lambda: stored_in_lmdb(srv.data_dir, "lost") == [], 10, "the device sweep")
    assert srv.metrics()["iris_devices_forgotten_total"] >= 1
    # ...and one known device left: the live path again, nothing stored.
    send_n(srv.addr, "lost", 2, prefix="n")
    got = phone.collect(N.DELIVER, 2)
    phone.send((N.DELIVER_ACK, got[-1][1]))
    time.sleep(0.3)
    assert stored_in_lmdb(srv.data_dir, "lost") == []


def test_cursors_survive_a_restart(server):
    register(server.addr, "rs", "phone", "laptop")
    phone = login(server.addr, "rs", "phone")
    send_n(server.addr, "rs", 5)
    got = phone.collect(N.DELIVER, 5)
    phone.send((N.DELIVER_ACK, got[2][1]))  # the first three
    time.sleep(0.3)
    phone.close()
    server.terminate()
    server.restart()
    phone = login(server.addr, "rs", "phone")
    got = phone.collect(N.DELIVER, 2)
    assert [f[5] for f in got] == [b"M3", b"M4"]
    assert phone.drain(0.5) == []
    phone.send((N.DELIVER_ACK, got[-1][1]))
    laptop = login(server.addr, "rs", "laptop")
    got = laptop.collect(N.DELIVER, 5)
    assert [f[5] for f in got] == [f"M{i}".encode() for i in range(5)]
    laptop.send((N.DELIVER_ACK, got[-1][1]))
    wait_for(lambda: stored_in_lmdb(server.data_dir, "rs") == [], 10, "deletion after restart")


def test_a_device_id_crosses_a_worker_hand_off(server_factory):
    srv = server_factory("--workers", "3")
    # Several logins land on workers other than the user's home: the id travels along.
    for _ in range(3):
        register(srv.addr, "ho", "phone", "laptop")
    phone = login(srv.addr, "ho", "phone")
    send_n(srv.addr, "ho", 4)
    got = phone.collect(N.DELIVER, 4)
    phone.send((N.DELIVER_ACK, got[-1][1]))
    time.sleep(0.3)
    laptop = login(srv.addr, "ho", "laptop")
    assert [f[5] for f in laptop.collect(N.DELIVER, 4)] == [f"M{i}".encode() for i in range(4)]
    again = login(srv.addr, "ho", "phone")
    assert again.drain(0.5) == []


def test_the_async_client_names_its_device_too(server):
    register(server.addr, "aio", "phone", "laptop")
    send_n(server.addr, "aio", 2)

    async def read(device: str) -> list[bytes]:
        c = AsyncIrisClient(*server.addr, device=device)
        try:
            await c.login("aio")
            return [(await c.recv(timeout=5)).body for _ in range(2)]
        finally:
            await c.close()

    assert asyncio.run(read("phone")) == [b"M0", b"M1"]
    assert asyncio.run(read("laptop")) == [b"M0", b"M1"]  # the phone's acks did not take them
    wait_for(lambda: stored_in_lmdb(server.data_dir, "aio") == [], 10, "deletion once both had it")
