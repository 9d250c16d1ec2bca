"""The ``iris-fast`` command line: ``serve``, ``status``, ``load``, ``token``."""

from __future__ import annotations

import argparse
import logging
import sys

from iris_fast import __version__
from iris_fast.config import ServerConfig
from iris_fast.loadgen import cli as load_cli
from iris_fast.ops import status as status_cli

# Every ``serve`` option sets the ServerConfig field of the same name (FIELD_OF for the few whose
# field name carries a unit); defaults come from ServerConfig.
SERVE_OPTIONS: list[tuple[str, type, str]] = [
    ("--host", str, "client listener address"),
    ("--port", int, "client listener port"),
    ("--http-host", str, "address of /health and /metrics"),
    ("--http-port", int, "port of /health and /metrics"),
    ("--data-dir", str, "directory of the LMDB mailbox"),
    ("--node-id", str, "this node's name"),
    ("--auth-secret", list, "HS256 secret (SECRET or KID=SECRET; repeat for key rotation): "
     "clients log in with a JWT whose sub is their user id"),
    ("--auth-public-key", list, "PEM public key or certificate, RS256 (RSA) or ES256 (EC P-256) "
     "by key type (FILE or KID=FILE; repeatable)"),
    ("--auth-issuer", str, "tokens must carry this iss"),
    ("--auth-audience", str, "tokens must carry this aud"),
    ("--auth-leeway", float, "clock skew allowed on a token's nbf / iat, seconds"),
    ("--login-rate", float, "LOGINs per second per source address, per worker (0: off)"),
    ("--login-burst", int, "LOGIN bucket size per source address"),
    ("--login-fail-rate", float, "failed LOGINs per second per source address, per worker "
     "(0: off)"),
    ("--login-fail-burst", int, "failed-LOGIN bucket size per source address"),
    ("--workers", int, "worker processes (each binds the port with SO_REUSEPORT; may exceed the "
     "cores: each holds at most RLIMIT_NOFILE connections)"),
    ("--max-frame", int, "largest frame accepted, bytes"),
    ("--max-inflight", int, "unacknowledged deliveries per connection"),
    ("--live-ack-timeout", float, "seconds a live delivery may wait for the device's "
     "DELIVER_ACK before it is stored and its sender ACKed STORED"),
    ("--mailbox-limit", int, "stored messages per user before SEND gets MAILBOX_FULL"),
    ("--max-errors", int, "protocol errors before a connection is closed"),
    ("--login-timeout", float, "seconds a connection may stay without LOGIN"),
    ("--hibernate-after", float, "idle seconds before a connection releases its buffers"),
    ("--keepalive", float, "TCP keepalive idle seconds; dead peers go after 1.5x that (0: off)"),
    ("--dedup-entries", int, "(sender, msg_id) pairs kept in each worker's dedup window"),
    ("--dedup-age", float, "seconds a (sender, msg_id) pair stays in the dedup window"),
    ("--lmdb-map-size", int, "initial LMDB map size in bytes (it doubles when full)"),
    ("--rate-msgs", float, "SENDs per second per user (token bucket; 0: no limit)"),
    ("--rate-msgs-burst", int, "burst of --rate-msgs"),
    ("--rate-bytes", float, "SEND body bytes per second per user (0: no limit)"),
    ("--rate-bytes-burst", int, "burst of --rate-bytes"),
    ("--conn-rate-msgs", float, "SENDs per second per connection (0: no limit)"),
    ("--conn-rate-msgs-burst", int, "burst of --conn-rate-msgs"),
    ("--conn-rate-bytes", float, "SEND body bytes per second per connection (0: no limit)"),
    ("--conn-rate-bytes-burst", int, "burst of --conn-rate-bytes"),
    ("--max-conns-per-ip", int, "connections from one source address (per node, split "
     "evenly over the workers)"),
    ("--mailbox-max-bytes", int, "stored body bytes per user before SEND gets MAILBOX_FULL"),
    ("--max-pending-writes", int, "bytes waiting to be written to clients, per worker, before "
     "the worker stops reading from clients"),
    ("--link-max-bytes", int, "bytes of SENDs forwarded to one other worker and not yet "
     "answered before their senders stop being read (until half of it is answered)"),
    ("--mailbox-per-sender-limit", int, "stored messages from one sender per recipient before "
     "SEND gets MAILBOX_FULL (0: no limit)"),
    ("--mailbox-per-sender-max-bytes", int, "stored body bytes from one sender per recipient "
     "before SEND gets MAILBOX_FULL (0: no limit)"),
    ("--mailbox-cache", int, "mailboxes of users without a session kept in memory per worker "
     "(least recently used go first; rebuilt from storage when needed)"),
    ("--message-ttl", float, "seconds a stored message is kept undelivered before it is deleted "
     "(0: never)"),
    ("--device-ttl", float, "seconds a device id may stay unseen before it is forgotten and "
     "no longer keeps its user's stored messages (negative: --message-ttl; 0: never)"),
    ("--max-conn-pending-writes", int, "bytes waiting to be written to one client before it is "
     "cut (raised to at least the 1 MiB delivery window + 2 x --max-frame)"),
    ("--socket-sndbuf", int, "kernel send buffer per client socket, bytes (0: autotuned); "
     "caps kernel memory per slow reader"),
    ("--tls-cert", str, "PEM certificate chain: clients connect with TLS"),
    ("--tls-key", str, "PEM private key of --tls-cert"),
    ("--repl-host", str, "address the replication listener binds"),
    ("--repl-port", int, "replication listener port (0: none)"),
    ("--peer", str, "HOST:PORT of the peer node's replication listener (pair replication)"),
    ("--peer-node-id", str, "the peer's --node-id; links from any other node are refused "
     "(default: the first peer this data directory paired with)"),
    ("--heartbeat", float, "seconds between replication heartbeats"),
    ("--peer-timeout", float, "seconds of silence after which the peer counts as down"),
]  # fmt: skip
FIELD_OF = {
    "--dedup-age": "dedup_age_s",
    "--auth-leeway": "auth_leeway_s",
    "--keepalive": "keepalive_s",
    "--heartbeat": "heartbeat_s",
    "--peer-timeout": "peer_timeout_s",
    "--message-ttl": "message_ttl_s",
    "--device-ttl": "device_ttl_s",
    "--live-ack-timeout": "live_ack_timeout_s",
}


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    d = ServerConfig()
    p = sub.add_parser(
        "serve", help="run a node", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    for flag, kind, doc in SERVE_OPTIONS:
        field = FIELD_OF.get(flag, flag[2:].replace("-", "_"))
        # kind list: a repeatable option, collected into a list.
        how = {"action": "append"} if kind is list else {"type": kind}
        p.add_argument(flag, **how, default=getattr(d, field), dest=field, help=doc)
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow open login (no --auth-secret / --auth-public-key) on a non-loopback address",
    )
    p.add_argument("--log-level", default="INFO")


