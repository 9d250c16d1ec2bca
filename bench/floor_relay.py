"""The floor: the least a server can do for the load generator's traffic, on the same stack.

A single uvloop process that speaks just enough of the iris protocol for ``iris-fast load``:
LOGIN gets LOGIN_OK (no token check), SEND becomes a DELIVER to the recipient's connection, and
the recipient's DELIVER_ACK becomes the sender's ACK (end-to-end, like the real server). Writes
are batched per connection per loop tick, with the same Rust codec. No storage, no dedup, no
rate limits, no second worker, no metrics: every message still costs two socket reads and two
socket writes, which is what the kernel charges for and what no implementation can avoid.

``bench/floor.py`` drives it and the real server with the same load and compares the CPU each
spends per message. It is a benchmark tool, not a server: messages to a user who is not
connected wait in memory and are lost on exit.

    python bench/floor_relay.py --port 7000
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import iris_native as N
import uvloop

MAX_FRAME = 65536


class Relay:
    """Who is connected, and the connections with frames to write this tick."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.online: dict[str, Conn] = {}
        self.parked: dict[str, list[tuple[Conn | None, str, str, bytes]]] = {}
        self.dirty: list[Conn] = []
        self.flush_pending = False

    def queue(self, conn: Conn, frame: tuple) -> None:
        if not conn.out:
            self.dirty.append(conn)
            if not self.flush_pending:
                self.flush_pending = True
                self.loop.call_soon(self.flush)
        conn.out.append(frame)

    def flush(self) -> None:
        self.flush_pending = False
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            if conn.transport is not None:
                conn.transport.write(N.encode_batch(conn.out))
            conn.out = []

    def deliver(self, to: Conn, sender_conn: Conn | None, sender: str, msg_id: str,
                body: bytes) -> None:  # fmt: skip
        to.tag += 1
        to.pending[to.tag] = (sender_conn, msg_id)
        self.queue(to, (N.DELIVER, to.tag, 0, sender, msg_id, body))


class Conn(asyncio.Protocol):
    """One client: its decoder, its user, the deliveries it has not acknowledged yet."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.decoder = N.Decoder(MAX_FRAME)
        self.transport: asyncio.Transport | None = None
        self.user = ""
        self.tag = 0
        self.pending: dict[int, tuple[Conn | None, str]] = {}
        self.out: list[tuple] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # noqa: D102
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:  # noqa: D102
        relay = self.relay
        for f in self.decoder.feed(data):
            t = f[0]
            if t == N.SEND:
                to = relay.online.get(f[2])
                if to is None:
                    relay.parked.setdefault(f[2], []).append((self, self.user, f[1], f[3]))
                else:
                    relay.deliver(to, self, self.user, f[1], f[3])
            elif t == N.DELIVER_ACK:
                # Cumulative, like the real server: every tag up to this one.
                for tag in [k for k in self.pending if k <= f[1]]:
                    sender, msg_id = self.pending.pop(tag)
                    if sender is not None and sender.transport is not None:
                        relay.queue(sender, (N.ACK, msg_id, 0))
            elif t == N.LOGIN:
                self.user = f[2]
                relay.online[self.user] = self
                relay.queue(self, (N.LOGIN_OK, 1, 0, "floor", MAX_FRAME))
                for sender, name, msg_id, body in relay.parked.pop(self.user, []):
                    relay.deliver(self, sender, name, msg_id, body)
            elif t == N.PING:
                relay.queue(self, (N.PONG, f[1]))
            elif t == N.DECODE_ERROR:
                self.transport.abort()  # type: ignore[union-attr]
                return

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        self.transport = None
        if self.relay.online.get(self.user) is self:
            del self.relay.online[self.user]


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    relay = Relay(loop)
    server = await loop.create_server(lambda: Conn(relay), host, port, backlog=65535)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"floor relay listening on {host}:{port}", flush=True)
    await stop.wait()
    server.close()


@contextmanager
def running(port: int, timeout: float = 30.0) -> Iterator[subprocess.Popen]:
    """This relay as a child process in its own process group, listening on ``port``."""
    proc = subprocess.Popen([sys.executable, __file__, "--port", str(port)],
                            stdout=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"floor relay exited with {proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("floor relay did not listen") from None
                time.sleep(0.05)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    uvloop.run(serve(a.host, a.port))


if __name__ == "__main__":
    main()
