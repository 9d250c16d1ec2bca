"""Local processes that are not workers of the node cannot use its worker-to-worker sockets.

The hand-off and link sockets are abstract Unix sockets: any process on the machine can find
them in /proc/net/unix and connect. These tests are such a process (pytest is not a child of the
node's supervisor), forging what a sibling worker would send.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
import time

import iris_native as N
import pytest
from rawclient import RawClient

from iris_fast.server.links import home_of, socket_name

pytestmark = pytest.mark.timeout(120)

REFUSED_METRIC = "iris_local_peer_refused_total"


def user_on(home: int, prefix: str, workers: int = 2) -> str:
    """A user id whose home is worker ``home``."""
    i = 0
    while home_of(f"{prefix}-{i}", workers) != home:
        i += 1
    return f"{prefix}-{i}"


def _stored_for(srv, victim: str, msg_id: str) -> RawClient:
    """A message from a real sender waits in ``victim``'s mailbox (ACKed as stored)."""
    sender = RawClient(srv.addr)
    sender.login(f"sender-of-{msg_id}")
    sender.send((N.SEND, msg_id, victim, b"for the victim only"))
    assert sender.expect(N.ACK) == (N.ACK, msg_id, N.ACK_STORED)
    return sender


def _received_within(sock: socket.socket, seconds: float) -> bytes:
    """Everything ``sock`` receives until EOF or ``seconds`` of silence."""
    sock.settimeout(seconds)
    got = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return got
            got += data
    except TimeoutError:
        return got
    except ConnectionResetError:  # an abort: nothing more will come
        return got


def _wait_metric(srv, name: str, at_least: float, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    value = 0.0
    while time.monotonic() < deadline:
        value = srv.metrics().get(name, 0.0)
        if value >= at_least:
            return value
        time.sleep(0.1)
    return value


def _forge_handoff(name: str, payload: bytes, fd: int) -> None:
    """Send ``payload`` with ``fd`` (SCM_RIGHTS) the way a sibling worker would.

    The hand-off socket is SOCK_SEQPACKET; before issue 10 it was a datagram socket, which a
    seqpacket connect reports as ECONNREFUSED (or EPROTOTYPE): then the datagram is sent
    instead, so that this test shows the hole on the old code too.
    """
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    forger = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        try:
            forger.connect(name)
        except OSError as exc:
            if exc.errno not in (errno.EPROTOTYPE, errno.ECONNREFUSED):
                raise
            forger.close()
            forger = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            forger.sendmsg([payload], rights, 0, name)
            return
        try:
            forger.sendmsg([payload], rights)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before we wrote: fine, nothing was delivered
        # Keep our end open a moment: a refusal must not depend on us hanging up first.
        time.sleep(0.5)
    finally:
        forger.close()


def test_a_forged_handoff_gets_no_login_and_no_message(server_factory):
    srv = server_factory("--workers", "2")
    victim = user_on(1, "victim")
    _stored_for(srv, victim, "m-handoff")

    # What a worker sends its sibling after checking a LOGIN: the socket and the user id.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    user = victim.encode()
    payload = struct.pack(">2sB", b"H1", len(user)) + user
    _forge_handoff(socket_name(str(srv.data_dir), "handoff", 1), payload, theirs.fileno())
    theirs.close()
    # Refused: the worker closes the socket unread, so ours sees EOF and not one byte.
    got = _received_within(ours, 5.0)
    ours.close()
    assert got == b"", f"a forged hand-off got an answer: {N.Decoder(1 << 24).feed(got)}"

    assert _wait_metric(srv, REFUSED_METRIC, 1) >= 1
    assert "refused a hand-off from pid" in srv.full_log()
    # Nothing was lost: the real victim still gets the message.
    v = RawClient(srv.addr)
    v.login(victim)
    assert v.expect(N.DELIVER)[4:] == ("m-handoff", b"for the victim only")


def test_forged_route_send_frames_are_not_delivered(server_factory):
    srv = server_factory("--workers", "2")
    victim = user_on(1, "victim")
    v = RawClient(srv.addr)
    v.login(victim)

    # What worker 0 writes on its link to worker 1: HELLO, then a SEND from a forged sender.
    forged = N.encode_batch(
        [
            (N.LINK_HELLO, 0, os.getpid(), 1),
            (N.ROUTE_SEND, int(time.time() * 1000), 0, "ceo", "forged-1", victim, b"wire $1M"),
        ],
        1 << 24,
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as link:
        link.connect(socket_name(str(srv.data_dir), "link", 1))
        try:
            link.sendall(forged)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before we finished writing: fine
        assert _received_within(link, 3.0) == b""

    assert v.next(timeout=2.0) is None, "a forged ROUTE_SEND was delivered"
    assert _wait_metric(srv, REFUSED_METRIC, 1) >= 1
    assert "refused a worker link from pid" in srv.full_log()
    # The node's own links still work: a real message crosses from worker 0 to worker 1.
    sender = RawClient(srv.addr)
    sender.login(user_on(0, "real"))
    sender.send((N.SEND, "real-1", victim, b"hello"))
    d = v.expect(N.DELIVER)
    assert d[4:] == ("real-1", b"hello")


def test_peer_auth_admits_siblings_only():
    """The rule itself: a child of our parent passes; another uid or process does not."""
    from iris_fast.server.links import PeerAuth, parent_of

    auth = PeerAuth()
    me = os.getpid()
    assert parent_of(me) == os.getppid()
    assert auth.problem(me, os.geteuid()) is None  # we are a child of our parent
    assert "uid" in (auth.problem(me, os.geteuid() + 1) or "")
    assert "not a worker of this node" in (auth.problem(os.getppid(), os.geteuid()) or "")
    assert auth.problem(0, os.geteuid()) is not None
    auth.refuse("a test", 1, 2, "because")
    assert auth.refused == 1