def _token_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("token", help="mint a login token (JWT) for a user")
    key = p.add_mutually_exclusive_group(required=True)
    key.add_argument("--secret", help="HS256 shared secret (one of the server's --auth-secret)")
    key.add_argument(
        "--private-key", help="PEM private key: RS256 (RSA) or ES256 (EC P-256) by key type"
    )
    p.add_argument("--user", required=True)
    p.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires")
    p.add_argument("--kid", help="key id header (the KID of the server's KID=... key)")
    p.add_argument("--iss", help="issuer claim (the server's --auth-issuer)")
    p.add_argument("--aud", help="audience claim (the server's --auth-audience)")
    p.add_argument("--nbf-in", type=float, help="not valid before this many seconds from now")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``iris-fast`` console script."""
    parser = argparse.ArgumentParser(prog="iris-fast", description="iris-fast messaging server")
    parser.add_argument("--version", action="version", version=f"iris-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _token_parser(sub)
    load_cli.add_parser(sub)
    status_cli.add_parser(sub)
    args = parser.parse_args(argv)

    if args.command == "status":
        return status_cli.run(args)

    if args.command == "load":
        return load_cli.run(args)

    if args.command == "token":
        from iris_fast.server.auth import mint_token

        try:
            token = mint_token(
                args.user,
                args.secret,
                args.ttl,
                private_key=args.private_key,
                kid=args.kid,
                issuer=args.iss,
                audience=args.aud,
                nbf_in=args.nbf_in,
            )
        except ValueError as exc:
            print(f"iris-fast: {exc}", file=sys.stderr)
            return 2
        print(token)
        return 0

    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    fields = {k: v for k, v in vars(args).items() if k not in ("command", "log_level")}
    config = ServerConfig(**fields)
    from iris_fast.server.supervisor import serve

    try:
        return serve(config)
    except ValueError as exc:
        print(f"iris-fast: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
