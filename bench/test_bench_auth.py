"""Login cost: verifying one JWT per LOGIN, by algorithm (pytest-benchmark; no assertions on
time). This is the CPU a worker spends per login on top of the connection itself."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from iris_fast.server.auth import Authenticator, VerifyKey, mint_token


def _pem(key) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize("alg", ["HS256", "RS256", "ES256"])
def test_verify_login_token(benchmark, alg: str) -> None:
    if alg == "HS256":
        secret = "s" * 32
        auth = Authenticator([VerifyKey(None, "HS256", secret, "secret")])
        token = mint_token("alice", secret)
    else:
        priv = (rsa.generate_private_key(65537, 2048) if alg == "RS256"
                else ec.generate_private_key(ec.SECP256R1()))  # fmt: skip
        pub = serialization.load_pem_public_key(_pem(priv))
        auth = Authenticator([VerifyKey(None, alg, pub, "key")])
        token = mint_token("alice", private_key=priv)
    claims = benchmark(auth.verify, token, "alice")
    assert claims["sub"] == "alice"
    benchmark.extra_info["us_per_login"] = round(benchmark.stats.stats.mean * 1e6, 1)
