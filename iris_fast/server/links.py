"""Worker-to-worker plumbing on one node: frame links and connection hand-off.

Every user has a *home worker* (``home_of``). Its home holds the user's sessions, its mailbox
state and the dedup authority for messages sent to it. Two mechanisms make that true:

* **Hand-off.** The kernel spreads new connections over the workers (``SO_REUSEPORT``). When a
  user logs in on a worker that is not its home, that worker checks the credentials, then passes
  the socket's file descriptor to the home worker over a Unix ``SOCK_SEQPACKET`` connection
  (``SCM_RIGHTS``), together with any bytes that arrived after ``LOGIN``. The home adopts the
  socket; the client never notices.
* **Links.** A SEND is handled by the sender's home (where its connection lives) and forwarded
  to the recipient's home as ``ROUTE_SEND`` over a Unix stream link; the answer comes back as
  ``ROUTE_ACK`` / ``ROUTE_ERROR``. One link per ordered pair of workers; frames are batched per
  loop tick exactly like client writes.

All sockets are Linux abstract Unix sockets named after the node's data directory, so there are
no files to clean up and no path-length limit. Abstract sockets have no file permissions: any
process on the machine can connect to them (their names are listed in ``/proc/net/unix``). So
every connection to them is checked, before anything is read from it, by what the kernel says
about its peer (``SO_PEERCRED``, ``PeerAuth``): only a sibling worker (same user, same
supervisor) gets through; anything else is refused, counted and logged.
"""

from __future__ import annotations

import array
import asyncio
import hashlib
import logging
import os
import socket
import struct
import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import iris_native as N

from iris_fast.server.batching import BatchedSender

if TYPE_CHECKING:
    from iris_fast.server.worker import Worker

log = logging.getLogger(__name__)

# The largest client frame (--max-frame is at most 16 MiB) plus what a ROUTE_SEND adds to it.
LINK_MAX_FRAME = (1 << 24) + 1024
RECONNECT_DELAY_S = 0.05
_HANDOFF_HEAD = struct.Struct(">2sB")
_HANDOFF_MAGIC = b"H1"
# A hand-off carries the user id and at most one read's worth of bytes that followed LOGIN.
HANDOFF_MAX = 512 * 1024
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
REFUSAL_LOG_INTERVAL_S = 1.0


def home_of(user: str, workers: int) -> int:
    """The worker that owns ``user``: stable across processes and restarts (CRC-32, not hash())."""
    return zlib.crc32(user.encode()) % workers if workers > 1 else 0


def socket_name(data_dir: str, kind: str, index: int) -> str:
    """Abstract Unix socket name of one worker's ``kind`` endpoint for the node in ``data_dir``."""
    node = hashlib.blake2s(os.path.abspath(data_dir).encode(), digest_size=8).hexdigest()
    return f"\0iris-fast-{node}-{kind}-{index}"


def connect_unix(name: str) -> socket.socket:
    """A connected, non-blocking Unix stream socket to ``name`` (abstract names allowed).

    uvloop's ``create_unix_connection(path=...)`` does not accept Linux abstract names (the
    leading NUL ends its C string), so we connect here and hand it the socket. A local Unix
    connect completes at once or fails at once.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(name)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


# ---- who may talk to a worker ---------------------------------------------------------


def parent_of(pid: int) -> int | None:
    """The parent pid of process ``pid`` (from /proc), or None if it is gone."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.read(fd, 1024)
    finally:
        os.close(fd)
    # "pid (comm) state ppid ...": comm may hold spaces and ")", so split after the last ")".
    try:
        return int(data[data.rindex(b")") + 2 :].split(b" ", 2)[1])
    except (ValueError, IndexError):
        return None


