"""Authentication against hostile clients: JWT checks, key rotation, LOGIN rate limits.

Keys are generated here with ``cryptography``; servers are real ``iris-fast serve`` processes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time
from pathlib import Path

import iris_native as N
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from rawclient import RawClient

from iris_fast.config import ServerConfig
from iris_fast.server.auth import Authenticator, AuthError, mint_token, split_kid
from iris_fast.server.ratelimit import LoginLimiter, source_of

pytestmark = pytest.mark.timeout(120)

ISS = "iris-test"
AUD = "iris-clients"
SECRET_1 = "first-secret-with-enough-entropy-0123456789"
SECRET_2 = "second-secret-with-enough-entropy-987654321"


def write_public_pem(path: Path, key) -> Path:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


class Keys:
    """Private keys and the PEM files of their public halves."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.rsa_a = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rsa_b = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rsa_a_pub = self.public_pem("rsa-a", self.rsa_a)
        self.rsa_b_pub = self.public_pem("rsa-b", self.rsa_b)
        self.ec_pub = self.public_pem("ec", self.ec)

    def public_pem(self, name: str, key) -> Path:
        return write_public_pem(self.dir / f"{name}.pub.pem", key)

    def private_pem(self, name: str, key) -> Path:
        path = self.dir / f"{name}.key.pem"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def pk_server(keys, tmp_path_factory):
    """Public keys only: RSA "rsa-a" (with a kid), RSA b and EC P-256 (without); iss and aud."""
    from conftest import ServerProcess

    data = tmp_path_factory.mktemp("pk-node") / "data"
    data.mkdir()
    srv = ServerProcess(
        data,
        "pk-node",
        "--workers", "2",
        "--auth-public-key", f"rsa-a={keys.rsa_a_pub}",
        "--auth-public-key", str(keys.rsa_b_pub),
        "--auth-public-key", str(keys.ec_pub),
        "--auth-issuer", ISS,
        "--auth-audience", AUD,
    )  # fmt: skip
    srv.start()
    yield srv
    srv.stop()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(user: str = "alice", ttl: int = 600, **extra) -> dict:
    now = int(time.time())
    out = {"sub": user, "iat": now, "exp": now + ttl, "iss": ISS, "aud": AUD}
    out.update(extra)
    return {k: v for k, v in out.items() if v is not None}


def sign(key, payload: dict, kid: str | None = None) -> str:
    alg = "ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256"
    if isinstance(key, str):
        alg = "HS256"
    return jwt.encode(payload, key, alg, headers={"kid": kid} if kid else None)


def unsigned(header: dict, payload: dict, signature: bytes = b"") -> str:
    head = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    return head + "." + b64(signature)


def hs256_with_public_key(pem: bytes, payload: dict, kid: str | None = None) -> str:
    """The RS/HS confusion attack: an HS256 token whose HMAC key is the server's public key."""
    header = {"alg": "HS256", "typ": "JWT"} | ({"kid": kid} if kid else {})
    head = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    mac = hmac.new(pem, head.encode(), hashlib.sha256).digest()
    return head + "." + b64(mac)


def login_ok(server, user: str, token: str, source: str | None = None) -> None:
    c = RawClient(server.addr, source=source)
    try:
        ok = c.login(user, token)
        assert ok[0] == N.LOGIN_OK
    finally:
        c.close()


def login_refused(server, user: str, token: str, source: str | None = None) -> tuple:
    """(code, reason) of the ERROR a LOGIN gets; the connection must be closed after it."""
    c = RawClient(server.addr, source=source)
    try:
        c.send((N.LOGIN, 1, user, token))
        err = c.expect(N.ERROR)
        assert c.wait_closed(), "the server must close the connection after a refused LOGIN"
        return err[1], err[3]
    finally:
        c.close()


# ---- logins that work --------------------------------------------------------------------------


def test_rs256_login_with_and_without_kid(pk_server, keys):
    login_ok(pk_server, "alice", sign(keys.rsa_a, claims("alice"), kid="rsa-a"))
    login_ok(pk_server, "alice", sign(keys.rsa_a, claims("alice")))


