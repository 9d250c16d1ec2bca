"""One TCP replication link: frames in to its owner, frames out batched once per loop tick."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any, Protocol

import iris_native as N

from iris_fast.server.batching import BatchedSender

log = logging.getLogger(__name__)

# One REPL_APPEND carries a group commit or a catch-up chunk of up to 4 MiB, or one record
# alone: a PUT of the largest client frame (16 MiB) plus its sender, seq and ts, hence the 64 KiB.
REPL_MAX_FRAME = (1 << 24) + (1 << 16)
# What a link may send before its HELLO is handled: a HELLO of ours is under 300 bytes. Beyond
# this, an unknown party would make us buffer up to REPL_MAX_FRAME per connection.
PRE_HELLO_MAX = 64 << 10


class LinkOwner(Protocol):
    def on_frame(self, link: ReplLink, frame: tuple) -> None: ...
    def link_lost(self, link: ReplLink) -> None: ...


class ReplLink(BatchedSender, asyncio.Protocol):
    """Either end of a replication link. ``owner`` may change once the HELLO says what the
    link carries (an accepted link is handed to the replica of the announced stream)."""

    _max_frame = REPL_MAX_FRAME

    def __init__(self, owner: Any, preamble: bytes = b"", keep_raw: bool = False) -> None:
        self.owner = owner
        self.decoder = N.Decoder(REPL_MAX_FRAME, repl=True)
        self.transport: asyncio.Transport | None = None
        self.last_rx = time.monotonic()
        self.opened = self.last_rx
        self.ready = False  # HELLOs exchanged
        # Bytes received before the HELLO was handled: they travel with a hand-off.
        self.raw: bytearray | None = bytearray() if keep_raw else None
        self._pre_hello = 0
        self._preamble = preamble

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if self._preamble:
            data, self._preamble = self._preamble, b""
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        if not self.ready:
            self._pre_hello += len(data)
            if self._pre_hello > PRE_HELLO_MAX:
                problem = f"{self._pre_hello} bytes before its REPL_HELLO (at most {PRE_HELLO_MAX})"
                refuse = getattr(self.owner, "refuse", None)
                if refuse is not None:
                    refuse(self, problem)  # logged and counted by the listener
                else:
                    log.error("replication link to %s: %s; closing", self.peername(), problem)
                self.close()
                return
        if self.raw is not None:
            self.raw += data
        for f in self.decoder.feed(data):
            if self.transport is None:
                return
            if f[0] == N.DECODE_ERROR:
                log.error("replication link: bad frame from %s: %s", self.peername(), f[2])
                self.close()
                return
            self.owner.on_frame(self, f)

    def flush(self) -> None:
        try:
            super().flush()
        except ValueError as exc:
            # A frame that cannot be encoded would leave the peer's ACKs missing while
            # heartbeats keep the link up: close it, the next HELLO resends from the peer's LSN.
            log.error("replication link to %s: cannot encode a frame (%s); closing it",
                      self.peername(), exc)  # fmt: skip
            self._out = None
            self.close()

    def resume_writing(self) -> None:
        # The socket drained: an origin sending a full copy sends its next chunks.
        pump = getattr(self.owner, "pump", None)
        if pump is not None and self.ready:
            pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._out = None
        self.owner.link_lost(self)

    def peername(self) -> str:
        if self.transport is None:
            return "?"
        peer = self.transport.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if peer else "?"

    def close(self) -> None:
        """Close now; unsent frames are dropped (the peer's HELLO says where to resume)."""
        if self.transport is not None:
            self.transport.abort()
