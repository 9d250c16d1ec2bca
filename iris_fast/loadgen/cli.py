"""Options of ``iris-fast load`` (``add_parser``) and its entry point (``run``)."""

from __future__ import annotations

import argparse
import sys

from iris_fast.loadgen.plan import MAX_CONNS_PER_SOURCE_IP


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``load`` subcommand on an ``add_subparsers()`` object; return its parser."""
    p = subparsers.add_parser(
        "load",
        help="generate load against a node (loopback only)",
        description=(
            "Open many raw-protocol connections from several processes, log them in, then "
            "either hold them idle or send paced messages between them; report delivery "
            "guarantees (lost, duplicated), latency and, with --server-http, server cost."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="server address (127.0.0.0/8 only)")
    p.add_argument("--port", type=int, default=8085, help="server client port")
    p.add_argument("--connections", type=int, default=1000, help="users, one connection each")
    p.add_argument(
        "--procs", type=int, default=None, help="worker processes (default: <= 15,000 conns each)"
    )
    p.add_argument(
        "--source-ips",
        type=int,
        default=None,
        help=(
            "spread sockets over 127.0.0.1..127.0.0.K (default: <= "
            f"{MAX_CONNS_PER_SOURCE_IP:,} per address, half the server's default limit)"
        ),
    )
    p.add_argument(
        "--connect-rate", type=float, default=5000.0, help="new connections/s per process"
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=120.0,
        help="seconds the connect phase may take before the run goes on without the rest",
    )
    p.add_argument("--idle", action="store_true", help="log in and hold; send nothing")
    p.add_argument("--rate", type=float, default=1000.0, help="total offered messages/s")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of sending or holding")
    p.add_argument("--body-size", type=int, default=64, help="message body bytes (>= 8)")
    p.add_argument(
        "--grace", type=float, default=5.0, help="seconds to wait for ACKs/deliveries after"
    )
    p.add_argument("--json", default=None, metavar="FILE", help="write results as JSON (- stdout)")
    p.add_argument(
        "--server-http",
        default=None,
        metavar="HOST:PORT",
        help="the node's /health and /metrics, for server RSS per connection and CPU per msg",
    )
    p.add_argument(
        "--user-prefix", default=None, help="user ids are PREFIX-i (default: load-<6 hex>)"
    )
    p.add_argument("--token-secret", default=None, help="mint HS256 login tokens with this secret")
    p.add_argument("--tls", action="store_true", help="connect with TLS (system CAs)")
    p.add_argument(
        "--tls-ca", default=None, metavar="PEM", help="connect with TLS, trusting this CA"
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``iris-fast load``; exit status 1 on lost or duplicated messages or no server."""
    # Imported here so that registering the subcommand costs ``iris-fast serve`` nothing.
    from rich.console import Console

    from iris_fast.loadgen import report
    from iris_fast.loadgen.plan import PlanError, make_plan
    from iris_fast.loadgen.runner import ServerUnreachable, execute

    err = Console(stderr=True)
    try:
        plan = make_plan(
            host=args.host,
            port=args.port,
            connections=args.connections,
            procs=args.procs,
            source_ips=args.source_ips,
            connect_rate=args.connect_rate,
            connect_timeout=args.connect_timeout,
            idle=args.idle,
            rate=args.rate,
            duration=args.duration,
            body_size=args.body_size,
            grace=args.grace,
            user_prefix=args.user_prefix,
            token_secret=args.token_secret,
            server_http=args.server_http,
            tls=args.tls,
            tls_ca=args.tls_ca,
        )
    except PlanError as exc:
        print(f"iris-fast load: {exc}", file=sys.stderr)
        return 2
    try:
        totals = execute(plan, err)
    except ServerUnreachable as exc:
        print(f"iris-fast load: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("iris-fast load: interrupted", file=sys.stderr)
        return 130
    # The table goes to stdout unless JSON does.
    report.render_table(totals, err if args.json == "-" else Console())
    if args.json:
        report.write_json(totals, args.json)
    return exit_status(totals)


def exit_status(totals: dict) -> int:
    """1 when a guarantee broke (lost or duplicated), nobody could log in, or a worker died."""
    if totals["lost"] or totals["duplicated"]:
        return 1
    if totals["connections"]["ok"] == 0 or totals["worker_failures"]:
        return 1
    return 0
