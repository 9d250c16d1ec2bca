"""A message near ``--max-frame``: taken only if its DELIVER fits, never lost, never a stall.

A DELIVER carries more than the SEND it came from (tag, timestamp, sender instead of recipient),
so a SEND that fits ``max_frame`` may become a DELIVER that does not. The server must refuse such
a SEND with an ERROR for its msg_id, and deliver every message it took, live or from storage,
with a DELIVER no longer than ``max_frame``. A connection whose write fails must not hold up any
other connection of the worker.
"""

from __future__ import annotations

import asyncio

import iris_native as N
import pytest
from iris_fast.connection import Connection
from rawclient import RawClient

from iris_fast import protocol as P
from iris_fast.config import ServerConfig
from iris_fast.server.links import home_of
from iris_fast.server.worker import Worker
from iris_fast.storage.mailbox import MailboxStore

pytestmark = pytest.mark.timeout(180)

SENDER = "big-sender"


def homed(prefix: str, worker: int, workers: int = 2) -> str:
    """A user id starting with ``prefix`` whose home is ``worker``."""
    return next(u for i in range(1000) if home_of(u := f"{prefix}{i}", workers) == worker)


def limit(max_frame: int, msg_id: str) -> int:
    """The longest body SENDER may send with ``msg_id``."""
    return max_frame - P.deliver_len(SENDER, msg_id, 0)


def strict(client: RawClient, max_frame: int) -> RawClient:
    # A frame longer than max_frame is a decode error here: DELIVERs must fit exactly.
    client.decoder = N.Decoder(max_frame)
    return client


@pytest.mark.parametrize("max_frame", [65536, 200_000])
def test_bodies_around_the_deliver_bound_are_refused_or_delivered_and_bystanders_flow(
    server_factory, max_frame: int
) -> None:
    srv = server_factory("--workers", "2", "--max-frame", str(max_frame))
    # Recipient and bystander share worker 1; the sender lives on worker 0, so each pair of
    # messages arrives over the worker link in one read and is flushed in one round.
    rcpt, by = homed("rcpt", 1), homed("by", 1)
    assert home_of(SENDER, 2) == 0
    r = strict(RawClient(srv.addr), max_frame)
    r.login(rcpt)
    b = strict(RawClient(srv.addr), max_frame)
    b.login(by)
    s = RawClient(srv.addr)
    s.login(SENDER)
    for delta in range(-3, 4):
        msg_id = f"m{delta + 3}"
        n = limit(max_frame, msg_id) + delta
        body = bytes([65 + delta + 3]) * n
        s.send((N.SEND, msg_id, rcpt, body), (N.SEND, f"by{delta + 3}", by, b"tick"))
        d = b.expect(N.DELIVER)
        assert d[4:] == (f"by{delta + 3}", b"tick")
        b.send((N.DELIVER_ACK, d[1]))
        if delta <= 0:
            d = r.expect(N.DELIVER, timeout=10)
            assert (d[3], d[4], d[5]) == (SENDER, msg_id, body), f"delta {delta}"
            assert len(N.encode(d, 1 << 24)) - 4 == max_frame + delta
            r.send((N.DELIVER_ACK, d[1]))
            want = {(N.ACK, msg_id, 0), (N.ACK, f"by{delta + 3}", 0)}
            assert {s.expect(N.ACK) for _ in range(2)} == want
        else:
            acks = [s.next(10) for _ in range(2)]
            err = next(f for f in acks if f is not None and f[0] == N.ERROR)
            assert err[1:3] == (P.E_FRAME_TOO_LARGE, msg_id), err
            assert f"may be at most {limit(max_frame, msg_id)} bytes" in err[3]
            assert (N.ACK, f"by{delta + 3}", 0) in acks
    # Nothing else reached the recipient, and every connection is still open and usable.
    assert [f for f in r.drain(0.3) if f[0] == N.DELIVER] == []
    s.send((N.PING, 5))
    assert s.expect(N.PONG)[1] == 5
    m = srv.metrics()
    assert m['iris_frames_rejected_total{reason="message_too_large"}'] == 3
    assert "Traceback" not in srv.full_log()


def test_stored_messages_at_the_bound_fit_when_read_back(server_factory) -> None:
    max_frame = 65536
    srv = server_factory("--workers", "2")
    rcpt = homed("offline", 0)
    s = RawClient(srv.addr)
    s.login(SENDER)
    sizes = {}
    for delta in range(-3, 4):
        msg_id = f"st{delta + 3}"
        sizes[msg_id] = limit(max_frame, msg_id) + delta
        s.send((N.SEND, msg_id, rcpt, b"s" * sizes[msg_id]))
    got = [s.next(10) for _ in range(7)]
    acked = sorted(f[1] for f in got if f is not None and f[0] == N.ACK and f[2] & N.ACK_STORED)
    refused = sorted(f[2] for f in got if f is not None and f[0] == N.ERROR)
    assert acked == ["st0", "st1", "st2", "st3"] and refused == ["st4", "st5", "st6"], got
    # Read back from LMDB at login (and again after a restart): each DELIVER fits max_frame.
    srv.terminate()
    srv.restart()
    r = strict(RawClient(srv.addr), max_frame)
    r.login(rcpt)
    for msg_id in acked:
        d = r.expect(N.DELIVER, timeout=10)
        assert (d[4], len(d[5])) == (msg_id, sizes[msg_id])
        r.send((N.DELIVER_ACK, d[1]))
    assert [f for f in r.drain(0.3) if f[0] == N.DELIVER] == []


