"""``GET /health`` and ``GET /metrics`` on the HTTP port.

A deliberately tiny HTTP/1.1 responder on the worker's own event loop (one request per
connection, ``Connection: close``): two read-only endpoints for operators and Prometheus do not
justify a web framework in the server's dependency tree.

A connection has ``HTTP_TIMEOUT_S`` for the whole exchange: a client that sends nothing, or a
request byte by byte (slowloris), gets ``408`` and a close instead of holding a descriptor of
the supervisor forever; one that does not read its answer is aborted. At most
``MAX_HTTP_CONNECTIONS`` are open at once per process: more get ``503`` and a close, so that
opening connections faster than the deadline ends them cannot exhaust the descriptors.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable
from typing import Any

MAX_REQUEST = 8192
# Request, answer and the client reading it. The supervisor's answers wait at most
# WORKER_QUERY_TIMEOUT_S (2 s) on the workers; 10 s is also Prometheus' default scrape timeout.
HTTP_TIMEOUT_S = 10.0
# Operators and a Prometheus scraper need a handful; the supervisor opens one per worker.
MAX_HTTP_CONNECTIONS = 512


class HttpEndpoint(asyncio.Protocol):
    """Serves the routes given as {path: () -> (content_type, body)}."""

    open_count = 0  # connections of this class open in this process

    def __init__(self, routes: dict[str, Callable[[], Any]]) -> None:
        self.routes = routes
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.handled = False  # a request was read: later bytes are ignored
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        HttpEndpoint.open_count += 1
        if HttpEndpoint.open_count > MAX_HTTP_CONNECTIONS:
            self.handled = True
            self._reply(503, "text/plain", b"too many HTTP connections\n")
            return
        self._timer = asyncio.get_running_loop().call_later(HTTP_TIMEOUT_S, self._timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        HttpEndpoint.open_count -= 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport is None:
            return
        if not self.handled:
            self.handled = True
            self._reply(408, "text/plain", b"request timeout\n")
        else:
            # Answered (or answering) but the client does not read: drop what is unsent.
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.handled:
            return
        self.buf += data
        if b"\r\n\r\n" not in self.buf and b"\n\n" not in self.buf:
            if len(self.buf) > MAX_REQUEST:
                self.handled = True
                self._reply(431, "text/plain", b"request header too large\n")
            return
        self.handled = True
        line = self.buf.split(b"\n", 1)[0].decode("latin-1").strip()
        parts = line.split()
        if len(parts) < 2:
            self._reply(400, "text/plain", b"bad request\n")
            return
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            self._reply(405, "text/plain", b"only GET\n")
            return
        route = self.routes.get(target)
        if route is None:
            self._reply(404, "text/plain", b"not found; try /health or /metrics\n")
            return
        result = route()
        if inspect.isawaitable(result):
            # The supervisor's routes ask the workers first.
            task = asyncio.ensure_future(result)
            task.add_done_callback(lambda t: self._answer(method, t.result()))
        else:
            self._answer(method, result)

    def _answer(self, method: str, result: tuple[str, bytes]) -> None:
        ctype, body = result
        self._reply(200, ctype, b"" if method == "HEAD" else body)

    def _reply(self, status: int, ctype: str, body: bytes) -> None:
        reason = {
            200: "OK",
            400: "Bad Request",
            404: "Not Found",
            405: "Method Not Allowed",
            408: "Request Timeout",
            431: "Request Header Fields Too Large",
            503: "Service Unavailable",
        }[status]
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(head + body)
        self.transport.close()


def json_route(fn: Callable[[], dict]) -> Callable[[], tuple[str, bytes]]:
    return lambda: ("application/json", json.dumps(fn()).encode() + b"\n")