class PeerAuth:
    """Decides whether a local process may use this worker's hand-off and link sockets.

    Allowed: a process of our own effective uid whose parent is our parent, i.e. a sibling
    worker started by this node's supervisor. The uid check stops other local users; the
    parent check stops every other process of the same user (a shell, another service, a
    second node). Both facts come from the kernel (``SO_PEERCRED`` at accept) and ``/proc``,
    not from anything the peer writes; a connection is checked once, when it is accepted, so
    a sibling that dies takes its connection with it and a reused pid gains nothing. Root can
    ptrace the workers anyway: root on the node is outside the threat model.
    """

    def __init__(self, stats: Any = None) -> None:
        self.uid = os.geteuid()
        self.parent = os.getppid()
        self.stats = stats
        self.refused = 0
        self._logged_at = 0.0
        self._unlogged = 0

    def problem(self, pid: int, uid: int) -> str | None:
        """Why the process ``pid`` running as ``uid`` may not talk to us (None: it may)."""
        if uid != self.uid:
            return f"uid {uid} is not this node's uid {self.uid}"
        if pid <= 0:
            return "the peer's pid is unknown (another pid namespace?)"
        parent = parent_of(pid)
        if parent is None:
            return f"pid {pid} is gone"
        if parent != self.parent or self.parent <= 1:
            return f"pid {pid} is not a worker of this node (its parent is {parent})"
        return None

    def refuse(self, what: str, pid: int, uid: int, reason: str) -> None:
        """Count a refused peer and log it (at most once a second, with what was not logged)."""
        self.refused += 1
        if self.stats is not None:
            self.stats.local_peer_refused += 1
        now = time.monotonic()
        if now - self._logged_at < REFUSAL_LOG_INTERVAL_S:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more refusals not logged)" if self._unlogged else ""
        self._logged_at, self._unlogged = now, 0
        log.warning("refused %s from pid %d uid %d: %s%s", what, pid, uid, reason, more)


