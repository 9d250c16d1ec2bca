"""One worker's part in pair replication: its stream out, the peer's stream in, the listener.

Worker ``i`` of node a replicates to worker ``i`` of node b and back (both nodes run the same
``--workers``, so a user has the same home index on both). Each direction is its own TCP link,
opened by the origin of the stream: a dials b for a's stream ``i``, b dials a for b's. The
replication port is bound by every worker with ``SO_REUSEPORT``; the worker that accepts a link
reads its HELLO and, if it announces another worker's stream, passes the socket to that worker
exactly like a client hand-off.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

import iris_native as N

from iris_fast.replication.link import ReplLink
from iris_fast.replication.origin import OriginStream, peer_problem
from iris_fast.replication.replica import ReplicaStream

if TYPE_CHECKING:
    from iris_fast.config import ServerConfig
    from iris_fast.server.worker import Worker
    from iris_fast.storage.mailbox import MailboxStore

log = logging.getLogger(__name__)

TICK_S = 0.25
PEER_NODE_KEY = b"peer_node"
# An accepted link must say REPL_HELLO within this time (our dialers send it on connect).
HELLO_TIMEOUT_S = 5.0
# The user name under which an accepted replication socket travels in a hand-off (a real user
# id cannot contain NUL).
HANDOFF_USER = "\0repl"


def parse_peer(peer: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); ValueError with a clear message otherwise."""
    host, sep, port = peer.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--peer must be HOST:PORT, got {peer!r}")
    return host.strip("[]"), int(port)


