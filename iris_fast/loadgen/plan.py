"""Validated settings of one load run and how the work is split over processes."""

from __future__ import annotations

import ipaddress
import math
import os
import resource
import socket
from dataclasses import dataclass

from iris_fast.config import DEFAULT_MAX_CONNS_PER_IP

MAX_CONNS_PER_PROC = 15_000
# Default spread over 127.0.0.x source addresses: half the server's default per-address limit.
# That limit is per node but enforced per worker (split evenly), and SO_REUSEPORT hashing and
# hand-offs spread one address's connections only roughly evenly, so half leaves room; it is
# also well inside the ~28k ephemeral ports of one source address (docs/architecture.md).
MAX_CONNS_PER_SOURCE_IP = DEFAULT_MAX_CONNS_PER_IP // 2
CONNECT_PHASE_CAP_S = 120.0
FD_HEADROOM = 64  # descriptors a worker needs besides its sockets (pipes, epoll, imports)


class PlanError(ValueError):
    """The options cannot describe a valid run; the message says why."""


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """Everything a run needs; picklable, so each worker gets a copy."""

    host: str
    port: int
    connections: int
    procs: int
    source_ips: int
    connect_rate: float
    idle: bool
    rate: float
    duration: float
    body_size: int
    grace: float
    user_prefix: str
    token_secret: str | None
    server_http: tuple[str, int] | None
    connect_cap: float = CONNECT_PHASE_CAP_S
    # TLS to the server: trust tls_ca (a PEM file) or, without it, the system's CAs.
    tls: bool = False
    tls_ca: str | None = None

    @property
    def hard_deadline_s(self) -> float:
        """Seconds after which the run ends whatever happens (connect cap + duration + grace)."""
        return self.connect_cap + self.duration + self.grace

    def local_users(self, proc: int) -> range:
        """Indices of the users process ``proc`` holds (user i lives in process i % procs)."""
        return range(proc, self.connections, self.procs)

    def user(self, index: int) -> str:
        """The user id of user ``index``."""
        return f"{self.user_prefix}-{index}"

    def source_ip(self, index: int) -> str | None:
        """Source address user ``index`` binds before connecting; None: let the kernel pick."""
        if self.source_ips <= 1:
            return None
        return f"127.0.0.{1 + index % self.source_ips}"


def raise_nofile_limit() -> int:
    """Raise the soft open-files limit to the hard one; return the resulting soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def check_loopback(host: str, what: str) -> str:
    """Resolve ``host`` to an IPv4 address in 127.0.0.0/8 or raise PlanError.

    Only loopback targets are allowed: this tool opens tens of thousands of sockets and must not
    be pointed at someone else's machine by mistake.
    """
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise PlanError(f"{what} {host!r} does not resolve: {exc}") from None
    addr = infos[0][4][0]
    if ipaddress.ip_address(addr) not in ipaddress.ip_network("127.0.0.0/8"):
        raise PlanError(f"{what} {host} ({addr}) is not a loopback address (127.0.0.0/8)")
    return addr


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` into a tuple (loopback host only)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise PlanError(f"--server-http wants HOST:PORT, got {text!r}")
    return check_loopback(host, "--server-http host"), int(port)


def make_plan(
    *,
    host: str,
    port: int,
    connections: int,
    procs: int | None,
    source_ips: int | None,
    connect_rate: float,
    idle: bool,
    connect_timeout: float = CONNECT_PHASE_CAP_S,
    rate: float,
    duration: float,
    body_size: int,
    grace: float,
    user_prefix: str | None,
    token_secret: str | None,
    server_http: str | None,
    tls: bool = False,
    tls_ca: str | None = None,
) -> LoadPlan:
    """Check the options and fill in the derived defaults (procs, source IPs, user prefix)."""
    addr = check_loopback(host, "--host")
    if not 1 <= port <= 65535:
        raise PlanError("--port must be 1..65535")
    if connections < 1:
        raise PlanError("--connections must be at least 1")
    if not idle and connections < 2:
        raise PlanError("a message run needs at least 2 connections (nobody sends to itself)")
    if procs is None:
        procs = max(1, math.ceil(connections / MAX_CONNS_PER_PROC))
    if not 1 <= procs <= connections:
        raise PlanError("--procs must be between 1 and --connections")
    if source_ips is None:
        source_ips = max(1, math.ceil(connections / MAX_CONNS_PER_SOURCE_IP))
    if not 1 <= source_ips <= 254:
        raise PlanError("--source-ips must be between 1 and 254")
    if connect_rate <= 0:
        raise PlanError("--connect-rate must be positive")
    if connect_timeout <= 0:
        raise PlanError("--connect-timeout must be positive")
    if not idle and rate <= 0:
        raise PlanError("--rate must be positive")
    if duration < 0 or grace < 0:
        raise PlanError("--duration and --grace must not be negative")
    if body_size < 8:
        raise PlanError("--body-size must be at least 8 (the body carries the send time)")
    per_proc = math.ceil(connections / procs)
    limit = raise_nofile_limit()
    if per_proc + FD_HEADROOM > limit:
        raise PlanError(
            f"{per_proc} connections per process exceed the open-files limit {limit}; "
            f"use more --procs"
        )
    if token_secret is not None:
        from iris_fast.server.auth import check_secret

        try:
            check_secret(token_secret, "--token-secret")
        except ValueError as exc:
            raise PlanError(str(exc)) from None
    if user_prefix is None:
        user_prefix = f"load-{os.urandom(3).hex()}"
    if not user_prefix or "\x00" in user_prefix or len(user_prefix.encode()) > 240:
        raise PlanError("--user-prefix must be 1..240 bytes without NUL")
    return LoadPlan(
        host=addr,
        port=port,
        connections=connections,
        procs=procs,
        source_ips=source_ips,
        connect_rate=connect_rate,
        connect_cap=connect_timeout,
        idle=idle,
        rate=rate,
        duration=duration,
        body_size=body_size,
        grace=grace,
        user_prefix=user_prefix,
        token_secret=token_secret,
        server_http=parse_hostport(server_http) if server_http else None,
        tls=tls or tls_ca is not None,
        tls_ca=tls_ca,
    )
