"""Every class of bad input gets a clear ERROR; nobody else's connection or data is touched.

Each test also runs a well-behaved pair of users on the same server (the same worker) across the
attack and checks that their message still arrives exactly once.
"""

from __future__ import annotations

import struct
import time

import iris_native as N
import pytest
from rawclient import RawClient

from iris_fast.server.auth import mint_token

pytestmark = pytest.mark.timeout(60)


def frame(ftype: int, payload: bytes) -> bytes:
    return struct.pack(">IB", 1 + len(payload), ftype) + payload


def str8(s: bytes) -> bytes:
    return bytes((len(s),)) + s


class Bystanders:
    """A logged-in sender and receiver that must be unaffected by the attack."""

    def __init__(self, server) -> None:
        self.rcv = RawClient(server.addr)
        self.rcv.login("bystander-r")
        self.snd = RawClient(server.addr)
        self.snd.login("bystander-s")

    def check(self, tag: str) -> None:
        self.snd.send((N.SEND, tag, "bystander-r", tag.encode()))
        d = self.rcv.expect(N.DELIVER)
        assert d[4:] == (tag, tag.encode())
        self.rcv.send((N.DELIVER_ACK, d[1]))
        assert self.snd.expect(N.ACK)[1] == tag


@pytest.fixture
def bystanders(server):
    b = Bystanders(server)
    b.check("before")
    yield b
    b.check("after")


def attacker(server, login: bool = True) -> RawClient:
    c = RawClient(server.addr)
    if login:
        c.login("mallory")
    return c


def test_oversized_frame_gets_error_and_close(server, bystanders):
    c = attacker(server)
    c.send_raw(frame(N.SEND, b"\x01m\x01b" + b"x" * 70_000))
    err = c.expect(N.ERROR)
    assert err[1] == 2 and "exceeds" in err[3]
    assert c.wait_closed()


def test_two_gib_length_prefix_is_refused_without_waiting_for_the_body(server, bystanders):
    c = attacker(server)
    c.send_raw(struct.pack(">I", 0x8000_0000) + b"\x03")
    err = c.expect(N.ERROR, timeout=2)
    assert err[1] == 2
    assert c.wait_closed()
    assert server.metrics()['iris_frames_rejected_total{reason="frame_too_large"}'] >= 1


def test_unknown_type_gets_error_and_connection_stays(server, bystanders):
    c = attacker(server)
    c.send_raw(frame(0x7F, b"whatever"))
    assert c.expect(N.ERROR)[1] == 3
    c.send((N.PING, 42))
    assert c.expect(N.PONG) == (N.PONG, 42)


def test_server_to_client_type_from_a_client_is_unknown(server, bystanders):
    c = attacker(server)
    c.send((N.DELIVER, 1, 0, "x", "y", b"forged"))
    assert c.expect(N.ERROR)[1] == 3


def test_truncated_field_is_bad_frame(server, bystanders):
    c = attacker(server)
    # msg_id claims 200 bytes, the frame holds 3.
    c.send_raw(frame(N.SEND, b"\xc8abc"))
    err = c.expect(N.ERROR)
    assert err[1] == 1
    c.send((N.PING, 1))
    assert c.expect(N.PONG)


def test_zero_length_frame_is_bad_frame(server, bystanders):
    c = attacker(server)
    c.send_raw(b"\x00\x00\x00\x00")
    assert c.expect(N.ERROR)[1] == 1


@pytest.mark.parametrize("field", ["user", "token"])
def test_invalid_utf8_in_login_is_rejected(server, bystanders, field):
    c = attacker(server, login=False)
    user = b"\xff\xfe" if field == "user" else b"ok"
    token = b"\xc3\x28" if field == "token" else b""
    c.send_raw(frame(N.LOGIN, b"\x01" + str8(user) + struct.pack(">H", len(token)) + token))
    assert c.expect(N.ERROR)[1] == 4


def test_invalid_utf8_in_msg_id_is_rejected(server, bystanders):
    c = attacker(server)
    c.send_raw(frame(N.SEND, str8(b"\x80\x80") + str8(b"bystander-r") + b"body"))
    assert c.expect(N.ERROR)[1] == 4


