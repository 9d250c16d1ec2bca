"""The sender's ACK never waits on the recipient's application (DESIGN.md, Delivery semantics).

A live delivery that the device does not acknowledge within ``--live-ack-timeout`` is stored
(same seq, replicated where there is a peer) and its sender ACKed ``STORED``; the device's later
DELIVER_ACK removes it, and it is delivered once.
"""

from __future__ import annotations

import asyncio
import time

import iris_native as N
import pytest
from rawclient import RawClient

from iris_fast.client import AsyncIrisClient, IrisClient

pytestmark = pytest.mark.timeout(60)

# Far below the client's 10 s timeout that a send to an idle recipient used to run into, far
# above the 50 ms bound plus an fsync on a loaded machine.
PROMPT_S = 1.0


def _nothing_more(server, user: str) -> None:
    """The message left storage: a fresh session of ``user`` gets no DELIVER."""
    r = RawClient(server.addr)
    r.login(user)
    assert [f for f in r.drain(0.5) if f[0] == N.DELIVER] == []
    r.close()


def test_self_send_returns_promptly_sync(server):
    c = IrisClient(*server.addr, timeout=10)
    c.login("narcissus")
    start = time.monotonic()
    c.send_msg("narcissus", b"note to self")
    took = time.monotonic() - start
    assert took < PROMPT_S, f"self-send took {took:.2f} s"
    assert c.last_ack_flags & N.ACK_STORED
    # The DELIVER read while waiting for the ACK was kept for the application.
    msg = c.recv(timeout=5)
    assert (msg.sender, msg.body) == ("narcissus", b"note to self")
    with pytest.raises(TimeoutError):
        c.recv(timeout=0.5)
    c.close()
    _nothing_more(server, "narcissus")
    assert server.metrics()["iris_live_ack_timeouts_total"] >= 1


def test_send_to_an_idle_online_client_returns_promptly_sync(server):
    idle = IrisClient(*server.addr, timeout=10)
    idle.login("idle-bob")  # logged in, but the application is not inside recv
    s = IrisClient(*server.addr, timeout=10)
    s.login("alice")
    for i in range(3):
        start = time.monotonic()
        s.send_msg("idle-bob", b"m%d" % i)
        took = time.monotonic() - start
        assert took < PROMPT_S, f"send {i} to an idle client took {took:.2f} s"
        assert s.last_ack_flags & N.ACK_STORED
    got = [idle.recv(timeout=5).body for _ in range(3)]
    assert got == [b"m0", b"m1", b"m2"]
    with pytest.raises(TimeoutError):
        idle.recv(timeout=0.5)
    assert idle.duplicates_dropped == 0
    idle.close()
    s.close()
    _nothing_more(server, "idle-bob")


def test_self_send_and_send_to_idle_return_promptly_async(server):
    async def run() -> None:
        me = AsyncIrisClient(*server.addr, timeout=10)
        await me.login("echo")
        idle = AsyncIrisClient(*server.addr, timeout=10)
        await idle.login("idle-carol")
        start = time.monotonic()
        await me.send_msg("echo", b"to me")
        assert time.monotonic() - start < PROMPT_S
        start = time.monotonic()
        await me.send_msg("idle-carol", b"to carol")
        assert time.monotonic() - start < PROMPT_S
        assert me.last_ack_flags & N.ACK_STORED
        assert (await me.recv(timeout=5)).body == b"to me"
        assert (await idle.recv(timeout=5)).body == b"to carol"
        for c in (me, idle):
            with pytest.raises(TimeoutError):
                await c.recv(timeout=0.5)
            await c.close()

    asyncio.run(run())
    _nothing_more(server, "echo")
    _nothing_more(server, "idle-carol")


def test_unacknowledged_live_delivery_is_stored_once_and_kept_across_reconnect(server):
    """The stored copy is the same message: not delivered a second time on the session that
    has it, kept when that session goes away unacknowledged, removed by the later ack."""
    r = RawClient(server.addr)
    r.login("bob")
    s = RawClient(server.addr)
    s.login("alice")
    s.send((N.SEND, "k1", "bob", b"one"))
    d = r.expect(N.DELIVER)
    assert d[4:] == ("k1", b"one")
    assert s.expect(N.ACK, timeout=PROMPT_S) == (N.ACK, "k1", N.ACK_STORED)
    # Stored now, yet not delivered twice on this session.
    assert [f for f in r.drain(0.5) if f[0] == N.DELIVER] == []
    r.close()
    # Never acknowledged: the next session gets it again (from storage)...
    r2 = RawClient(server.addr)
    r2.login("bob")
    d2 = r2.expect(N.DELIVER)
    assert d2[4:] == ("k1", b"one")
    r2.send((N.DELIVER_ACK, d2[1]))
    time.sleep(0.3)
    r2.close()
    # ...and its ack removed it.
    _nothing_more(server, "bob")


@pytest.mark.parametrize("value", ["0", "-1", "61"])
def test_bad_live_ack_timeout_is_refused(tmp_path, value):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "iris_fast", "serve", "--data-dir", str(tmp_path),
         "--port", "0", "--http-port", "0", "--live-ack-timeout", value],
        capture_output=True, text=True, timeout=30, cwd=str(tmp_path),
    )  # fmt: skip
    assert out.returncode != 0
    assert "--live-ack-timeout" in out.stderr + out.stdout
