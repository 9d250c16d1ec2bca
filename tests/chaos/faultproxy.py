"""A TCP proxy between the two nodes of a pair that a test can cut, blackhole and heal.

Why a proxy and not network namespaces: it needs no root and no iproute2, runs the same on a
laptop and in CI, and can do what a partition in the wild does to a TCP connection: go silent
without a FIN or RST (``blackhole``), so that the nodes must find out by heartbeats. ``cut``
also exists: it closes every connection at once, like a peer process dying.
"""

from __future__ import annotations

import asyncio
import threading


class FaultProxy:
    """Listens on ``listen_port`` (127.0.0.1) and forwards to ``target``; runs in a thread."""

    def __init__(self, listen_port: int, target: tuple[str, int]) -> None:
        self.listen_port = listen_port
        self.target = target
        self.blackholed = False
        self._loop = asyncio.new_event_loop()
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._held: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self.connections = 0
        self.bytes = 0

    def start(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("proxy did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.listen_port)
            self._ready.set()

        self._loop.run_until_complete(main())
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blackholed:
            # A partition: the connect succeeds locally, nothing ever reaches the other side.
            self._held.add(writer)
            return
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.connections += 1
        pair = (writer, up_w)
        self._pairs.add(pair)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while True:
                    data = await src.read(65536)
                    if not data:
                        break
                    while self.blackholed:
                        # Silently hold the bytes: no FIN, no RST, nothing delivered.
                        await asyncio.sleep(0.05)
                        if dst.is_closing():
                            return
                    self.bytes += len(data)
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                for w in pair:
                    w.close()
                self._pairs.discard(pair)

        asyncio.ensure_future(pipe(reader, up_w))
        asyncio.ensure_future(pipe(up_r, writer))

    def _call(self, fn) -> None:
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(5)

    def blackhole(self) -> None:
        """Stop forwarding in both directions, silently, on old and new connections."""
        self.blackholed = True

    def heal(self) -> None:
        """Forward again. Connections that the nodes dropped meanwhile stay dropped."""

        def run() -> None:
            self.blackholed = False
            for w in list(self._held):
                w.close()
            self._held.clear()

        self._call(run)

    def cut(self) -> None:
        """Close every proxied connection now (both sides see the connection end)."""

        def run() -> None:
            for pair in list(self._pairs):
                for w in pair:
                    w.transport.abort()
            self._pairs.clear()

        self._call(run)

    def close(self) -> None:
        def run() -> None:
            if self._server is not None:
                self._server.close()
            for pair in list(self._pairs):
                for w in pair:
                    w.transport.abort()
            for w in self._held:
                w.transport.abort()

        self._call(run)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
