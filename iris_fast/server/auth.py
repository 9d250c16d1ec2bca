"""Login tokens: JWTs (PyJWT) whose ``sub`` is the user id (docs/security.md, Authentication).

A server verifies tokens against one or more keys, all valid at once (key rotation):

* HS256 shared secrets: ``--auth-secret SECRET`` or ``--auth-secret KID=SECRET``;
* RS256 / ES256 public keys: ``--auth-public-key FILE`` or ``--auth-public-key KID=FILE`` (PEM
  public key or certificate; RSA keys take RS256, EC P-256 keys ES256, P-384 ES384, P-521 ES512).

Each key accepts exactly one algorithm, fixed by what the key *is*, never by the token: ``none``
is never accepted, and an HS256 token "signed" with a public key (the RS/HS confusion attack) is
refused because no public key takes HS256. A token whose ``kid`` header names a configured key is
checked against that key only; otherwise against every key of the token's algorithm.

Claims: ``exp`` required and strict; ``nbf`` and ``iat`` (if present) may be up to the leeway
ahead of this server's clock; ``iss`` / ``aud`` must match when the server is configured with
them; ``sub`` must be the user of the LOGIN. Keys are loaded once (``Authenticator``), not per
login.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt

if TYPE_CHECKING:
    from iris_fast.config import ServerConfig

ALGORITHMS = ["HS256"]  # of --auth-secret keys; public keys: see algorithm_for
# RFC 7518 §3.2: an HS256 key must be at least as long as the hash output (256 bits). A shorter
# one can be brute-forced offline from a single captured token.
MIN_SECRET_BYTES = 32
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
MIN_RSA_BITS = 2048
KID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class AuthError(Exception):
    """The token does not let this user in; the message says why (sent to the client)."""


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """One key a token may be signed with: its id (or None), its only algorithm, the key."""

    kid: str | None
    alg: str
    key: Any  # str (HS256 secret) or a cryptography public key
    name: str  # for error messages: "--auth-secret #1", the PEM path


def split_kid(spec: str) -> tuple[str | None, str]:
    """``KID=VALUE`` -> (KID, VALUE); anything else -> (None, spec).

    KID is 1..64 of ``[A-Za-z0-9._-]``. A value that is only ``=`` padding (``abc==``, a base64
    secret) is not split; a leading ``=`` (``=a=b``) gives the value after it without a kid.
    """
    head, sep, rest = spec.partition("=")
    if not sep:
        return None, spec
    if not head:
        return None, rest
    if KID.fullmatch(head) and rest.strip("="):
        return head, rest
    return None, spec


def check_secret(secret: str, name: str) -> None:
    """Refuse an HS256 secret shorter than ``MIN_SECRET_BYTES`` (ValueError naming ``name``)."""
    size = len(secret.encode())
    if size < MIN_SECRET_BYTES:
        raise ValueError(
            f"{name} is {size} bytes; an HS256 secret must be at least {MIN_SECRET_BYTES} bytes "
            "(RFC 7518 section 3.2): use a random one, e.g. `openssl rand -base64 32`"
        )


def algorithm_for(key: Any) -> str:
    """The one JWS algorithm a (public or private) RSA/EC key signs with; ValueError otherwise."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {key.key_size} bits: at least {MIN_RSA_BITS} needed")
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        alg = EC_ALGORITHMS.get(key.curve.name)
        if alg is None:
            raise ValueError(f"EC curve {key.curve.name} not supported (P-256, P-384, P-521)")
        return alg
    raise ValueError(f"{type(key).__name__}: only RSA and EC keys are supported")


def load_public_key(path: str) -> tuple[str, Any]:
    """(algorithm, key) of a PEM public key or X.509 certificate; ValueError with the reason."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"--auth-public-key {path}: {exc.strerror or exc}") from None
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
        return algorithm_for(key), key
    except ValueError as exc:
        raise ValueError(
            f"--auth-public-key {path}: not a usable PEM public key or certificate: {exc}"
        ) from None


def load_private_key(path: str | os.PathLike) -> Any:
    """A PEM private key (unencrypted) for minting RS256/ES256 tokens."""
    from cryptography.hazmat.primitives import serialization

    try:
        with open(path, "rb") as f:
            return serialization.load_pem_private_key(f.read(), password=None)
    except OSError as exc:
        raise ValueError(f"--private-key {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--private-key {path}: not a usable PEM private key: {exc}") from None


def _show(value: Any) -> str:
    """A token-supplied value in an error message, bounded in length."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(claims: dict, name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError(f"invalid token: {name} must be a number (seconds since the epoch)")
    return float(value)


