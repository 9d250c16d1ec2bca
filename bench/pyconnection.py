"""A pure-Python twin of ``iris_fast/connection.pyx``, kept only to measure what Cython buys.

Same fields (``__slots__``), same dispatch, same batching; used by bench/test_bench_connection.py.
"""

from __future__ import annotations

import time

from iris_native import Decoder, encode_batch

T_DECODE_ERROR, T_LOGIN, T_SEND, T_DELIVER_ACK, T_PING, T_PONG = 0, 1, 3, 6, 7, 8


class PyConnection:
    __slots__ = (
        "transport",
        "worker",
        "_decoder",
        "_out",
        "user",
        "inflight",
        "next_tag",
        "cursor",
        "inflight_bytes",
        "last_active",
        "opened_at",
        "errors",
        "closing",
        "detached",
        "write_paused",
        "_flush_scheduled",
        "_max_frame",
    )

    def __init__(self, worker, max_frame: int = 65536) -> None:
        self.transport = None
        self.worker = worker
        self._decoder = None
        self._out = None
        self.user = None
        self.inflight = None
        self.next_tag = 1
        self.cursor = 0
        self.inflight_bytes = 0
        self.last_active = 0.0
        self.opened_at = 0.0
        self.errors = 0
        self.closing = False
        self.detached = False
        self.write_paused = False
        self._flush_scheduled = False
        self._max_frame = max_frame

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._decoder = Decoder(self._max_frame)
        self.opened_at = self.last_active = time.monotonic()
        self.worker.on_open(self)

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        worker = self.worker
        for f in self._decoder.feed(data):
            t = f[0]
            if t == T_SEND:
                if self.user is None:
                    worker.reject(self, 5, "log in before sending")
                else:
                    worker.on_send(self, f[1], f[2], f[3])
            elif t == T_DELIVER_ACK:
                worker.on_deliver_ack(self, f[1])
            elif t == T_PING:
                self.send((T_PONG, f[1]))
            elif t == T_PONG:
                pass
            elif t == T_LOGIN:
                worker.on_login(self, f[1], f[2], f[3])
            elif t == T_DECODE_ERROR:
                worker.on_decode_error(self, f[1], f[2])
            else:
                worker.reject(self, 3, "server-to-client type")
            if self.closing:
                break

    def send(self, frame: tuple) -> None:
        if self.transport is None:
            return
        if self._out is None:
            self._out = [frame]
        else:
            self._out.append(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.worker.schedule_flush(self)

    def flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if out is None:
            return
        self._out = None
        self.transport.write(encode_batch(out, 16 * 1024 * 1024 + 1024))
        if self.write_paused:
            self.worker.on_pending(self)
