"""The ``iris-fast`` command line: ``serve`` a node, mint a ``token``."""

from __future__ import annotations

import argparse
import logging
import sys

from iris_fast import __version__
from iris_fast.config import ServerConfig
from iris_fast.loadgen import cli as load_cli


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    d = ServerConfig()
    p = sub.add_parser(
        "serve", help="run a node", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--host", default=d.host, help="client listener address")
    p.add_argument("--port", type=int, default=d.port, help="client listener port")
    p.add_argument("--http-host", default=d.http_host, help="address of /health and /metrics")
    p.add_argument(
        "--http-port", type=int, default=d.http_port, help="port of /health and /metrics"
    )
    p.add_argument("--data-dir", default=d.data_dir, help="directory of the LMDB mailbox")
    p.add_argument("--node-id", default=d.node_id, help="this node's name (default: hostname)")
    p.add_argument(
        "--auth-secret",
        default=None,
        help="HS256 secret; clients must log in with a JWT whose sub is their user id",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow open login (no --auth-secret) on a non-loopback address",
    )
    p.add_argument(
        "--max-frame", type=int, default=d.max_frame, help="largest frame accepted, bytes"
    )
    p.add_argument(
        "--max-inflight",
        type=int,
        default=d.max_inflight,
        help="unacknowledged deliveries per connection",
    )
    p.add_argument(
        "--mailbox-limit",
        type=int,
        default=d.mailbox_limit,
        help="stored messages per user before SEND gets MAILBOX_FULL",
    )
    p.add_argument(
        "--max-errors",
        type=int,
        default=d.max_errors,
        help="protocol errors before a connection is closed",
    )
    p.add_argument(
        "--login-timeout",
        type=float,
        default=d.login_timeout,
        help="seconds a connection may stay without LOGIN",
    )
    p.add_argument(
        "--hibernate-after",
        type=float,
        default=d.hibernate_after,
        help="idle seconds before a connection releases its buffers",
    )
    p.add_argument(
        "--dedup-entries",
        type=int,
        default=d.dedup_entries,
        help="(sender, msg_id) pairs kept in the dedup window",
    )
    p.add_argument(
        "--dedup-age",
        type=float,
        default=d.dedup_age_s,
        dest="dedup_age_s",
        help="seconds a (sender, msg_id) pair stays in the dedup window",
    )
    p.add_argument(
        "--lmdb-map-size",
        type=int,
        default=d.lmdb_map_size,
        help="LMDB map size in bytes (the mailbox's maximum size)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=d.workers,
        help="worker processes (each binds the port with SO_REUSEPORT; may exceed the cores: "
        "each holds at most RLIMIT_NOFILE connections)",
    )
    p.add_argument("--log-level", default="INFO")


def _token_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("token", help="mint an HS256 login token for a user")
    p.add_argument("--secret", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``iris-fast`` console script."""
    parser = argparse.ArgumentParser(prog="iris-fast", description="iris-fast messaging server")
    parser.add_argument("--version", action="version", version=f"iris-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _token_parser(sub)
    load_cli.add_parser(sub)
    args = parser.parse_args(argv)

    if args.command == "load":
        return load_cli.run(args)

    if args.command == "token":
        from iris_fast.server.auth import mint_token

        print(mint_token(args.user, args.secret, args.ttl))
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
