"""Frames queued during one loop tick leave in one buffer and one write (internal links)."""

from __future__ import annotations

import asyncio

import iris_native as N


class BatchedSender:
    """Mixin for the asyncio protocols of internal links (worker links, replication links).

    ``send`` queues a frame tuple; the first frame of a tick asks ``_schedule_flush`` to run
    ``flush`` later in the tick, which encodes everything queued with one ``encode_batch`` (Rust)
    and writes it with one ``transport.write``. Client connections do the same in Cython
    (``iris_fast.connection``).
    """

    transport: asyncio.Transport | None
    _out: list[tuple] | None = None
    _scheduled: bool = False
    _max_frame: int = 1 << 24

    def _schedule_flush(self) -> None:
        asyncio.get_running_loop().call_soon(self.flush)

    def send(self, frame: tuple) -> None:
        if self.transport is None:
            return
        if self._out is None:
            self._out = [frame]
        else:
            self._out.append(frame)
        if not self._scheduled:
            self._scheduled = True
            self._schedule_flush()

    def flush(self) -> None:
        self._scheduled = False
        out, self._out = self._out, None
        if out and self.transport is not None:
            self.transport.write(N.encode_batch(out, self._max_frame))
