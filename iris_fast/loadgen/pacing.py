"""Token-bucket pacing: how many operations are due now to hold a target rate."""

from __future__ import annotations


class TokenBucket:
    """Credits ``rate`` tokens per second, holding at most ``burst``.

    The caller asks ``take(now)`` once per loop tick and performs that many operations. The cap
    keeps a stalled loop (GC pause, CPU starvation) from answering with a huge catch-up burst
    that would measure the generator rather than the server.
    """

    __slots__ = ("rate", "burst", "_tokens", "_last")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = max(1.0, float(burst))
        self._tokens = 0.0
        self._last = now

    def take(self, now: float, limit: int | None = None) -> int:
        """Whole tokens available at ``now`` (seconds), at most ``limit``; they are consumed."""
        elapsed = now - self._last
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._last = now
        n = int(self._tokens)
        if limit is not None and n > limit:
            n = max(0, limit)
        self._tokens -= n
        return n

    def seconds_until_next(self) -> float:
        """Seconds until at least one token is available (0 when one already is)."""
        missing = 1.0 - self._tokens
        return 0.0 if missing <= 0 else missing / self.rate
