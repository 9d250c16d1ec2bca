"""Unit tests of iris_fast.client against a tiny in-process fake server.

The fake server speaks the wire protocol through iris_native; each test scripts its behaviour
with callbacks. The real-server end-to-end tests live elsewhere.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Callable

import iris_native as nat
import pytest

from iris_fast.client import (
    AsyncIrisClient,
    AuthError,
    IrisClient,
    IrisError,
    MailboxFullError,
    Message,
)
from iris_fast.client._core import ClientCore
from iris_fast.ports import free_port

pytestmark = pytest.mark.timeout(30)


class Conn:
    """One accepted connection of the fake server."""

    def __init__(self, server: FakeServer, index: int, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.index = index
        self.writer = writer
        self.user: str | None = None
        self.sends: list[tuple] = []
        self.deliver_acks: list[int] = []
        self.next_tag = 1

    def write(self, *frames: tuple) -> None:
        self.writer.write(nat.encode_batch(list(frames)))

    def deliver(self, sender: str, msg_id: str, body: bytes, ts: int = 1234) -> tuple:
        frame = (nat.DELIVER, self.next_tag, ts, sender, msg_id, body)
        self.next_tag += 1
        return frame

    def close(self) -> None:
        self.writer.close()


# Callback signatures: on_login(conn) -> frames to write after LOGIN_OK (or None to reject with
# AUTH_FAILED); on_send(conn, frame) -> None; on_deliver_ack(conn, tag) -> None.
class FakeServer:
    def __init__(
        self,
        *,
        on_login: Callable[[Conn], list[tuple] | None] | None = None,
        on_send: Callable[[Conn, tuple], None] | None = None,
        on_deliver_ack: Callable[[Conn, int], None] | None = None,
        answer_pings: bool | Callable[[Conn], bool] = True,
        node: str = "fake-1",
        ssl_ctx: ssl.SSLContext | None = None,
    ) -> None:
        self.ssl_ctx = ssl_ctx
        self.on_login = on_login or (lambda conn: [])
        self.on_send = on_send or (lambda conn, f: conn.write((nat.ACK, f[1], nat.ACK_STORED)))
        self.on_deliver_ack = on_deliver_ack or (lambda conn, tag: None)
        self.answer_pings = answer_pings
        self.node = node
        self.conns: list[Conn] = []
        self.logins: list[tuple] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    def __enter__(self) -> FakeServer:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self.loop)
        fut.result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for conn in self.conns:
                conn.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ssl_ctx)
        self.port = self._server.sockets[0].getsockname()[1]

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the server's loop (for tests that push frames from outside)."""
        self.loop.call_soon_threadsafe(fn)

    @property
    def all_sends(self) -> list[tuple]:
        return [f for c in self.conns for f in c.sends]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(self, len(self.conns), writer)
        self.conns.append(conn)
        dec = nat.Decoder()
        try:
            while data := await reader.read(65536):
                for frame in dec.feed(data):
                    self._dispatch(conn, frame)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def _dispatch(self, conn: Conn, frame: tuple) -> None:
        kind = frame[0]
        if kind == nat.LOGIN:
            self.logins.append(frame)
            conn.user = frame[2]
            extra = self.on_login(conn)
            if extra is None:
                conn.write((nat.ERROR, 6, "", "bad token"))
                conn.close()
                return
            conn.write((nat.LOGIN_OK, 1, 0, self.node, 65536), *extra)
        elif kind == nat.SEND:
            conn.sends.append(frame)
            self.on_send(conn, frame)
        elif kind == nat.DELIVER_ACK:
            conn.deliver_acks.append(frame[1])
            self.on_deliver_ack(conn, frame[1])
        elif kind == nat.PING:
            answer = self.answer_pings
            if answer(conn) if callable(answer) else answer:
                conn.write((nat.PONG, frame[1]))


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# -- login ---------------------------------------------------------------------------------------