class Authenticator:
    """The keys and claim rules of one server; ``verify`` checks a LOGIN token."""

    def __init__(
        self,
        keys: list[VerifyKey],
        issuer: str | None = None,
        audience: str | None = None,
        leeway_s: float = 30.0,
    ) -> None:
        if not keys:
            raise ValueError("no authentication key given")
        self.keys = keys
        self.by_kid: dict[str, VerifyKey] = {}
        for k in keys:
            if k.kid is None:
                continue
            if k.kid in self.by_kid:
                first = self.by_kid[k.kid].name
                raise ValueError(f"key id {k.kid!r} given twice ({first}, {k.name})")
            self.by_kid[k.kid] = k
        self.algorithms = sorted({k.alg for k in keys})
        self.issuer = issuer or None
        self.audience = audience or None
        if leeway_s < 0:
            raise ValueError("--auth-leeway must not be negative")
        self.leeway_s = leeway_s

    @classmethod
    def from_secrets(cls, secrets: str | list[str], **kw: Any) -> Authenticator:
        if isinstance(secrets, str):
            secrets = [secrets]
        keys = []
        for i, spec in enumerate(secrets, 1):
            kid, secret = split_kid(spec)
            if not secret:
                raise ValueError(f"--auth-secret #{i} is empty")
            check_secret(secret, f"--auth-secret #{i}")
            keys.append(VerifyKey(kid, "HS256", secret, f"--auth-secret #{i}"))
        return cls(keys, **kw)

    @classmethod
    def from_config(cls, config: ServerConfig) -> Authenticator | None:
        """The server's authenticator, or None in open mode (no key configured).

        Raises ValueError for a key that cannot be used (unreadable PEM, weak RSA key, ...).
        """
        secrets = config.auth_secret or []
        if isinstance(secrets, str):
            secrets = [secrets]
        paths = config.auth_public_key or []
        if isinstance(paths, str):
            paths = [paths]
        if not secrets and not paths:
            return None
        kw = {
            "issuer": config.auth_issuer,
            "audience": config.auth_audience,
            "leeway_s": config.auth_leeway_s,
        }
        keys = cls.from_secrets(secrets, **kw).keys if secrets else []
        for spec in paths:
            kid, path = (None, spec) if os.path.isfile(spec) else split_kid(spec)
            alg, key = load_public_key(path)
            keys.append(VerifyKey(kid, alg, key, path))
        return cls(keys, **kw)

    def verify(self, token: str, user: str, now: float | None = None) -> dict:
        """The token's claims if it lets ``user`` in; AuthError with the reason otherwise."""
        if not token:
            raise AuthError("a token is required: this server runs with authentication")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise AuthError(
                f"invalid token: algorithm {_show(alg)} is not accepted "
                f"(this server accepts {', '.join(self.algorithms)})"
            )
        kid = header.get("kid")
        named = self.by_kid.get(kid) if isinstance(kid, str) else None
        if named is not None:
            if named.alg != alg:
                raise AuthError(f"invalid token: key {kid!r} takes {named.alg}, not {alg}")
            candidates = [named]
        else:
            candidates = [k for k in self.keys if k.alg == alg]
        for key in candidates:
            try:
                # PyJWT checks the signature before any claim: an error below this line means
                # the token is genuine, so it is final (no point trying the other keys).
                claims = jwt.decode(
                    token,
                    key.key,
                    algorithms=[key.alg],
                    issuer=self.issuer,
                    audience=self.audience,
                    options={
                        "require": ["sub", "exp"],
                        # Checked below: exp strictly, nbf/iat with the leeway.
                        "verify_exp": False,
                        "verify_nbf": False,
                        "verify_iat": False,
                    },
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.MissingRequiredClaimError as exc:
                raise AuthError(f"invalid token: no {exc.claim!r} claim") from None
            except jwt.InvalidIssuerError:
                raise AuthError("invalid token: wrong issuer (iss)") from None
            except jwt.InvalidAudienceError:
                if self.audience is None:
                    raise AuthError(
                        "invalid token: it names an audience (aud) and this server has none"
                    ) from None
                raise AuthError("invalid token: wrong audience (aud)") from None
            except jwt.InvalidTokenError as exc:
                raise AuthError(f"invalid token: {exc}") from None
            break
        else:
            raise AuthError("invalid token: signature verification failed")
        self._check_times(claims, time.time() if now is None else now)
        if claims.get("sub") != user:
            raise AuthError("token was issued for another user")
        return claims

    def _check_times(self, claims: dict, now: float) -> None:
        exp = _number(claims, "exp")
        if exp is None or exp <= now:
            raise AuthError("token expired")
        for name in ("nbf", "iat"):
            t = _number(claims, name)
            if t is not None and t > now + self.leeway_s:
                raise AuthError(
                    f"token not yet valid: {name} is {t - now:.0f} s ahead of this server's "
                    f"clock (allowed skew {self.leeway_s:g} s)"
                )


def verify_token(token: str, user: str, keys: str | list[str] | Authenticator) -> dict:
    """Check ``token`` for ``user`` against HS256 secret(s) or an Authenticator; the claims."""
    auth = keys if isinstance(keys, Authenticator) else Authenticator.from_secrets(keys)
    return auth.verify(token, user)


def mint_token(
    user: str,
    secret: str | None = None,
    ttl_s: float = 3600.0,
    *,
    private_key: Any = None,
    kid: str | None = None,
    issuer: str | None = None,
    audience: str | None = None,
    nbf_in: float | None = None,
) -> str:
    """A token for ``user`` valid for ``ttl_s`` seconds (tests, operators).

    HS256 with ``secret``, or RS256/ES256 (by key type) with ``private_key``: a PEM file path or
    a cryptography private key object.
    """
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user, "iat": now, "exp": now + int(ttl_s)}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    if nbf_in is not None:
        claims["nbf"] = now + int(nbf_in)
    headers = {"kid": kid} if kid else None
    if private_key is not None:
        if isinstance(private_key, str | os.PathLike):
            private_key = load_private_key(private_key)
        return jwt.encode(claims, private_key, algorithm_for(private_key), headers=headers)
    if not secret:
        raise ValueError("a secret (HS256) or a private key (RS256/ES256) is needed")
    check_secret(secret, "the secret")  # no server would accept what it signs
    return jwt.encode(claims, secret, "HS256", headers=headers)