def test_es256_login(pk_server, keys):
    login_ok(pk_server, "bob", sign(keys.ec, claims("bob")))
    # A kid no key has: every key of the token's algorithm is tried.
    login_ok(pk_server, "bob", sign(keys.ec, claims("bob"), kid="ec-unknown"))


def test_key_rotation_two_public_keys(pk_server, keys):
    for key, kid in ((keys.rsa_a, "rsa-a"), (keys.rsa_a, None), (keys.rsa_b, None),
                     (keys.rsa_b, "rsa-b-not-configured")):  # fmt: skip
        login_ok(pk_server, "carol", sign(key, claims("carol"), kid=kid))


def test_nbf_within_the_leeway_is_accepted(pk_server, keys):
    login_ok(pk_server, "dave", sign(keys.rsa_b, claims("dave", nbf=int(time.time()) + 10)))


def test_key_rotation_two_secrets(server_factory):
    srv = server_factory("--auth-secret", f"hs1={SECRET_1}", "--auth-secret", SECRET_2)
    login_ok(srv, "erin", mint_token("erin", SECRET_1, kid="hs1"))
    login_ok(srv, "erin", mint_token("erin", SECRET_1))
    login_ok(srv, "erin", mint_token("erin", SECRET_2))
    login_ok(srv, "erin", mint_token("erin", SECRET_2, kid="other"))
    # A kid that names a key is checked against that key only.
    code, reason = login_refused(srv, "erin", mint_token("erin", SECRET_2, kid="hs1"))
    assert code == 6
    assert "signature" in reason


# ---- tokens that must not work -----------------------------------------------------------------


def _bad_tokens(keys: Keys) -> dict[str, tuple[str, str]]:
    """case -> (token for user "alice", expected words in the reason)."""
    now = int(time.time())
    a_pem = keys.rsa_a_pub.read_bytes()
    return {
        "expired": (sign(keys.rsa_a, claims(exp=now - 5), kid="rsa-a"), "expired"),
        "no-exp": (sign(keys.rsa_a, claims(exp=None)), "'exp'"),
        "not-yet-valid": (sign(keys.rsa_a, claims(nbf=now + 300)), "not yet valid"),
        "iat-in-the-future": (sign(keys.ec, claims(iat=now + 3600)), "not yet valid"),
        "wrong-issuer": (sign(keys.rsa_a, claims(iss="someone-else")), "issuer"),
        "no-issuer": (sign(keys.rsa_a, claims(iss=None)), "'iss'"),
        "wrong-audience": (sign(keys.ec, claims(aud="another-service")), "audience"),
        "no-audience": (sign(keys.ec, claims(aud=None)), "'aud'"),
        "forged": (sign(keys.stranger, claims()), "signature"),
        "forged-with-kid": (sign(keys.stranger, claims(), kid="rsa-a"), "signature"),
        "kid-names-another-key": (sign(keys.rsa_b, claims(), kid="rsa-a"), "signature"),
        "alg-none": (unsigned({"alg": "none", "typ": "JWT"}, claims()), "'none' is not accepted"),
        "alg-none-with-kid": (
            unsigned({"alg": "none", "kid": "rsa-a"}, claims()),
            "'none' is not accepted",
        ),
        "hs256-signed-with-public-key": (
            hs256_with_public_key(a_pem, claims(), kid="rsa-a"),
            "'HS256' is not accepted",
        ),
        "hs256-signed-with-public-key-no-kid": (
            hs256_with_public_key(a_pem, claims()),
            "'HS256' is not accepted",
        ),
        "other-user": (sign(keys.rsa_a, claims("mallory")), "another user"),
        "tampered-payload": (_tampered(sign(keys.rsa_a, claims("mallory"))), "signature"),
        "garbage": ("not-a-jwt", "invalid token"),
        "missing": ("", "required"),
    }


def _tampered(token: str) -> str:
    head, _payload, sig = token.split(".")
    return ".".join((head, b64(json.dumps(claims("alice")).encode()), sig))