def test_login_ok_sends_version_user_token() -> None:
    with FakeServer() as srv, IrisClient("127.0.0.1", srv.port, token="tok") as c:
        c.login("alice")
        assert c.node == "fake-1"
        assert srv.logins == [(nat.LOGIN, 1, "alice", "tok")]


def test_login_auth_failure_raises_auth_error() -> None:
    with FakeServer(on_login=lambda conn: None) as srv:
        c = IrisClient("127.0.0.1", srv.port, timeout=3)
        with pytest.raises(AuthError) as info:
            c.login("mallory", token="forged")
        assert isinstance(info.value, IrisError)
        assert info.value.code == 6
        assert info.value.reason == "bad token"
        # Not retried: an auth failure would only repeat.
        assert len(srv.logins) == 1
        c.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_tls_verifies_server_with_ca_file(tmp_path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    with FakeServer(ssl_ctx=ctx) as srv:
        with IrisClient("localhost", srv.port, tls=True, ca_file=str(cert)) as c:
            c.login("alice")
            assert c.send_msg("bob", "secret") == srv.all_sends[0][1]

        async def main() -> None:
            async with AsyncIrisClient("localhost", srv.port, tls=True, ca_file=str(cert)) as a:
                await a.login("alice")
                await a.send_msg("bob", "secret")

        asyncio.run(main())
        # Without the CA the certificate is rejected (and every retry fails the same way).
        with pytest.raises(ConnectionError):
            IrisClient("localhost", srv.port, tls=True, timeout=0.5).login("alice")


# -- send ----------------------------------------------------------------------------------------


def test_send_msg_blocks_until_ack_and_returns_msg_id() -> None:
    def on_send(conn: Conn, f: tuple) -> None:
        flags = nat.ACK_STORED | nat.ACK_DEGRADED
        conn.server.loop.call_later(0.3, conn.write, (nat.ACK, f[1], flags))

    with FakeServer(on_send=on_send) as srv, IrisClient("127.0.0.1", srv.port) as c:
        c.login("alice")
        t0 = time.monotonic()
        mid = c.send_msg("bob", "héllo")
        assert time.monotonic() - t0 >= 0.25
        assert len(mid) == 32 and int(mid, 16) >= 0
        assert srv.all_sends == [(nat.SEND, mid, "bob", "héllo".encode())]
        assert c.unacked == {}
        assert c.last_ack_flags == nat.ACK_STORED | nat.ACK_DEGRADED
        assert c.degraded
        assert c.send_msg("bob", b"\x00raw", msg_id="my-id") == "my-id"
        assert srv.all_sends[-1] == (nat.SEND, "my-id", "bob", b"\x00raw")


def test_ack_of_foreign_msg_id_is_ignored() -> None:
    def on_send(conn: Conn, f: tuple) -> None:
        conn.write((nat.ACK, "other-device-msg", 0), (nat.ACK, f[1], nat.ACK_STORED))

    with FakeServer(on_send=on_send) as srv, IrisClient("127.0.0.1", srv.port) as c:
        c.login("alice")
        c.send_msg("bob", "x")
        assert c.last_ack_flags == nat.ACK_STORED
        assert not c.degraded


def test_reconnect_resends_unacked_in_order_and_late_ack_completes() -> None:
    """Connection 0 never ACKs and drops after the 2nd SEND; connection 1 ACKs everything."""

    def on_send(conn: Conn, f: tuple) -> None:
        if conn.index == 0:
            if len(conn.sends) == 2:
                conn.close()
        elif len(conn.sends) == 2:
            # Both resends are in; the ACKs arrive on the new connection, oldest last.
            conn.write(*[(nat.ACK, s[1], nat.ACK_DUPLICATE) for s in reversed(conn.sends)])

    with FakeServer(on_send=on_send) as srv:
        c = IrisClient("127.0.0.1", srv.port, timeout=0.8)
        c.login("alice")
        with pytest.raises(TimeoutError):
            c.send_msg("bob", "first")
        first = srv.conns[0].sends[0][1]
        assert list(c.unacked) == [first], "a timed-out message stays queued"
        c.timeout = 5
        second = c.send_msg("bob", "second")
        assert len(srv.conns) == 2
        assert [f[1] for f in srv.conns[0].sends] == [first, second]
        # Every unACKed message resent with its msg_id, oldest first.
        assert [f[1:] for f in srv.conns[1].sends] == [
            (first, "bob", b"first"),
            (second, "bob", b"second"),
        ]
        assert c.unacked == {}
        assert c.last_ack_flags == nat.ACK_DUPLICATE
        c.close()


def test_dead_peer_detected_by_ping_then_resend() -> None:
    """Connection 0 swallows everything (no ACK, no PONG, no FIN): the client must give up on it."""

    def on_send(conn: Conn, f: tuple) -> None:
        if conn.index > 0:
            conn.write((nat.ACK, f[1], nat.ACK_STORED))

    with FakeServer(on_send=on_send, answer_pings=lambda conn: conn.index > 0) as srv:
        with IrisClient("127.0.0.1", srv.port, timeout=2.0) as c:
            c.login("alice")
            mid = c.send_msg("bob", "are you there")
            assert len(srv.conns) == 2
            assert [f[1] for f in srv.conns[1].sends] == [mid]


def test_failover_to_second_node_when_first_refuses() -> None:
    def drop_on_send(conn: Conn, f: tuple) -> None:
        conn.close()

    with FakeServer(node="n1", on_send=drop_on_send) as n1, FakeServer(node="n2") as n2:
        dead = free_port()
        c = IrisClient("127.0.0.1", dead, nodes=[("127.0.0.1", n1.port), ("127.0.0.1", n2.port)])
        c.login("alice")
        assert c.node == "n1"
        # n1 drops the connection on SEND: the client moves on to the next node and resends.
        mid = c.send_msg("bob", "hi")
        assert c.node == "n2"
        assert [f[1] for f in n1.all_sends] == [mid]
        assert [f[1] for f in n2.all_sends] == [mid]
        c.close()


def test_shutting_down_error_fails_over() -> None:
    def on_send(conn: Conn, f: tuple) -> None:
        conn.write((nat.ERROR, 13, "", "node is draining"))
        conn.close()

    with FakeServer(node="n1", on_send=on_send) as n1, FakeServer(node="n2") as n2:
        with IrisClient("127.0.0.1", n1.port, nodes=[("127.0.0.1", n2.port)]) as c:
            c.login("alice")
            mid = c.send_msg("bob", "hi")
            assert c.node == "n2"
            assert [f[1] for f in n2.all_sends] == [mid]


def test_mailbox_full_and_other_errors() -> None:
    def on_send(conn: Conn, f: tuple) -> None:
        if f[2] == "full":
            conn.write((nat.ERROR, 9, f[1], "mailbox full"))
        elif f[2] == "":
            conn.write((nat.ERROR, 12, f[1], "bad recipient"))
        else:
            conn.write((nat.ACK, f[1], nat.ACK_STORED))

    with FakeServer(on_send=on_send) as srv, IrisClient("127.0.0.1", srv.port) as c:
        c.login("alice")
        with pytest.raises(MailboxFullError) as info:
            c.send_msg("full", "x", msg_id="m1")
        assert info.value.code == 9 and info.value.msg_id == "m1"
        assert isinstance(info.value, IrisError)
        assert c.unacked == {}
        # The connection stays usable.
        assert c.send_msg("bob", "y", msg_id="m2") == "m2"


# -- receive -------------------------------------------------------------------------------------


def test_recv_dedups_and_acks_per_policy() -> None:
    def on_login(conn: Conn) -> list[tuple]:
        return [
            conn.deliver("carol", "m1", b"one", ts=111),  # tag 1
            conn.deliver("carol", "m2", b"two", ts=222),  # tag 2
            conn.deliver("carol", "m1", b"one", ts=111),  # tag 3, duplicate
        ]

    with FakeServer(on_login=on_login) as srv, IrisClient("127.0.0.1", srv.port) as c:
        c.login("bob")
        conn = srv.conns[0]
        assert c.recv(timeout=5) == Message("carol", "m1", b"one", 111)
        wait_for(lambda: conn.deliver_acks == [1])
        # Last entry handed: ack the highest tag seen, which covers the dropped duplicate.
        assert c.recv_msg(timeout=5) == b"two"
        wait_for(lambda: conn.deliver_acks == [1, 3])
        with pytest.raises(TimeoutError):
            c.recv(timeout=0.3)
        # A duplicate arriving with an empty inbox is acked at once.
        srv.call(lambda: conn.write(conn.deliver("carol", "m2", b"two")))
        with pytest.raises(TimeoutError):
            c.recv(timeout=0.5)
        assert conn.deliver_acks == [1, 3, 4]


def test_recv_timeout() -> None:
    with FakeServer() as srv, IrisClient("127.0.0.1", srv.port) as c:
        c.login("bob")
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            c.recv(timeout=0.4)
        assert 0.35 <= time.monotonic() - t0 < 3


def test_recv_reconnects_and_gets_redelivery_once() -> None:
    """Connection 0 delivers m1 then dies; the server redelivers it (and m2) on connection 1."""

    def on_login(conn: Conn) -> list[tuple]:
        if conn.index == 0:
            srv.loop.call_later(0.2, conn.close)
            return [conn.deliver("carol", "m1", b"one")]
        return [conn.deliver("carol", "m1", b"one"), conn.deliver("carol", "m2", b"two")]

    with FakeServer(on_login=on_login) as srv, IrisClient("127.0.0.1", srv.port) as c:
        c.login("bob")
        time.sleep(0.4)  # connection 0 is gone before the application reads anything
        got = [c.recv(timeout=5).msg_id, c.recv(timeout=5).msg_id]
        assert got == ["m1", "m2"]
        with pytest.raises(TimeoutError):
            c.recv(timeout=0.3)
        assert len(srv.conns) == 2
        wait_for(lambda: srv.conns[1].deliver_acks[-1:] == [2])
        assert srv.conns[0].deliver_acks == []


def test_kill_scripts_against_store_and_forward_fake() -> None:
    """The design document's scripts, against a fake that stores and forwards."""
    mailbox: dict[str, list[tuple[str, str, bytes]]] = {}
    outstanding: dict[int, dict[int, tuple[str, str, bytes]]] = {}

    def on_login(conn: Conn) -> list[tuple]:
        frames = []
        outstanding[conn.index] = {}
        for sender, mid, body in mailbox.get(conn.user or "", []):
            outstanding[conn.index][conn.next_tag] = (sender, mid, body)
            frames.append(conn.deliver(sender, mid, body))
        return frames

    def on_send(conn: Conn, f: tuple) -> None:
        mailbox.setdefault(f[2], []).append((conn.user or "", f[1], f[3]))
        conn.write((nat.ACK, f[1], nat.ACK_STORED))

    def on_deliver_ack(conn: Conn, tag: int) -> None:
        for t in [t for t in outstanding[conn.index] if t <= tag]:
            item = outstanding[conn.index].pop(t)
            mailbox[conn.user or ""].remove(item)

    with FakeServer(on_login=on_login, on_send=on_send, on_deliver_ack=on_deliver_ack) as srv:
        port = srv.port
        c = IrisClient("127.0.0.1", port)
        c.login("kill_sender")
        for i in range(100):
            c.send_msg("kill_receiver", f"KILL_{i}")
        c.close()
        c = IrisClient("127.0.0.1", port)
        c.login("kill_receiver")
        count = 0
        while True:
            try:
                msg = c.recv_msg(timeout=3)
                if b"KILL_" in msg:
                    count += 1
            except Exception:
                break
        c.close()
        assert count == 100
        wait_for(lambda: mailbox["kill_receiver"] == [])


# -- shared core (generations, deterministic) ----------------------------------------------------


def _deliver(tag: int, mid: str) -> bytes:
    return nat.encode((nat.DELIVER, tag, 1, "carol", mid, b"x"))


def _acks(core: ClientCore) -> list[int]:
    frames = [f for f in core.out if f[0] == nat.DELIVER_ACK]
    core.out.clear()
    return [f[1] for f in frames]


def test_core_never_acks_older_generation_tags() -> None:
    core = ClientCore(lambda mid, res: None)
    core.begin_connection()
    core.feed(_deliver(1, "a") + _deliver(2, "b"))
    core.begin_connection()  # reconnect: tags restart at 1
    core.feed(_deliver(1, "c"))
    assert core.pop_message().msg_id == "a"  # type: ignore[union-attr]
    assert _acks(core) == []  # its tag belongs to the dead connection
    assert core.pop_message().msg_id == "b"  # type: ignore[union-attr]
    assert _acks(core) == []
    assert core.pop_message().msg_id == "c"  # type: ignore[union-attr]
    assert _acks(core) == [1]


def test_core_redelivery_of_unhanded_message_is_acked_only_when_handed() -> None:
    core = ClientCore(lambda mid, res: None)
    core.begin_connection()
    core.feed(_deliver(1, "a"))
    core.begin_connection()
    core.feed(_deliver(1, "a") + _deliver(2, "b"))
    assert _acks(core) == []  # "a" is not with the application yet
    assert [core.pop_message().msg_id for _ in range(2)] == ["a", "b"]  # type: ignore[union-attr]
    assert _acks(core) == [1, 2]
    assert core.pop_message() is None


def test_core_tag_gap_resynchronises_instead_of_acking_past_it() -> None:
    from iris_fast.client._core import ConnectionLost

    core = ClientCore(lambda mid, res: None)
    core.begin_connection()
    core.feed(_deliver(1, "a"))
    # Tag 2 never arrived (the server failed to write it): nothing may acknowledge it.
    with pytest.raises(ConnectionLost, match="tag 3 after tag 1"):
        core.feed(_deliver(3, "c"))
    assert core.pop_message().msg_id == "a"  # type: ignore[union-attr]
    assert _acks(core) == [1]
    assert core.pop_message() is None  # "c" waits for its redelivery
    # A repeated tag is no better.
    core.begin_connection()
    core.feed(_deliver(1, "b"))
    with pytest.raises(ConnectionLost):
        core.feed(_deliver(1, "c"))


def test_tag_gap_reconnects_and_the_server_redelivers_from_storage() -> None:
    """Connection 0 skips tag 2: the client must not ack tag 3 there, but reconnect; the
    server (like iris-fast: unacknowledged deliveries are stored) redelivers on connection 1."""

    def on_login(conn: Conn) -> list[tuple]:
        if conn.index == 0:
            m1 = conn.deliver("carol", "m1", b"one")
            conn.deliver("carol", "m2", b"lost")  # tag 2: never written
            return [m1, conn.deliver("carol", "m3", b"three")]
        return [conn.deliver("carol", m, b"") for m in ("m1", "m2", "m3")]

    with FakeServer(on_login=on_login) as srv:
        for make in (IrisClient, AsyncIrisClient):
            srv.conns.clear()
            if make is IrisClient:
                with IrisClient("127.0.0.1", srv.port) as c:
                    c.login("bob")
                    got = [c.recv(timeout=5).msg_id for _ in range(3)]
                    with pytest.raises(TimeoutError):
                        c.recv(timeout=0.3)
            else:

                async def main() -> list[str]:
                    async with AsyncIrisClient("127.0.0.1", srv.port) as a:
                        await a.login("bob")
                        out = [(await a.recv(timeout=5)).msg_id for _ in range(3)]
                        with pytest.raises(TimeoutError):
                            await a.recv(timeout=0.3)
                        return out

                got = asyncio.run(main())
            assert got == ["m1", "m2", "m3"]
            assert len(srv.conns) == 2
            assert all(tag < 2 for tag in srv.conns[0].deliver_acks), srv.conns[0].deliver_acks
            wait_for(lambda: srv.conns[1].deliver_acks[-1:] == [3])


def test_core_dedup_window_is_bounded() -> None:
    from iris_fast.client._core import DedupWindow

    w = DedupWindow(3)
    for k in "abcd":
        w.add(("s", k))
    assert len(w) == 3 and ("s", "a") not in w and ("s", "d") in w


# -- asyncio client ------------------------------------------------------------------------------


def test_async_send_many_pipelines_and_returns_ids() -> None:
    n = 50

    def on_send(conn: Conn, f: tuple) -> None:
        # ACK only once all SENDs are in: a client waiting per message would deadlock here.
        if len(conn.sends) == n:
            conn.write(*[(nat.ACK, s[1], nat.ACK_STORED) for s in reversed(conn.sends)])

    async def main(port: int) -> list[str]:
        async with AsyncIrisClient("127.0.0.1", port, timeout=5) as c:
            await c.login("alice")
            items: list = [("bob", f"m{i}") for i in range(n - 1)] + [("bob", b"last", "own-id")]
            ids = await c.send_many(items)
            assert c.unacked == {}
            return ids

    with FakeServer(on_send=on_send) as srv:
        ids = asyncio.run(main(srv.port))
        assert len(ids) == n and len(set(ids)) == n and ids[-1] == "own-id"
        assert [f[1] for f in srv.all_sends] == ids
        assert srv.all_sends[0][3] == b"m0"


def test_async_errors_reconnect_and_recv() -> None:
    def on_login(conn: Conn) -> list[tuple]:
        if conn.index == 0:
            return [conn.deliver("carol", "m1", b"one"), conn.deliver("carol", "m1", b"one")]
        return [conn.deliver("carol", "m2", b"two")]

    def on_send(conn: Conn, f: tuple) -> None:
        if f[2] == "full":
            conn.write((nat.ERROR, 9, f[1], "mailbox full"))
        elif conn.index == 0:
            conn.close()  # drop without ACK: must be resent on connection 1
        else:
            conn.write((nat.ACK, f[1], nat.ACK_STORED | nat.ACK_DEGRADED))

    async def main(port: int) -> None:
        c = AsyncIrisClient("127.0.0.1", port, timeout=5)
        await c.login("bob")
        with pytest.raises(MailboxFullError):
            await c.send_msg("full", "x")
        assert await c.recv(timeout=5) == Message("carol", "m1", b"one", 1234)
        mid = await c.send_msg("dave", "hello")
        assert c.degraded
        assert await c.recv_msg(timeout=5) == b"two"
        with pytest.raises(TimeoutError):
            await c.recv(timeout=0.3)
        await c.close()
        await c.close()
        assert [f[1] for f in srv.conns[1].sends] == [mid]

    with FakeServer(on_login=on_login, on_send=on_send) as srv:
        asyncio.run(main(srv.port))
        assert len(srv.conns) == 2
        # Connection 0: m1 handed while its duplicate (tag 2) was already dropped -> ack 2.
        assert srv.conns[0].deliver_acks == [2]
        assert srv.conns[1].deliver_acks == [1]


def test_async_auth_failure() -> None:
    async def main(port: int) -> None:
        c = AsyncIrisClient("127.0.0.1", port, timeout=3)
        with pytest.raises(AuthError):
            await c.login("mallory")
        await c.close()

    with FakeServer(on_login=lambda conn: None) as srv:
        asyncio.run(main(srv.port))
