"""TLS on the client listener, and how a TLS session reaches its user's home worker.

A plain TCP socket can be handed to another worker (``links.Handoff``): the kernel object moves,
nothing else has to. A TLS session cannot: its keys and sequence numbers live in this process's
OpenSSL state. So when a user logs in over TLS on a worker that is not its home, that worker
keeps the TLS session and *relays*: it creates a Unix socket pair, hands one end to the home
worker exactly as it would hand a client socket (the home sees an ordinary connection that has
just logged in), and copies bytes between the TLS session and its end of the pair. The home
worker owns the session's state as for any client; the relaying worker only decrypts and
encrypts. Cost: one extra local hop for (N-1)/N of the TLS connections, measured in bench/.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable

log = logging.getLogger(__name__)


def server_context(cert: str, key: str | None) -> ssl.SSLContext:
    """The listener's context: TLS 1.2+, the standard library's server defaults."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load --tls-cert {cert} / --tls-key {key}: {exc}") from None
    return ctx


def is_tls(transport: asyncio.BaseTransport) -> bool:
    return transport.get_extra_info("sslcontext") is not None


class _Side(asyncio.Protocol):
    """One side of a relay: what it receives goes to the other side's transport."""

    def __init__(self, relay: TlsRelay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None
        self.pending: list[bytes] | None = None  # until the other side is connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is None or other.transport is None:
            if self.pending is None:
                self.pending = []
            self.pending.append(data)
            return
        other.transport.write(data)

    def eof_received(self) -> bool:
        if self.other is not None and self.other.transport is not None:
            if self.other.transport.can_write_eof():
                self.other.transport.write_eof()
                return True
            self.other.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.relay.lost(self)

    # Back-pressure: a side that cannot write fast enough pauses the other side's reading.
    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()


class TlsRelay:
    """Copies bytes between a client's TLS session and a Unix socket to the home worker."""

    __slots__ = ("tls", "unix", "_on_done")

    def __init__(
        self, tls_transport: asyncio.Transport, on_done: Callable[[TlsRelay], None]
    ) -> None:
        self.tls = _Side(self)
        self.unix = _Side(self)
        self.tls.other, self.unix.other = self.unix, self.tls
        self.tls.transport = tls_transport
        self._on_done = on_done
        tls_transport.set_protocol(self.tls)

    async def start(self, local_end: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(lambda: self.unix, local_end)
        if self.tls.pending:
            data, self.tls.pending = b"".join(self.tls.pending), None
            transport.write(data)  # type: ignore[attr-defined]
        if self.tls.transport is not None:
            self.tls.transport.resume_reading()
        else:  # the client left while we connected
            transport.close()

    def lost(self, side: _Side) -> None:
        other = side.other
        if other is not None and other.transport is not None:
            other.transport.close()
        if self.tls.transport is None and self.unix.transport is None:
            self._on_done(self)
