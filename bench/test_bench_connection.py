"""Cython connection object against its pure-Python twin: bytes per object, ns per frame.

Figures, not assertions on time: run with ``pytest bench/test_bench_connection.py
--benchmark-only`` and read the table and ``extra_info``.
"""

from __future__ import annotations

import sys

import iris_native as N
import pytest
from iris_fast.connection import Connection
from pyconnection import PyConnection


class NullTransport:
    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str):
        return None


class NullWorker:
    def __init__(self) -> None:
        self.sends = 0

    def on_open(self, conn) -> None:
        pass

    def on_send(self, conn, msg_id, to, body) -> None:
        self.sends += 1

    def on_deliver_ack(self, conn, tag) -> None:
        pass

    def schedule_flush(self, conn) -> None:
        conn.flush()


def object_bytes(conn) -> int:
    """The connection object plus what it owns while idle (decoder and its buffer)."""
    size = sys.getsizeof(conn)
    dec = conn._decoder if isinstance(conn, PyConnection) else None
    if dec is None:
        # Cython keeps the decoder in a C slot: measure an identical fresh decoder instead.
        dec = N.Decoder(65536)
    return size + sys.getsizeof(dec) + dec.capacity()


@pytest.mark.parametrize("impl", [Connection, PyConnection], ids=["cython", "python"])
def test_idle_object_size(benchmark, impl):
    def make():
        c = impl(NullWorker(), 65536)
        c.connection_made(NullTransport())
        return c

    conn = benchmark(make)
    size = object_bytes(conn)
    if isinstance(conn, PyConnection):
        # A __slots__ object stores ints/floats/bools as separate heap objects once they leave
        # the small-int cache; count the ones an idle connection actually holds.
        size += sys.getsizeof(conn.last_active) + sys.getsizeof(conn.opened_at)
    benchmark.extra_info["bytes_per_idle_connection_object"] = size
    print(f"\n{impl.__name__}: {size} bytes per idle connection object (+ decoder)")
    assert size > 0


SENDS = N.encode_batch([(N.SEND, f"m{i}", "bob", b"x" * 100) for i in range(100)])


@pytest.mark.parametrize("impl", [Connection, PyConnection], ids=["cython", "python"])
def test_dispatch_100_send_frames(benchmark, impl):
    worker = NullWorker()
    conn = impl(worker, 65536)
    conn.connection_made(NullTransport())
    conn.user = "alice"
    benchmark(conn.data_received, SENDS)
    benchmark.extra_info["frames_per_call"] = 100
    assert worker.sends >= 100