def test_send_before_login(server, bystanders):
    c = attacker(server, login=False)
    c.send((N.SEND, "m", "bystander-r", b"sneaky"))
    assert c.expect(N.ERROR)[1] == 5


def test_unsupported_version_closes(server, bystanders):
    c = attacker(server, login=False)
    c.send((N.LOGIN, 9, "mallory", ""))
    err = c.expect(N.ERROR)
    assert err[1] == 7 and "version" in err[3]
    assert c.wait_closed()


def test_bad_user_id_and_recipient(server, bystanders):
    c = attacker(server, login=False)
    c.send((N.LOGIN, 1, "nul\x00user", ""))
    assert c.expect(N.ERROR)[1] == 6
    assert c.wait_closed()
    c = attacker(server)
    c.send((N.SEND, "m", "", b"nobody"))
    err = c.expect(N.ERROR)
    assert err[1] == 12 and err[2] == "m"


def test_deliver_ack_for_a_tag_never_sent(server, bystanders):
    c = attacker(server)
    c.send((N.DELIVER_ACK, 999))
    assert c.expect(N.ERROR)[1] == 15


def test_second_login_on_one_connection(server, bystanders):
    c = attacker(server)
    c.send((N.LOGIN, 1, "someone-else", ""))
    assert c.expect(N.ERROR)[1] == 8


def test_garbage_flood_closes_only_that_connection(server, bystanders):
    c = attacker(server)
    # Valid framing, junk types: each is an error; past --max-errors the connection is closed.
    c.send_raw(b"".join(frame(0x40 + (i % 50), b"junk") for i in range(100)))
    errors = [f for f in c.drain(1.0) if f[0] == N.ERROR]
    assert errors[-1][1] == 10
    assert c.wait_closed()


def test_random_bytes_close_the_connection(server, bystanders):
    c = attacker(server, login=False)
    c.send_raw(bytes(range(256)) * 4)
    assert c.wait_closed()


def test_truncated_frame_at_eof_is_counted(server, bystanders):
    c = attacker(server)
    c.send_raw(frame(N.SEND, b"\x01m\x0bbystander-r" + b"x" * 100)[:50])
    c.sock.shutdown(1)
    c.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if server.metrics().get('iris_frames_rejected_total{reason="truncated"}', 0) >= 1:
            break
        time.sleep(0.05)
    assert server.metrics()['iris_frames_rejected_total{reason="truncated"}'] >= 1


def test_login_timeout(server_factory):
    srv = server_factory("--login-timeout", "0.5")
    c = RawClient(srv.addr)
    err = c.expect(N.ERROR, timeout=5)
    assert err[1] == 14
    assert c.wait_closed()


# ---- JWT ----------------------------------------------------------------------------------------

SECRET = "test-secret-with-enough-entropy-0123456789"


@pytest.fixture
def auth_server(server_factory):
    return server_factory("--auth-secret", SECRET)


def test_jwt_accepted(auth_server):
    c = RawClient(auth_server.addr)
    ok = c.login("jwt-user", mint_token("jwt-user", SECRET))
    assert ok[3] == "test-node"


@pytest.mark.parametrize(
    "token,reason",
    [
        ("", "required"),
        ("not-a-jwt", "invalid"),
        (mint_token("jwt-user", "wrong-secret-wrong-secret-wrong-secret"), "invalid"),
        (mint_token("jwt-user", SECRET, ttl_s=-10), "expired"),
        (mint_token("somebody-else", SECRET), "another user"),
    ],
    ids=["missing", "garbage", "forged", "expired", "other-user"],
)
def test_jwt_rejected(auth_server, token, reason):
    c = RawClient(auth_server.addr)
    c.send((N.LOGIN, 1, "jwt-user", token))
    err = c.expect(N.ERROR)
    assert err[1] == 6 and reason in err[3]
    assert c.wait_closed()
    assert auth_server.metrics()["iris_auth_failures_total"] >= 1


def test_refuses_open_login_on_a_public_address(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "iris_fast",
            "serve",
            "--host",
            "0.0.0.0",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert r.returncode == 2
    assert "--auth-secret" in r.stderr
