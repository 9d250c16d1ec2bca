"""Blocking iris-fast client: plain sockets, no threads."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from types import TracebackType

import iris_native as nat

from ._core import (
    ClientBase,
    ClientCore,
    ConnectionLost,
    IrisError,
    Message,
    backoff_delays,
    to_body,
)

_RECV_SIZE = 256 * 1024


class IrisClient(ClientBase):
    """Blocking client with failover, resend of unACKed messages and receive-side dedup.

    ``nodes`` are further ``(host, port)`` pairs tried after ``(host, port)``, round-robin.
    ``timeout`` bounds each call (connect + login, or one ``send_msg`` including reconnects).
    """

    def _init_io(self) -> None:
        self._closed = False
        self._sock: socket.socket | None = None
        self._ssl_ctx: ssl.SSLContext | None = None
        self._last_rx = 0.0
        self._ping_sent: float | None = None
        self._ping_nonce = 0
        # Silence after which we PING, and after which an unanswered PING means a dead peer.
        self._idle = max(0.05, min(self.timeout / 4, 5.0))
        self._waiting_id: str | None = None
        self._result: int | IrisError | None = None

    # -- public API ----------------------------------------------------------------------------

    def login(self, user: str, token: str | None = None, device: str | None = None) -> None:
        """Connect (failing over across nodes) and log in as ``user``.

        Raises AuthError if the server refuses the login, ConnectionError if no node could be
        reached within ``timeout``.
        """
        if device is not None:
            self.device = device
        ClientCore.login_frame(user, "", self.device or "")  # validate before the network
        self.user = user
        if token is not None:
            self.token = token
        self._closed = False
        self._close_sock()
        self._idx = 0
        self._connect(time.monotonic() + self.timeout, ConnectionError, advance=False)

    def send_msg(self, to: str, body: bytes | str, msg_id: str | None = None) -> str:
        """Send ``body`` to user ``to`` and block until the server ACKs it; returns the msg_id.

        Survives connection loss by reconnecting and resending every unACKed message. Raises
        MailboxFullError / IrisError on a server error for this message, TimeoutError if no ACK
        came within ``timeout`` (the message then stays queued and is resent on reconnect).
        """
        self._require_login()
        deadline = time.monotonic() + self.timeout
        mid, frame = self._core.add_unacked(to, to_body(body), msg_id, self.user)
        self._waiting_id, self._result = mid, None
        try:
            if self._sock is not None and self._core.logged_in:
                try:
                    self._write(nat.encode(frame))
                except ConnectionLost:
                    self._close_sock()  # _run_until reconnects and resends it
            self._run_until(lambda: self._result is not None, deadline, TimeoutError)
            result = self._result
        finally:
            self._waiting_id = None
            self._result = None
        if isinstance(result, IrisError):
            raise result
        return mid

    def recv(self, timeout: float | None = None) -> Message:
        """Return the next delivered message, waiting up to ``timeout`` s (None: forever).

        Raises TimeoutError if none arrives in time.
        """
        self._require_login()
        core = self._core
        if not core.has_message():
            deadline = None if timeout is None else time.monotonic() + timeout
            self._run_until(core.has_message, deadline, TimeoutError)
        msg = core.pop_message()
        assert msg is not None
        self._flush()
        return msg

    def recv_msg(self, timeout: float | None = None) -> bytes:
        """Body of the next delivered message (see ``recv``)."""
        return self.recv(timeout).body

    def close(self) -> None:
        """Close the connection (idempotent). Unacked messages are kept for a later login."""
        self._closed = True
        self._close_sock()

    def __enter__(self) -> IrisClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------

    def _require_login(self) -> None:
        if self._closed:
            raise RuntimeError("client is closed; call login() to reconnect")
        if self.user is None:
            raise RuntimeError("call login() first")

    def _on_complete(self, msg_id: str, result: int | IrisError) -> None:
        if msg_id == self._waiting_id:
            self._result = result

    def _run_until(
        self,
        done: Callable[[], bool],
        deadline: float | None,
        exc_type: type[OSError],
    ) -> None:
        """Pump frames until ``done()``, reconnecting on connection loss.

        With no deadline, a reconnect still gives up after ``timeout`` (raising ConnectionError).
        """
        while not done():
            if self._sock is None:
                if deadline is None:
                    self._connect(time.monotonic() + self.timeout, ConnectionError)
                else:
                    self._connect(deadline, exc_type)
            else:
                try:
                    self._pump(deadline)
                except ConnectionLost:
                    self._close_sock()
                except IrisError:
                    self._close_sock()
                    raise
            if deadline is not None and not done() and time.monotonic() >= deadline:
                raise exc_type("timed out")

    def _pump(self, deadline: float | None) -> None:
        """One read (bounded by the deadline and keepalive), then dispatch what arrived."""
        sock = self._sock
        assert sock is not None
        now = time.monotonic()
        if self._ping_sent is not None:
            if now - self._ping_sent >= self._idle:
                raise ConnectionLost("peer did not answer PING")
            wait = self._ping_sent + self._idle - now
        elif now - self._last_rx >= self._idle:
            self._ping_nonce += 1
            self._ping_sent = now
            self._write(nat.encode((nat.PING, self._ping_nonce)))
            wait = self._idle
        else:
            wait = self._last_rx + self._idle - now
        if deadline is not None:
            wait = min(wait, deadline - now)
        sock.settimeout(max(wait, 0.001))
        try:
            data = sock.recv(_RECV_SIZE)
        except (TimeoutError, ssl.SSLWantReadError):
            return
        except OSError as e:
            raise ConnectionLost(str(e)) from e
        if not data:
            raise ConnectionLost("connection closed by server")
        self._last_rx = time.monotonic()
        self._ping_sent = None
        self._core.feed(data)
        self._flush()

    def _write(self, data: bytes) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            sock.settimeout(self.timeout)
            sock.sendall(data)
        except OSError as e:
            raise ConnectionLost(str(e)) from e

    def _flush(self) -> None:
        data = self._core.take_out()
        if data is None or self._sock is None:
            return
        try:
            self._write(data)
        except ConnectionLost:
            # What we lose are PONGs and DELIVER_ACKs: the server redelivers, dedup absorbs.
            self._close_sock()

    def _open(self, addr: tuple[str, int], deadline: float) -> socket.socket:
        host, port = addr
        sock = socket.create_connection(addr, timeout=max(deadline - time.monotonic(), 0.001))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            if self._ssl_ctx is None:
                self._ssl_ctx = ssl.create_default_context(cafile=self.ca_file)
            try:
                sock = self._ssl_ctx.wrap_socket(sock, server_hostname=host)
            except BaseException:
                sock.close()
                raise
        return sock

    def _connect(self, deadline: float, exc_type: type[OSError], advance: bool = True) -> None:
        """Connect + LOGIN + resend unACKed, trying nodes round-robin with backoff."""
        assert self.user is not None
        core = self._core
        if advance:
            self._idx = (self._idx + 1) % len(self._addrs)
        # One hung node must not eat the whole budget: bound each attempt's handshake.
        attempt_limit = max(self.timeout / 3, 0.5)
        last_err: BaseException | None = None
        for delay in backoff_delays():
            addr = self._addrs[self._idx]
            now = time.monotonic()
            if now >= deadline:
                break
            try:
                self._sock = self._open(addr, min(deadline, now + attempt_limit))
                core.begin_connection()
                self._last_rx = time.monotonic()
                self._ping_sent = None
                login = core.login_frame(self.user, self.token or "", self.device or "")
                self._write(nat.encode(login))
                self._handshake(min(deadline, time.monotonic() + attempt_limit))
                resend = core.resend_frames()
                if resend:
                    self._write(nat.encode_batch(resend))
                return
            except IrisError:
                self._close_sock()
                raise
            except (OSError, ConnectionLost) as e:
                last_err = e
                self._close_sock()
            self._idx = (self._idx + 1) % len(self._addrs)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(delay, remaining))
        raise exc_type(
            f"could not log in to any of {self._addrs} within the time limit: {last_err}"
        ) from last_err

    def _handshake(self, deadline: float) -> None:
        core = self._core
        while not core.logged_in:
            if time.monotonic() >= deadline:
                raise ConnectionLost("no LOGIN_OK in time")
            self._pump(deadline)

    def _close_sock(self) -> None:
        sock, self._sock = self._sock, None
        self._core.logged_in = False
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
