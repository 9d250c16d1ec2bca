"""Login tokens: HS256 JWTs (PyJWT) whose ``sub`` is the user id."""

from __future__ import annotations

import time

import jwt

ALGORITHMS = ["HS256"]


class AuthError(Exception):
    """The token does not let this user in; the message says why (sent to the client)."""


def verify_token(token: str, user: str, secret: str) -> dict:
    """Check signature, ``exp`` (required) and that ``sub`` names ``user``; return the claims."""
    if not token:
        raise AuthError("a token is required: this server runs with an auth secret")
    try:
        claims = jwt.decode(
            token, secret, algorithms=ALGORITHMS, options={"require": ["sub", "exp"]}
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token: {exc}") from None
    if claims.get("sub") != user:
        raise AuthError("token was issued for another user")
    return claims


def mint_token(user: str, secret: str, ttl_s: float = 3600.0) -> str:
    """An HS256 token for ``user`` valid for ``ttl_s`` seconds (tests, operators)."""
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + int(ttl_s)}, secret, "HS256")
