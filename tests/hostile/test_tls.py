"""TLS on the client listener: real handshakes, sessions relayed to their home worker."""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest
from tlsutil import make_cert

from iris_fast.client import AsyncIrisClient, IrisClient
from iris_fast.server.links import home_of

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def tls_server(server_factory, tmp_path):
    ca, cert, key = make_cert(tmp_path)
    srv = server_factory("--workers", "2", "--tls-cert", str(cert), "--tls-key", str(key))
    return srv, str(ca)


def users_on(*homes: int) -> list[str]:
    out = []
    for home in homes:
        i = 0
        while home_of(f"t{home}-{i}", 2) != home:
            i += 1
        out.append(f"t{home}-{i}")
    return out


def test_tls_clients_talk_across_workers_live_and_offline(tls_server):
    srv, ca = tls_server
    alice, bob = users_on(0, 1)

    async def run() -> None:
        a = AsyncIrisClient(*srv.addr, tls=True, ca_file=ca, timeout=10)
        await a.login(alice)
        await a.send_msg(bob, b"stored while bob is away")
        b = AsyncIrisClient(*srv.addr, tls=True, ca_file=ca, timeout=10)
        await b.login(bob)
        assert (await b.recv(timeout=5)).body == b"stored while bob is away"
        for i in range(20):
            # Live: the sender's ACK waits for the recipient's DELIVER_ACK, so both run at once.
            _, got = await asyncio.gather(a.send_msg(bob, b"live %d" % i), b.recv(timeout=5))
            assert got.body == b"live %d" % i
            _, got = await asyncio.gather(b.send_msg(alice, b"back %d" % i), a.recv(timeout=5))
            assert got.body == b"back %d" % i
        await a.close()
        await b.close()

    asyncio.run(run())
    # Every session logged in on a worker that is not its home was relayed there.
    m = srv.metrics()
    assert m["iris_tls_relays_total"] == m["iris_handoffs_out_total"]


def test_many_tls_sessions_at_once_are_relayed_and_all_deliver(tls_server):
    srv, ca = tls_server

    async def run() -> int:
        names = [f"many{i}" for i in range(40)]
        clients = [AsyncIrisClient(*srv.addr, tls=True, ca_file=ca, timeout=20) for _ in names]
        await asyncio.gather(*(c.login(n) for c, n in zip(clients, names, strict=True)))
        sends = [c.send_msg(names[(i + 1) % 40], b"ring %d" % i) for i, c in enumerate(clients)]
        results = await asyncio.gather(*sends, *(c.recv(timeout=10) for c in clients))
        got = results[40:]
        await asyncio.gather(*(c.close() for c in clients))
        return sum(1 for m in got if m.body.startswith(b"ring"))

    assert asyncio.run(run()) == 40
    assert srv.metrics()["iris_tls_relays_total"] >= 1


def test_a_plain_tcp_client_on_the_tls_port_gets_no_service(tls_server):
    srv, _ca = tls_server
    with socket.create_connection(srv.addr, timeout=5) as s:
        s.sendall(b"\x00\x00\x00\x0a\x01\x00\x01\x05alice\x00")  # a plaintext LOGIN
        s.settimeout(5)
        data = s.recv(100)
        # The server answers with a TLS alert or closes: never a LOGIN_OK in plaintext.
        assert data == b"" or data[:1] == b"\x15"
    assert srv.health()["status"] == "ok"


def test_a_client_that_does_not_trust_the_certificate_refuses_it(tls_server, tmp_path):
    srv, _ca = tls_server
    other_ca, _, _ = make_cert(tmp_path / "x" if (tmp_path / "x").mkdir() is None else tmp_path)
    c = IrisClient(*srv.addr, tls=True, ca_file=str(other_ca), timeout=3)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        c.login("mallory")
