"""asyncio iris-fast client: one reader task dispatches frames and owns reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Sequence
from types import TracebackType

import iris_native as nat

from ._core import (
    ClientBase,
    ClientCore,
    ConnectionLost,
    IrisError,
    Message,
    backoff_delays,
    log,
    to_body,
)

_READ_SIZE = 256 * 1024


class AsyncIrisClient(ClientBase):
    """asyncio counterpart of :class:`IrisClient` with the same semantics, plus ``send_many``.

    After a connection loss the reader task reconnects in the background (round-robin over the
    nodes, backoff 0.05 s doubling to 1 s) and resends every unACKed message; callers only see
    TimeoutError if their own ``timeout`` passes first.
    """

    def _init_io(self) -> None:
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._futures: dict[str, asyncio.Future[int]] = {}
        self._inbox_event = asyncio.Event()
        self._fatal: BaseException | None = None
        self._closed = False
        self._ssl_ctx: ssl.SSLContext | None = None
        self._idle = max(0.05, min(self.timeout / 4, 5.0))
        self._ping_nonce = 0

    # -- public API ----------------------------------------------------------------------------

    async def login(self, user: str, token: str | None = None, device: str | None = None) -> None:
        """Connect (failing over across nodes) and log in; raises AuthError / ConnectionError."""
        if device is not None:
            self.device = device
        ClientCore.login_frame(user, "", self.device or "")  # validate before the network
        await self._stop()
        self.user = user
        if token is not None:
            self.token = token
        self._closed = False
        self._fatal = None
        self._idx = 0
        await self._connect(time.monotonic() + self.timeout, advance=False)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def send_msg(self, to: str, body: bytes | str, msg_id: str | None = None) -> str:
        """Send and wait for the ACK; returns the msg_id (errors as in ``IrisClient.send_msg``)."""
        item = (to, body) if msg_id is None else (to, body, msg_id)
        return (await self.send_many([item]))[0]

    async def send_many(
        self,
        items: Sequence[tuple[str, bytes | str]] | Sequence[tuple[str, bytes | str, str]],
    ) -> list[str]:
        """Pipeline SENDs for ``(to, body[, msg_id])`` items in one write, then await all ACKs.

        Returns the msg_ids in order. If any message failed, raises the first error in item
        order once all are settled; TimeoutError if not all were ACKed within ``timeout`` (those
        stay queued for resend).
        """
        self._check_usable()
        deadline = time.monotonic() + self.timeout
        loop = asyncio.get_running_loop()
        ids: list[str] = []
        frames: list[tuple] = []
        futs: list[asyncio.Future[int]] = []
        for item in items:
            to, body = item[0], item[1]
            mid, frame = self._core.add_unacked(
                to,
                to_body(body),
                item[2] if len(item) > 2 else None,  # type: ignore[misc]
                self.user,
            )
            fut: asyncio.Future[int] = loop.create_future()
            self._futures[mid] = fut
            ids.append(mid)
            frames.append(frame)
            futs.append(fut)
        try:
            # Not connected: the reader task resends everything in unacked once logged in.
            if self._writer is not None and self._core.logged_in:
                self._write(nat.encode_batch(frames))
                await self._drain(deadline)
            remaining = deadline - time.monotonic()
            _, pending = await asyncio.wait(futs, timeout=max(remaining, 0))
            if pending:
                raise TimeoutError(f"{len(pending)} of {len(futs)} messages not ACKed in time")
            for fut in futs:
                exc = fut.exception()
                if exc is not None:
                    raise exc
            return ids
        finally:
            for mid, fut in zip(ids, futs, strict=True):
                if self._futures.get(mid) is fut:
                    del self._futures[mid]
                if not fut.done():
                    fut.cancel()
                elif not fut.cancelled():
                    fut.exception()  # mark retrieved: only the first error is raised

    async def recv(self, timeout: float | None = None) -> Message:
        """Next delivered message, waiting up to ``timeout`` s (None: forever); TimeoutError."""
        self._check_usable(allow_fatal=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        core = self._core
        while not core.has_message():
            if self._fatal is not None:
                raise self._fatal
            if self._closed:
                raise ConnectionError("client closed")
            self._inbox_event.clear()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError("no message in time")
            try:
                await asyncio.wait_for(self._inbox_event.wait(), remaining)
            except TimeoutError:
                if not core.has_message():
                    raise TimeoutError("no message in time") from None
        msg = core.pop_message()
        assert msg is not None
        self._flush()
        return msg

    async def recv_msg(self, timeout: float | None = None) -> bytes:
        """Body of the next delivered message (see ``recv``)."""
        return (await self.recv(timeout)).body

    async def close(self) -> None:
        """Stop the reader task and close the connection (idempotent)."""
        self._closed = True
        await self._stop()
        for fut in self._futures.values():
            if not fut.done():
                fut.set_exception(ConnectionError("client closed"))
        self._futures.clear()
        self._inbox_event.set()

    async def __aenter__(self) -> AsyncIrisClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- internals -----------------------------------------------------------------------------

    def _check_usable(self, allow_fatal: bool = False) -> None:
        if self._closed:
            raise RuntimeError("client is closed; call login() to reconnect")
        if self.user is None:
            raise RuntimeError("call login() first")
        if self._fatal is not None and not allow_fatal:
            raise self._fatal

    def _on_complete(self, msg_id: str, result: int | IrisError) -> None:
        fut = self._futures.pop(msg_id, None)
        if fut is None or fut.done():
            return
        if isinstance(result, IrisError):
            fut.set_exception(result)
        else:
            fut.set_result(result)

    def _write(self, data: bytes) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            return
        try:
            writer.write(data)
        except (OSError, RuntimeError):
            # The reader task notices the loss and reconnects; resends cover what was lost.
            pass

    async def _drain(self, deadline: float) -> None:
        writer = self._writer
        if writer is None:
            return
        with contextlib.suppress(OSError, RuntimeError):
            await asyncio.wait_for(writer.drain(), max(deadline - time.monotonic(), 0))

    def _flush(self) -> None:
        data = self._core.take_out()
        if data is not None and self._core.logged_in:
            self._write(data)

    def _feed(self, data: bytes) -> None:
        before = len(self._core.inbox)
        try:
            self._core.feed(data)
        finally:
            if len(self._core.inbox) != before:
                self._inbox_event.set()
            self._flush()

    async def _open(self, addr: tuple[str, int]) -> None:
        host, port = addr
        ssl_arg: ssl.SSLContext | None = None
        if self.tls:
            if self._ssl_ctx is None:
                self._ssl_ctx = ssl.create_default_context(cafile=self.ca_file)
            ssl_arg = self._ssl_ctx
        self._reader, self._writer = await asyncio.open_connection(
            host, port, ssl=ssl_arg, server_hostname=host if ssl_arg else None
        )

    async def _connect(self, deadline: float | None, advance: bool = True) -> None:
        """Connect + LOGIN + resend unACKed, round-robin with backoff; None = try forever."""
        assert self.user is not None
        core = self._core
        if advance:
            self._idx = (self._idx + 1) % len(self._addrs)
        attempt_limit = max(self.timeout / 3, 0.5)
        last_err: BaseException | None = None
        for delay in backoff_delays():
            if self._closed:
                raise ConnectionError("client closed")
            addr = self._addrs[self._idx]
            limit = attempt_limit
            if deadline is not None:
                limit = min(limit, deadline - time.monotonic())
            try:
                if limit <= 0:
                    break
                async with asyncio.timeout(limit):
                    await self._open(addr)
                    core.begin_connection()
                    self._write(
                        nat.encode(core.login_frame(self.user, self.token or "", self.device or ""))
                    )
                    await self._handshake()
                resend = core.resend_frames()
                if resend:
                    self._write(nat.encode_batch(resend))
                return
            except IrisError:
                await self._drop()
                raise
            except (OSError, ConnectionLost, TimeoutError) as e:
                last_err = e
                await self._drop()
            self._idx = (self._idx + 1) % len(self._addrs)
            pause = delay
            if deadline is not None:
                pause = min(pause, deadline - time.monotonic())
                if pause <= 0:
                    break
            await asyncio.sleep(pause)
        raise ConnectionError(
            f"could not log in to any of {self._addrs} within the time limit: {last_err}"
        ) from last_err

    async def _handshake(self) -> None:
        reader = self._reader
        assert reader is not None
        while not self._core.logged_in:
            data = await reader.read(_READ_SIZE)
            if not data:
                raise ConnectionLost("connection closed during login")
            self._feed(data)

    async def _read_loop(self) -> None:
        reader = self._reader
        assert reader is not None
        ping_sent = False
        while True:
            try:
                data = await asyncio.wait_for(reader.read(_READ_SIZE), self._idle)
            except TimeoutError:
                if ping_sent:
                    raise ConnectionLost("peer did not answer PING") from None
                self._ping_nonce += 1
                self._write(nat.encode((nat.PING, self._ping_nonce)))
                ping_sent = True
                continue
            if not data:
                raise ConnectionLost("connection closed by server")
            ping_sent = False
            self._feed(data)

    async def _run(self) -> None:
        """Reader task: dispatch frames; on loss reconnect forever (until close or fatal)."""
        while not self._closed:
            try:
                await self._read_loop()
            except (ConnectionLost, OSError) as e:
                log.info("connection lost (%s); reconnecting", e)
            except IrisError as e:
                self._fail(e)
                return
            await self._drop()
            if self._closed:
                return
            try:
                await self._connect(None)
            except IrisError as e:
                self._fail(e)
                return
            except ConnectionError:
                return  # closed while reconnecting

    def _fail(self, exc: BaseException) -> None:
        self._fatal = exc
        for fut in self._futures.values():
            if not fut.done():
                fut.set_exception(exc)
        self._futures.clear()
        self._inbox_event.set()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    async def _drop(self) -> None:
        self._core.logged_in = False
        writer, self._writer = self._writer, None
        self._reader = None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._drop()
