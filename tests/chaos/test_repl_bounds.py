"""Who may talk on a replication port, and what they may make a node do (docs/security.md):
links without HELLO, bytes before HELLO, a node id that is not the peer, an ACK of records never
sent. Each test failed on the code before these bounds existed."""

from __future__ import annotations

import socket
import time

import iris_native as N
import pytest

from chaos.test_failures import wait_for
from iris_fast.ports import free_port

pytestmark = pytest.mark.timeout(180)


def closed_within(sock: socket.socket, timeout: float) -> bool:
    """Whether the other side closes ``sock`` within ``timeout`` (whatever it sends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except ConnectionError:
            return True
    return False


def test_a_link_that_never_says_hello_is_closed(server_factory):
    port = free_port()
    node = server_factory("--repl-port", str(port), node_id="n")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        assert closed_within(s, 20), "a silent replication link stays open"
    wait_for(lambda: "no REPL_HELLO within" in node.full_log(), what="reason logged")
    assert node.metrics()["iris_repl_links_refused_total"] >= 1


def test_what_a_link_may_send_before_hello_is_bounded(server_factory):
    """A frame header announcing almost 16 MiB, then its bytes: the node stops buffering them
    long before, and says why."""
    port = free_port()
    node = server_factory("--repl-port", str(port), node_id="n")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall((16 << 20).to_bytes(4, "big") + bytes([N.REPL_HELLO]))
        try:
            for _ in range(16):
                s.sendall(bytes(64 << 10))
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert closed_within(s, 20)
    wait_for(lambda: "bytes before its REPL_HELLO" in node.full_log(), what="reason logged")


def hello_from(node: str, stream: int = 0, workers: int = 2) -> bytes:
    return N.encode((N.REPL_HELLO, N.REPL_VERSION, node, 1, workers, 0, [(stream, 0)]))


def test_only_the_paired_node_may_replicate_to_us(pair):
    """b paired with a: a HELLO from any other node id is refused (not answered, not taking
    over a's link), and b remembers its peer across a restart."""
    for attempt in range(2):
        with socket.create_connection(("127.0.0.1", pair.repl_b), timeout=5) as s:
            s.sendall(hello_from("mallory"))
            s.settimeout(5)
            assert s.recv(100) == b"", "the node answered a HELLO from another node"
        wait_for(lambda: "'mallory' is not this node's peer 'a'" in pair.b.full_log(),
                 what="refusal logged")  # fmt: skip
        assert "peer mallory reconnected" not in pair.b.full_log()
        assert pair.b.health()["status"] == "ok"
        if attempt == 0:
            assert pair.b.terminate() == 0
            pair.b.start(accept=("ok", "degraded"))
            pair.wait_paired()


def test_peer_node_id_pins_the_peer(server_factory):
    port = free_port()
    node = server_factory("--repl-port", str(port), "--peer-node-id", "a", "--workers", "2",
                          node_id="b")  # fmt: skip
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(hello_from("zed"))
        s.settimeout(5)
        assert s.recv(100) == b""
    wait_for(lambda: "'zed' is not this node's peer 'a' (--peer-node-id)" in node.full_log(),
             what="refusal logged")  # fmt: skip
    # The named peer is accepted: it gets an answering HELLO.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(hello_from("a"))
        s.settimeout(5)
        dec = N.Decoder(1 << 24, repl=True)
        frames: list = []
        while not frames:
            data = s.recv(65536)
            assert data, "the named peer was refused"
            frames = dec.feed(data)
        assert frames[0][0] == N.REPL_HELLO and frames[0][2] == "b"


def test_an_ack_beyond_what_was_sent_closes_the_link(server_factory):
    """A peer acknowledging LSNs the origin never sent would make it trim its log and ACK
    clients for records nobody has: the origin closes the link and says why."""
    fake = socket.socket()
    fake.bind(("127.0.0.1", 0))
    fake.listen(4)
    a = server_factory("--repl-port", str(free_port()), "--workers", "1", "--peer",
                       f"127.0.0.1:{fake.getsockname()[1]}", "--peer-timeout", "10",
                       "--heartbeat", "0.25", node_id="a", start=False)  # fmt: skip
    a.start(accept=("degraded",))
    fake.settimeout(10)
    conn, _ = fake.accept()
    with conn:
        dec = N.Decoder(1 << 24, repl=True)
        conn.settimeout(10)
        frames: list = []
        while not frames:
            frames = dec.feed(conn.recv(65536))
        hello = frames[0]
        assert hello[0] == N.REPL_HELLO
        ((stream, last),) = hello[6]
        # Answer as a replica that has everything a has, in a's own history.
        conn.sendall(N.encode((N.REPL_HELLO, N.REPL_VERSION, "b", hello[3], 1, 0,
                               [(stream, last)])))  # fmt: skip
        wait_for(lambda: a.health()["status"] == "ok", what="a paired with the fake peer")
        conn.sendall(N.encode((N.REPL_ACK, stream, last + 1000)))
        assert closed_within(conn, 10), "the origin kept a link that acknowledged the future"
    fake.close()
    wait_for(lambda: "beyond the" in a.full_log(), what="reason logged")
    assert a.metrics()["iris_repl_bad_acks_total"] == 1