class Replicator:
    """Streams of one worker, the replication listener and the liveness timer."""

    def __init__(self, config: ServerConfig, worker: Worker, store: MailboxStore) -> None:
        self.config = config
        self.worker = worker
        self.store = store
        self.index = config.worker_index
        self.workers = config.workers
        self.node_id = config.node_id
        self.peer = parse_peer(config.peer) if config.peer else None
        self.peer_node: str | None = None
        # Only this node id may be our peer: --peer-node-id, else the first one that paired with
        # this data directory (docs/replication.md, "Pairing").
        stored = store.load_meta(PEER_NODE_KEY)
        self.expected_peer = config.peer_node_id or (stored.decode() if stored else None)
        if config.peer_node_id and stored != config.peer_node_id.encode():
            store.put_meta(PEER_NODE_KEY, config.peer_node_id.encode())
        self.peer_epoch = 0
        self.timeout = config.peer_timeout_s
        self.heartbeat = config.heartbeat_s
        self.origin = OriginStream(self, store) if self.peer else None
        self.replica = ReplicaStream(self)
        self.refused = 0
        self._server: asyncio.AbstractServer | None = None
        self._timer: asyncio.Task | None = None
        self._accepting: set[ReplLink] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.config.repl_port:
            self._server = await loop.create_server(
                self._accepted,
                self.config.repl_host,
                self.config.repl_port,
                reuse_port=True,
            )
        if self.origin is not None:
            self.origin.start()
        self._timer = loop.create_task(self._tick_loop())

    # ---- state for /health and /metrics -----------------------------------------------------

    @property
    def degraded(self) -> bool:
        """Configured with a peer but not replicating synchronously to it right now."""
        return self.origin is not None and not self.origin.healthy

    def health(self) -> dict[str, Any]:
        o = self.origin
        return {
            "peer": self.config.peer,
            "peer_node": self.peer_node,
            "peer_up": o is not None and o.link is not None,
            "degraded": self.degraded,
            "catching_up": bool(o and o.catching_up),
            "lsn": o.committed if o else self.store.lsn,
            "peer_acked": o.acked if o else 0,
            "lag_records": o.lag_records() if o else 0,
            "lag_ms": round(o.lag_ms(), 1) if o else 0.0,
            "applied": self.replica.applied,
            "apply_lag_records": self.replica.lag_records(),
            "inbound_up": self.replica.link is not None,
        }

    # ---- accepting ----------------------------------------------------------------------------

    def adopt(self, sock: socket.socket, preamble: bytes) -> None:
        """A replication socket handed over by the worker that accepted it."""
        loop = asyncio.get_running_loop()

        async def attach() -> None:
            try:
                await loop.connect_accepted_socket(lambda: self._accepted(preamble), sock)
            except Exception as exc:  # pragma: no cover - socket gone meanwhile
                log.warning("adopting a replication link failed: %s", exc)
                sock.close()

        loop.create_task(attach())

    def _accepted(self, preamble: bytes = b"") -> ReplLink:
        link = ReplLink(self, preamble, keep_raw=True)
        self._accepting.add(link)
        return link

    def on_frame(self, link: ReplLink, f: tuple) -> None:
        """First frame of an accepted link (the acceptor is the link's owner until then)."""
        self._accepting.discard(link)
        if f[0] != N.REPL_HELLO:
            self.refuse(link, f"first frame must be REPL_HELLO, got type 0x{f[0]:02x}")
            return
        _, version, node, _epoch, workers, _flags, entries = f
        problem = peer_problem(self.node_id, self.workers, version, node, workers)
        if problem is None and (len(entries) != 1 or not 0 <= entries[0][0] < self.workers):
            problem = f"HELLO names streams {entries}; expected one of 0..{self.workers - 1}"
        if problem is None:
            problem = self.not_our_peer(node)
        if problem is not None:
            self.refuse(link, problem)
            return
        stream = entries[0][0]
        if stream == self.index:
            self.peer_seen(node)
            self.replica.on_hello(link, f)
            return
        handoff = self.worker.handoff
        raw = bytes(link.raw or b"")
        link.raw = None
        try:
            if handoff is None:
                raise OSError("no hand-off channel")
            handoff.send(stream, link.transport.get_extra_info("socket").fileno(),
                         HANDOFF_USER, raw)  # fmt: skip
        except Exception as exc:
            log.info("replication link for stream %d not handed off (%s); peer will redial",
                     stream, exc)  # fmt: skip
        link.owner = _Gone()
        link.close()

    def check_peer(self, version: int, node: str, workers: int) -> str | None:
        """Why a peer's HELLO cannot be accepted (None: it can)."""
        return peer_problem(self.node_id, self.workers, version, node, workers) or (
            self.not_our_peer(node)
        )

    def not_our_peer(self, node: str) -> str | None:
        want = self.expected_peer
        if want is None or node == want:
            return None
        how = "--peer-node-id" if self.config.peer_node_id else (
            "the first peer of this data directory; --peer-node-id changes it")  # fmt: skip
        return f"node {node!r} is not this node's peer {want!r} ({how})"

    def peer_seen(self, node: str) -> None:
        """A HELLO from ``node`` was accepted: the first one pairs the data directory with it."""
        if self.expected_peer is None:
            self.expected_peer = node
            self.store.put_meta(PEER_NODE_KEY, node.encode())
            log.info("this data directory now replicates with peer %s only", node)

    def refuse(self, link: ReplLink, problem: str) -> None:
        self.refused += 1
        log.error("replication link from %s refused: %s", link.peername(), problem)
        link.close()

    def link_lost(self, link: ReplLink) -> None:
        self._accepting.discard(link)  # an accepted link that never said HELLO

    def link_state_changed(self) -> None:
        o = self.origin
        if o is not None and o.link is not None and self.replica.link is not None:
            # Both directions are up: each side has told the other whether it wrote while apart.
            o.wrote_while_apart = False

    # ---- liveness -----------------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        last_beat = 0.0
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            beat = now - last_beat >= self.heartbeat
            if beat:
                last_beat = now
            for link in [k for k in self._accepting if now - k.opened > HELLO_TIMEOUT_S]:
                self._accepting.discard(link)
                self.refuse(link, f"no REPL_HELLO within {HELLO_TIMEOUT_S:g} s")
            if self.origin is not None:
                self.origin.tick(now, self.timeout, beat)
            self.replica.tick(now, self.timeout, beat)

    async def close(self, settle_s: float) -> None:
        """Stop: give the peer up to ``settle_s`` to acknowledge what we committed."""
        if self.origin is not None and settle_s > 0:
            await self.origin.settle(settle_s)
        if self._timer is not None:
            self._timer.cancel()
        if self._server is not None:
            self._server.close()
        if self.origin is not None:
            self.origin.close()
        self.replica.close()


class _Gone:
    """Owner of a link that was handed off: ignores the rest."""

    def on_frame(self, link: ReplLink, f: tuple) -> None:
        pass

    def link_lost(self, link: ReplLink) -> None:
        pass