BAD_CASES = [
    "expired", "no-exp", "not-yet-valid", "iat-in-the-future", "wrong-issuer", "no-issuer",
    "wrong-audience", "no-audience", "forged", "forged-with-kid", "kid-names-another-key",
    "alg-none", "alg-none-with-kid", "hs256-signed-with-public-key",
    "hs256-signed-with-public-key-no-kid", "other-user", "tampered-payload", "garbage", "missing",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_token_gets_auth_failed_and_close(pk_server, keys, case):
    token, words = _bad_tokens(keys)[case]
    code, reason = login_refused(pk_server, "alice", token)
    assert code == 6, (code, reason)
    assert words in reason, reason


def test_failures_are_counted(pk_server, keys):
    before = pk_server.metrics().get("iris_auth_failures_total", 0)
    login_refused(pk_server, "alice", sign(keys.stranger, claims()))
    assert pk_server.metrics()["iris_auth_failures_total"] == before + 1


# ---- iris-fast token ---------------------------------------------------------------------------


def run_token(*args: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "iris_fast", "token", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_token_command_rs256_and_es256(pk_server, keys):
    rsa_key = keys.private_pem("rsa-a", keys.rsa_a)
    token = run_token(
        "--private-key", str(rsa_key), "--user", "frank", "--ttl", "120",
        "--kid", "rsa-a", "--iss", ISS, "--aud", AUD,
    )  # fmt: skip
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256" and header["kid"] == "rsa-a"
    got = jwt.decode(token, keys.rsa_a.public_key(), ["RS256"], audience=AUD, issuer=ISS)
    assert got["sub"] == "frank" and 115 <= got["exp"] - got["iat"] <= 120
    login_ok(pk_server, "frank", token)

    ec_key = keys.private_pem("ec", keys.ec)
    token = run_token("--private-key", str(ec_key), "--user", "frank", "--iss", ISS, "--aud", AUD)
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    login_ok(pk_server, "frank", token)

    later = run_token(
        "--private-key", str(ec_key), "--user", "frank", "--iss", ISS, "--aud", AUD,
        "--nbf-in", "600",
    )  # fmt: skip
    assert jwt.decode(later, options={"verify_signature": False})["nbf"] > time.time() + 500
    code, reason = login_refused(pk_server, "frank", later)
    assert code == 6 and "not yet valid" in reason


def test_token_command_hs256_verifies():
    token = run_token("--secret", SECRET_1, "--user", "gina", "--kid", "hs1")
    auth = Authenticator.from_secrets([f"hs1={SECRET_1}"])
    assert auth.verify(token, "gina")["sub"] == "gina"
    with pytest.raises(AuthError, match="another user"):
        auth.verify(token, "someone-else")


# ---- configuration -----------------------------------------------------------------------------


def test_unusable_public_key_is_refused_at_start(tmp_path):
    bad = tmp_path / "not-a-key.pem"
    bad.write_text("hello")
    r = subprocess.run(
        [sys.executable, "-m", "iris_fast", "serve", "--data-dir", str(tmp_path / "d"),
         "--auth-public-key", str(bad)],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 2
    assert "--auth-public-key" in r.stderr and "not a usable PEM" in r.stderr


def test_public_key_alone_allows_a_public_address(tmp_path, keys):
    config = ServerConfig(
        host="0.0.0.0", data_dir=str(tmp_path), auth_public_key=[str(keys.ec_pub)]
    )
    config.check()  # no ValueError: a key is configured
    config.auth_public_key = None
    with pytest.raises(ValueError, match="--auth-secret or --auth-public-key"):
        config.check()


def test_weak_rsa_key_is_refused(tmp_path):
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = write_public_pem(tmp_path / "weak.pub.pem", weak)
    config = ServerConfig(data_dir=str(tmp_path), auth_public_key=[str(path)])
    with pytest.raises(ValueError, match="1024 bits"):
        config.check()


def test_config_stays_json_serializable(keys):
    import dataclasses

    config = ServerConfig(
        auth_secret=[SECRET_1, f"k2={SECRET_2}"], auth_public_key=[f"a={keys.rsa_a_pub}"]
    )
    again = ServerConfig(**json.loads(json.dumps(dataclasses.asdict(config))))
    assert again.auth_secret == config.auth_secret
    assert Authenticator.from_config(again).by_kid.keys() == {"k2", "a"}
    # The old form: one secret as a plain string.
    assert Authenticator.from_config(ServerConfig(auth_secret=SECRET_1)) is not None


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("plain-secret", (None, "plain-secret")),
        ("k1=secret", ("k1", "secret")),
        ("k1=sec=ret", ("k1", "sec=ret")),
        ("c2VjcmV0cw==", (None, "c2VjcmV0cw==")),  # base64 padding is not a kid separator
        ("=a=b", (None, "a=b")),
        ("not a kid=x", (None, "not a kid=x")),
    ],
)
def test_kid_syntax(spec, expected):
    assert split_kid(spec) == expected


# ---- LOGIN rate limits -------------------------------------------------------------------------


def test_login_flood_is_rate_limited_per_source_address(server_factory):
    srv = server_factory(
        "--workers", "1", "--auth-secret", SECRET_1,
        "--login-fail-rate", "0.05", "--login-fail-burst", "3",
        "--login-rate", "0.05", "--login-burst", "5",
    )  # fmt: skip
    forged = mint_token("henry", "wrong-secret-wrong-secret-wrong-secret")
    codes = [login_refused(srv, "henry", forged)[0] for _ in range(3)]
    assert codes == [6, 6, 6]
    code, reason = login_refused(srv, "henry", forged)
    assert code == 11, reason
    assert reason.startswith("too many login attempts from 127.0.0.1; retry in ")
    assert reason.endswith(" s")
    # Failures used up the bucket of 127.0.0.1: even a valid token waits...
    code, _ = login_refused(srv, "henry", mint_token("henry", SECRET_1))
    assert code == 11
    # ...while another source address logs in.
    login_ok(srv, "henry", mint_token("henry", SECRET_1), source="127.0.0.2")

    m = srv.metrics()
    assert m["iris_login_rate_limited_total"] == 2
    assert m['iris_frames_rejected_total{reason="rate_limited"}'] == 2
    assert m["iris_auth_failures_total"] == 3


def test_valid_logins_are_bounded_too(server_factory):
    srv = server_factory(
        "--workers", "1", "--auth-secret", SECRET_1, "--login-rate", "0.05", "--login-burst", "4"
    )
    token = mint_token("ivy", SECRET_1)
    for _ in range(4):
        login_ok(srv, "ivy", token, source="127.0.0.3")
    code, reason = login_refused(srv, "ivy", token, source="127.0.0.3")
    assert code == 11 and "from 127.0.0.3" in reason
    login_ok(srv, "ivy", token, source="127.0.0.4")


def test_default_limits_let_a_nat_of_valid_logins_through(server):
    for i in range(60):  # well beyond the failure burst: valid logins are not failures
        login_ok(server, f"nat-{i}", "")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_refills_and_reports_the_wait():
    clock = Clock()
    lim = LoginLimiter(0, 0, fail_rate=2.0, fail_burst=2, clock=clock)
    assert lim.allow("a") == 0
    lim.failed("a")
    assert lim.allow("a") == 0
    lim.failed("a")
    assert lim.allow("a") == 0.5  # one token comes back in 0.5 s
    assert lim.allow("b") == 0  # another source is untouched
    clock.now += 0.5
    assert lim.allow("a") == 0


def test_limiter_table_is_bounded():
    clock = Clock()
    lim = LoginLimiter(10.0, 20, 1.0, 5, max_sources=100, clock=clock)
    for i in range(1000):
        lim.allow(f"10.0.{i // 256}.{i % 256}")
        lim.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(lim.table) == 100
    # After idle_after (5 s: the slower bucket refilled), every entry is forgettable.
    clock.now += lim.idle_after
    assert lim.prune() == 100 and not lim.table
    # A new source evicts the idle ones on its way in, too.
    lim.allow("x")
    clock.now += lim.idle_after + 1
    lim.allow("y")
    assert list(lim.table) == ["y"]


def test_source_of_groups_ipv6_by_64():
    class T:
        def __init__(self, peer) -> None:
            self.peer = peer

        def get_extra_info(self, name):
            return self.peer

    assert source_of(T(("192.0.2.7", 5000))) == "192.0.2.7"
    assert source_of(T(("2001:db8:1:2:aaaa::1", 5000, 0, 0))) == "2001:db8:1:2::/64"
    assert source_of(T(("::ffff:192.0.2.7", 5000, 0, 0))) == "192.0.2.7"
    assert source_of(T(None)) == "local"