def test_client_library_refuses_what_the_server_would(server_factory) -> None:
    from iris_fast.client import IrisClient, IrisError

    srv = server_factory("--workers", "1")
    with IrisClient(*srv.addr, timeout=10) as c:
        c.login(SENDER)
        fits = limit(65536, "x" * 32)
        c.send_msg("someone", b"f" * fits, msg_id="x" * 32)
        with pytest.raises(IrisError) as info:
            c.send_msg("someone", b"f" * (fits + 1), msg_id="y" * 32)
        assert info.value.code == P.E_FRAME_TOO_LARGE


def test_one_connections_write_failure_does_not_skip_the_others(tmp_path) -> None:
    """In-process: a real worker, real sockets; one connection's queued frame cannot be encoded
    (a stand-in for any bug in a write). The connections flushed after it in the same round
    still get their frames, and only the failing one is cut."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        config = ServerConfig(data_dir=str(tmp_path), workers=1, keepalive_s=0)
        store = MailboxStore(str(tmp_path / "mailbox"), loop)
        worker = Worker(config, store, loop)
        server = await loop.create_server(lambda: Connection(worker), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        while len(worker.connections) < 3:
            await asyncio.sleep(0.01)
        conns = sorted(worker.connections, key=lambda c: c.peer[1])
        by_port = {w.get_extra_info("sockname")[1]: (rd, w) for rd, w in clients}
        bad, *good = conns
        bad_port = bad.peer[1]
        # One round: the failing connection first, so that a failure escaping the loop would
        # leave the others unflushed.
        bad.send((P.ACK, "x" * 300, 0))
        for i, c in enumerate(good):
            c.send((P.PONG, i))
        await asyncio.sleep(0.2)
        for i, c in enumerate(good):
            reader, _ = by_port[c.peer[1]]
            data = await asyncio.wait_for(reader.read(100), 5)
            assert N.Decoder().feed(data) == [(P.PONG, i)]
        reader, _ = by_port[bad_port]
        try:
            assert await asyncio.wait_for(reader.read(100), 5) == b""
        except ConnectionResetError:
            pass
        await asyncio.sleep(0.05)
        assert bad not in worker.connections and len(worker.connections) == 2
        assert worker.stats.rejected_by_reason == {"write_failed": 1}
        for _, w in clients:
            w.close()
        server.close()
        store.close()

    import uvloop

    uvloop.run(main())


def test_login_then_a_malformed_frame_in_one_read_gets_its_error_after_a_handoff(
    server_factory,
) -> None:
    """LOGIN (for a user homed on the other worker) and bad frames in one write: the hand-off
    carries them as sent, and the home worker answers each with its ERROR."""
    srv = server_factory("--workers", "2")
    for home in (0, 1):
        for k in range(3):  # SO_REUSEPORT picks the accepting worker: try a few connections
            user = homed(f"h{home}-{k}-", home)
            c = RawClient(srv.addr)
            c.send_raw(
                N.encode((N.LOGIN, 1, user, ""))
                + b"\x00\x00\x00\x02\x7f\x00"  # unknown type 0x7f
                + N.encode((N.PING, 11))
                + b"\x00\x00\x00\x03\x06\x00\x00"  # DELIVER_ACK cut short
                + b"\x00\x00\x00\x05\x03\x01\xff\x01a"  # SEND with invalid UTF-8 in msg_id
                + N.encode((N.PING, 12))
                + b"\x00\x00\x00\x09\x03"  # the start of a SEND, finished below
            )
            assert c.expect(N.LOGIN_OK)[3] == "test-node"
            assert c.expect(N.ERROR)[1] == P.E_UNKNOWN_TYPE
            assert c.expect(N.PONG)[1] == 11
            assert c.expect(N.ERROR)[1] == P.E_BAD_FRAME
            assert c.expect(N.ERROR)[1] == P.E_BAD_UTF8
            assert c.expect(N.PONG)[1] == 12
            c.send_raw(b"\x02id\x03zed" + b"!")
            assert c.expect(N.ACK)[1] == "id"
            # And a frame too large right after LOGIN: its fatal ERROR, then the close.
            user2 = homed(f"h{home}-{k}-big-", home)
            c2 = RawClient(srv.addr)
            c2.send_raw(N.encode((N.LOGIN, 1, user2, "")) + b"\x7f\xff\xff\xff\x03")
            c2.expect(N.LOGIN_OK)
            assert c2.expect(N.ERROR)[1] == P.E_FRAME_TOO_LARGE
            assert c2.wait_closed()
            c.close()
            c2.close()
    m = srv.metrics()
    assert m.get("iris_handoffs_out_total", 0) >= 1, "no connection was handed off"
    assert "Traceback" not in srv.full_log()
