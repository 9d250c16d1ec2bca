"""A bare protocol client for tests: frames in, frames out, no retries, no dedup.

Tests that must see exactly what the server sends (duplicates included) use this instead of
``iris_fast.client``, whose receive-side dedup would hide a server bug.
"""

from __future__ import annotations

import socket
import time

import iris_native as N


class RawClient:
    def __init__(
        self, addr: tuple[str, int], timeout: float = 5.0, source: str | None = None
    ) -> None:
        # source: bind this local address first (e.g. "127.0.0.2", another client address).
        self.sock = socket.create_connection(
            addr, timeout=timeout, source_address=(source, 0) if source else None
        )
        self.decoder = N.Decoder(1 << 24)
        self.frames: list[tuple] = []
        self.closed = False

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, *frames: tuple) -> None:
        self.sock.sendall(N.encode_batch(list(frames), max_frame=1 << 24))

    def login(self, user: str, token: str = "") -> tuple:
        self.send((N.LOGIN, 1, user, token))
        return self.expect(N.LOGIN_OK)

    def _fill(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or self.closed:
            return False
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return False
        except ConnectionError:
            self.closed = True
            return False
        if not data:
            self.closed = True
            return False
        self.frames.extend(self.decoder.feed(data))
        return True

    def next(self, timeout: float = 5.0) -> tuple | None:
        deadline = time.monotonic() + timeout
        while not self.frames:
            if not self._fill(deadline):
                return None
        return self.frames.pop(0)

    def expect(self, ftype: int, timeout: float = 5.0) -> tuple:
        """The next frame of type ``ftype``; other frames before it are an error."""
        f = self.next(timeout)
        assert f is not None, f"expected frame type {ftype}, got nothing (closed={self.closed})"
        assert f[0] == ftype, f"expected frame type {ftype}, got {f}"
        return f

    def collect(self, ftype: int, n: int, timeout: float = 10.0) -> list[tuple]:
        """Exactly the next ``n`` frames of type ``ftype``, ignoring other types."""
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            f = self.next(max(deadline - time.monotonic(), 0.001))
            if f is None:
                break
            if f[0] == ftype:
                out.append(f)
        return out

    def drain(self, timeout: float = 0.5) -> list[tuple]:
        out = []
        while (f := self.next(timeout)) is not None:
            out.append(f)
        return out

    def wait_closed(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            self._fill(deadline)
        return self.closed

    def close(self) -> None:
        self.sock.close()
