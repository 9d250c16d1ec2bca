"""LOGIN rate limits: two token buckets per source address, in each worker.

* ``--login-fail-rate`` / ``--login-fail-burst`` (default 20/s, burst 40): *failed* logins (bad
  token, bad user id, wrong version). This is the one that stops token guessing and floods of
  garbage: a failure costs the attacker a token of a bucket that refills slowly.
* ``--login-rate`` / ``--login-burst`` (default 10,000/s, burst 20,000): *every* LOGIN. Many valid
  logins from one address are legitimate (a NAT, a carrier-grade NAT after a node restart, the
  load generator), so this bound is high; it only caps what one source can make a worker spend
  verifying signatures with stolen or replayed valid tokens.

A LOGIN is refused, before its token is even looked at, while either bucket of its source is
empty: ``ERROR(RATE_LIMITED)`` with the time until the next attempt can pass, then close. A
refused attempt costs nothing from the buckets (the client is told when to come back).

Sources are IPv4 addresses, and IPv6 /64 prefixes (one host commonly owns a whole /64). The
limits are per worker: connections of one address spread over the workers by ``SO_REUSEPORT``
hashing, so a node admits up to ``workers`` times the rates. The table is bounded: an entry
untouched long enough for both buckets to be full again carries no information and is dropped,
and at ``MAX_SOURCES`` entries the least recently seen source is evicted.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from iris_fast.config import ServerConfig

# Sources remembered per worker (about 190 bytes each: at most ~6 MB).
MAX_SOURCES = 32_768


def source_of(transport: Any) -> str:
    """The rate-limit key of a client transport: IPv4 address or IPv6 /64."""
    peer = transport.get_extra_info("peername") if transport is not None else None
    if not isinstance(peer, tuple) or not peer:
        return "local"
    host = peer[0]
    if ":" not in host:
        return host
    try:
        ip = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


class LoginLimiter:
    """Token buckets (all attempts, failures) per source; a rate <= 0 turns its bucket off."""

    def __init__(
        self,
        rate: float,
        burst: float,
        fail_rate: float,
        fail_burst: float,
        max_sources: int = MAX_SOURCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.fail_rate = fail_rate
        self.fail_burst = float(fail_burst)
        self.max_sources = max_sources
        self.clock = clock
        spans = [b / r for r, b in ((rate, burst), (fail_rate, fail_burst)) if r > 0]
        # Untouched this long, both buckets are full again: the entry is as good as new.
        self.idle_after = max(spans, default=0.0)
        # source -> [attempt tokens, failure tokens, last update], least recently used first.
        self.table: OrderedDict[str, list[float]] = OrderedDict()

    @classmethod
    def from_config(cls, config: ServerConfig) -> LoginLimiter | None:
        if config.login_rate <= 0 and config.login_fail_rate <= 0:
            return None
        return cls(
            config.login_rate, config.login_burst, config.login_fail_rate, config.login_fail_burst
        )

    def _entry(self, source: str, now: float) -> list[float]:
        e = self.table.get(source)
        if e is None:
            self.prune(now)
            while len(self.table) >= self.max_sources:
                self.table.popitem(last=False)
            e = self.table[source] = [self.burst, self.fail_burst, now]
            return e
        self.table.move_to_end(source)
        elapsed = now - e[2]
        if elapsed > 0:
            e[0] = min(self.burst, e[0] + elapsed * self.rate)
            e[1] = min(self.fail_burst, e[1] + elapsed * self.fail_rate)
            e[2] = now
        return e

    def allow(self, source: str) -> float:
        """0.0 if a LOGIN from ``source`` may go ahead (and count it), else seconds to wait."""
        e = self._entry(source, self.clock())
        wait = 0.0
        if self.rate > 0 and e[0] < 1:
            wait = (1 - e[0]) / self.rate
        if self.fail_rate > 0 and e[1] < 1:
            wait = max(wait, (1 - e[1]) / self.fail_rate)
        if wait > 0:
            return max(math.ceil(wait * 10) / 10, 0.1)  # shown as "retry in 1.2 s"
        if self.rate > 0:
            e[0] -= 1
        return 0.0

    def failed(self, source: str) -> None:
        """A LOGIN from ``source`` failed: it costs a failure token."""
        if self.fail_rate > 0:
            e = self._entry(source, self.clock())
            e[1] = max(e[1] - 1, 0.0)

    def prune(self, now: float | None = None) -> int:
        """Forget the sources whose buckets are full again; how many were dropped."""
        if now is None:
            now = self.clock()
        table, horizon, dropped = self.table, now - self.idle_after, 0
        while table:
            source, e = next(iter(table.items()))
            if e[2] > horizon:
                break
            del table[source]
            dropped += 1
        return dropped


class SendBucket:
    """Token buckets for SENDs, in messages and in bytes, of one user or one connection.

    Refilled lazily from the clock on each SEND (no timers); a rate of 0 means no limit in that
    dimension. ``take`` either charges the message or says how long until it would fit.
    """

    __slots__ = ("msgs", "bytes", "last")

    def __init__(self, limits: SendLimits, now: float) -> None:
        self.msgs = limits.msgs_burst
        self.bytes = limits.bytes_burst
        self.last = now

    def take(self, limits: SendLimits, now: float, nbytes: int) -> float:
        """0.0 if the SEND may pass (and is charged), else seconds until it could."""
        elapsed = now - self.last
        self.last = now
        msgs = min(self.msgs + elapsed * limits.msgs_rate, limits.msgs_burst)
        size = min(self.bytes + elapsed * limits.bytes_rate, limits.bytes_burst)
        wait = 0.0
        if limits.msgs_rate and msgs < 1.0:
            wait = (1.0 - msgs) / limits.msgs_rate
        if limits.bytes_rate and size < nbytes:
            # A message bigger than the whole burst can never pass: inf (refused for good).
            wait = max(wait, math.inf if nbytes > limits.bytes_burst else
                       (nbytes - size) / limits.bytes_rate)  # fmt: skip
        if wait:
            self.msgs, self.bytes = msgs, size
            return wait
        self.msgs = msgs - 1.0 if limits.msgs_rate else msgs
        self.bytes = size - nbytes if limits.bytes_rate else size
        return 0.0


class SendLimits:
    """Rates (per second) and bursts of one kind of bucket; all zero: no bucket at all."""

    __slots__ = ("msgs_rate", "msgs_burst", "bytes_rate", "bytes_burst")

    def __init__(self, msgs_rate: float, msgs_burst: float, bytes_rate: float,
                 bytes_burst: float) -> None:  # fmt: skip
        self.msgs_rate = float(msgs_rate)
        self.msgs_burst = float(max(msgs_burst, 1))
        self.bytes_rate = float(bytes_rate)
        self.bytes_burst = float(max(bytes_burst, 1))

    @property
    def active(self) -> bool:
        return bool(self.msgs_rate or self.bytes_rate)