def peer_credentials(sock: Any) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a connected Unix socket."""
    pid, uid, _gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return pid, uid


# ---- links ----------------------------------------------------------------------------


class LinkIn(asyncio.Protocol):
    """The receiving end of a link from another worker: frames in, handed to the worker."""

    def __init__(self, worker: Worker, peers: PeerAuth) -> None:
        self.worker = worker
        self.peers = peers
        self.decoder = N.Decoder(LINK_MAX_FRAME, internal=True)
        self.peer = -1
        self.refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Before any frame is read: a forged ROUTE_SEND must never reach the worker.
        try:
            pid, uid = peer_credentials(transport.get_extra_info("socket"))
            problem = self.peers.problem(pid, uid)
        except OSError as exc:
            pid, uid, problem = -1, -1, f"no peer credentials: {exc}"
        if problem is not None:
            self.refused = True
            self.peers.refuse("a worker link", pid, uid, problem)
            transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        w = self.worker
        for f in self.decoder.feed(data):
            t = f[0]
            if t == N.ROUTE_SEND:
                w.on_route_send(f[1], f[2], f[3], f[4], f[5], f[6])
            elif t == N.ROUTE_ACK:
                w.on_route_ack(self.peer, f[1], f[2], f[3])
            elif t == N.ROUTE_ERROR:
                w.on_route_error(self.peer, f[1], f[2], f[3], f[4])
            elif t == N.LINK_HELLO:
                self.peer = f[1]
            else:
                log.error("unexpected frame on worker link from %d: %r", self.peer, f[:2])


class LinkOut(BatchedSender, asyncio.Protocol):
    """The sending end of a link to worker ``peer``: frames queued, one write per tick."""

    _max_frame = LINK_MAX_FRAME

    def __init__(self, owner: Links, peer: int) -> None:
        self.owner = owner
        self.peer = peer
        self.transport: asyncio.Transport | None = None

    def _schedule_flush(self) -> None:
        # Flushed with the worker's client connections, at the end of the same tick.
        self.owner.worker.schedule_flush(self)  # type: ignore[arg-type]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._out = None
        self.owner.link_lost(self.peer)


class Links:
    """Outgoing links to every other worker, reconnecting while a peer restarts."""

    def __init__(
        self,
        worker: Worker,
        data_dir: str,
        index: int,
        workers: int,
        peers: PeerAuth | None = None,
    ) -> None:
        self.worker = worker
        self.peers = peers if peers is not None else PeerAuth(worker.stats)
        self.data_dir = data_dir
        self.index = index
        self.workers = workers
        self.out: dict[int, LinkOut] = {}
        # Answers (ACK/ERROR) for a peer whose link is not up yet; sent once it is.
        self._backlog: dict[int, list[tuple]] = {}
        self._connecting: set[int] = set()
        self._closed = False
        self._server: asyncio.AbstractServer | None = None
        self.epoch = int.from_bytes(os.urandom(8), "big")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        name = socket_name(self.data_dir, "link", self.index)
        self._server = await loop.create_unix_server(lambda: LinkIn(self.worker, self.peers), name)
        for peer in range(self.workers):
            if peer != self.index:
                self._connect_soon(peer, 0.0)

    def up(self, peer: int) -> bool:
        return peer in self.out

    def send(self, peer: int, frame: tuple) -> bool:
        """Queue ``frame`` for ``peer``; False while the link is down (the caller keeps it)."""
        link = self.out.get(peer)
        if link is None:
            return False
        link.send(frame)
        return True

    def send_or_hold(self, peer: int, frame: tuple) -> None:
        """Send an answer to ``peer``, holding it until the link is up if it is not.

        Answers are not replayed by anyone, so they must not be dropped while a link is still
        connecting (at start, or while ``peer`` restarts: then the held answers go to the new
        process, which ignores the ones it knows nothing of).
        """
        link = self.out.get(peer)
        if link is None:
            self._backlog.setdefault(peer, []).append(frame)
        else:
            link.send(frame)

    def link_lost(self, peer: int) -> None:
        self.out.pop(peer, None)
        if not self._closed:
            # A peer that stops (SIGTERM) or dies closes it; the supervisor logs restarts.
            log.info("link to worker %d lost; reconnecting", peer)
            self._connect_soon(peer, RECONNECT_DELAY_S)

    def _connect_soon(self, peer: int, delay: float) -> None:
        if peer in self._connecting:
            return
        self._connecting.add(peer)
        asyncio.get_running_loop().create_task(self._connect(peer, delay))

    async def _connect(self, peer: int, delay: float) -> None:
        loop = asyncio.get_running_loop()
        name = socket_name(self.data_dir, "link", peer)
        try:
            while not self._closed:
                await asyncio.sleep(delay)
                delay = RECONNECT_DELAY_S
                try:
                    _, link = await loop.create_unix_connection(
                        lambda: LinkOut(self, peer), sock=connect_unix(name)
                    )
                except OSError:
                    continue
                link.send((N.LINK_HELLO, self.index, os.getpid(), self.epoch))
                for frame in self._backlog.pop(peer, ()):
                    link.send(frame)
                self.out[peer] = link
                log.info("link to worker %d up", peer)
                self.worker.on_link_up(peer)
                return
        finally:
            self._connecting.discard(peer)

    def close(self) -> None:
        self._closed = True
        if self._server is not None:
            self._server.close()
        for link in list(self.out.values()):
            if link.transport is not None:
                link.flush()
                link.transport.close()


# ---- hand-off -------------------------------------------------------------------------


class HandoffError(Exception):
    """The home worker could not be given the connection (restarting, queue full)."""


class Handoff:
    """Receives adopted client sockets; sends ours to their home worker.

    One ``SOCK_SEQPACKET`` connection per ordered pair of workers, not a datagram socket: a Unix
    datagram socket queues at most ``net.unix.max_dgram_qlen`` datagrams (10 by default), and
    a login burst overflowed it at once (100,000 logins on 6 workers: one EAGAIN and retry per
    hand-off, 40 s). A connected socket is bounded by its send buffer in bytes, keeps message
    boundaries like a datagram, and is checked once, when it is accepted (``PeerAuth``).
    """

    def __init__(
        self,
        data_dir: str,
        index: int,
        adopt: Callable[[socket.socket, str, bytes], Any],
        peers: PeerAuth | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.index = index
        self.adopt = adopt
        self.peers = peers if peers is not None else PeerAuth()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.setblocking(False)
        self.listener.bind(socket_name(data_dir, "handoff", index))
        self.listener.listen(256)
        self._out: dict[int, socket.socket] = {}  # peer index -> our connection to it
        self._in: dict[int, socket.socket] = {}  # fd -> accepted connection from a sibling
        self._buf = bytearray(HANDOFF_MAX)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.listener.fileno(), self._accept)

    def _connection_to(self, peer: int) -> socket.socket:
        sock = self._out.get(peer)
        if sock is not None:
            return sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)
        # Room for a login burst's hand-offs (and a LOGIN's trailing bytes, at most one
        # read's worth) while the home worker is busy.
        for opt in (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF):
            if opt is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
                break
            except OSError:
                continue
        try:
            # A local connect completes at once, or fails at once (not listening: restarting;
            # EAGAIN: its accept queue is full).
            sock.connect(socket_name(self.data_dir, "handoff", peer))
        except OSError:
            sock.close()
            raise
        self._out[peer] = sock
        return sock

    def send(self, peer: int, fd: int, user: str, preamble: bytes) -> None:
        """Give the socket ``fd`` of logged-in ``user`` to worker ``peer``."""
        u = user.encode()
        payload = _HANDOFF_HEAD.pack(_HANDOFF_MAGIC, len(u)) + u + preamble
        try:
            sock = self._connection_to(peer)
        except OSError as exc:
            raise HandoffError(f"worker {peer} unavailable: {os.strerror(exc.errno or 0)}") from exc
        try:
            sock.sendmsg(
                [payload],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
                socket.MSG_NOSIGNAL,
            )
        except BlockingIOError as exc:
            raise HandoffError(f"worker {peer} busy: its hand-off queue is full") from exc
        except OSError as exc:
            # The peer went away (restarting): the next try connects to its successor.
            self._out.pop(peer, None)
            sock.close()
            raise HandoffError(f"worker {peer} unavailable: {os.strerror(exc.errno or 0)}") from exc

    def _accept(self) -> None:
        assert self._loop is not None
        for _ in range(64):
            try:
                conn, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("hand-off accept failed: %s", exc)
                return
            try:
                pid, uid = peer_credentials(conn)
                problem = self.peers.problem(pid, uid)
            except OSError as exc:
                pid, uid, problem = -1, -1, f"no peer credentials: {exc}"
            if problem is not None:
                # Not a sibling worker: whatever it sent (a user, a replication link, sockets)
                # is closed unread with the connection.
                self.peers.refuse("a hand-off", pid, uid, problem)
                conn.close()
                continue
            conn.setblocking(False)
            self._in[conn.fileno()] = conn
            self._loop.add_reader(conn.fileno(), self._readable, conn)

    def _drop(self, conn: socket.socket) -> None:
        fd = conn.fileno()
        if fd >= 0 and self._in.pop(fd, None) is not None and self._loop is not None:
            self._loop.remove_reader(fd)
        conn.close()

    def _readable(self, conn: socket.socket) -> None:
        for _ in range(64):
            try:
                # Into one reusable buffer: a fresh large bytes object per hand-off leaves
                # resident heap pages behind (measured: +300 bytes per connection).
                nbytes, ancdata, _flags, _addr = conn.recvmsg_into(
                    [self._buf], socket.CMSG_SPACE(4 * 4)
                )
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as exc:
                log.error("hand-off receive failed: %s", exc)
                self._drop(conn)
                return
            fds: list[int] = []
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(cdata) - len(cdata) % 4
                    fds.extend(array.array("i", cdata[:usable]))
            if not fds:
                if nbytes == 0:  # the sibling closed its end (it stopped or restarts)
                    self._drop(conn)
                    return
                continue
            data = memoryview(self._buf)[:nbytes]
            try:
                magic, ulen = _HANDOFF_HEAD.unpack_from(data, 0)
                if magic != _HANDOFF_MAGIC:
                    raise ValueError("bad magic")
                user = bytes(data[3 : 3 + ulen]).decode()
                preamble = bytes(data[3 + ulen :])
            except (ValueError, struct.error, UnicodeDecodeError):
                log.error("malformed hand-off message dropped")
                for fd in fds:
                    os.close(fd)
                continue
            sock = socket.socket(fileno=fds[0])
            for extra in fds[1:]:
                os.close(extra)
            self.adopt(sock, user, preamble)

    def close(self) -> None:
        if self._loop is not None:
            try:
                self._loop.remove_reader(self.listener.fileno())
            except RuntimeError:
                pass
        for conn in list(self._in.values()):
            self._drop(conn)
        for sock in self._out.values():
            sock.close()
        self._out.clear()
        self.listener.close()
