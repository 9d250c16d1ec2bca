"""I/O-free protocol state shared by the blocking and the asyncio client.

Everything that decides *what* goes on the wire lives here (frame building, resend of unACKed
messages, receive-side dedup, the DELIVER_ACK policy, error mapping); ``sync.py`` and ``aio.py``
only move bytes and wait.
"""

from __future__ import annotations

import heapq
import logging
import re
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import iris_native as nat

from iris_fast.protocol import deliver_len

log = logging.getLogger("iris_fast.client")

PROTOCOL_VERSION = 1

# Error codes (docs/protocol.md, "Errors").
BAD_FRAME = 1
FRAME_TOO_LARGE = 2
UNKNOWN_TYPE = 3
BAD_UTF8 = 4
NOT_LOGGED_IN = 5
AUTH_FAILED = 6
UNSUPPORTED_VERSION = 7
ALREADY_LOGGED_IN = 8
MAILBOX_FULL = 9
TOO_MANY_ERRORS = 10
RATE_LIMITED = 11
BAD_RECIPIENT = 12
SHUTTING_DOWN = 13
LOGIN_TIMEOUT = 14
BAD_ACK = 15
TOO_MANY_CONNECTIONS = 16

# Connection-level errors after which the server closes and another node (or the same one later)
# can serve us: handled by reconnecting, never surfaced.
_RECONNECT_CODES = frozenset({SHUTTING_DOWN, LOGIN_TIMEOUT, TOO_MANY_CONNECTIONS})
_AUTH_CODES = frozenset({AUTH_FAILED, UNSUPPORTED_VERSION})
# Connection-level errors that a reconnect would only repeat.
_FATAL_CODES = frozenset({FRAME_TOO_LARGE, TOO_MANY_ERRORS})

DEDUP_WINDOW = 100_000
# The server's max_frame bounds what *we* send; a DELIVER carries more header than the SEND it came
# from, so the decoder for server frames must accept somewhat more. 16 MiB is a sanity bound only.
_DECODER_MAX_FRAME = 1 << 24
_LOGIN_OK_DEGRADED = 0x01

BACKOFF_START = 0.05
BACKOFF_MAX = 1.0


class IrisError(Exception):
    """An ``ERROR`` frame from the server (``code`` as in docs/protocol.md)."""

    def __init__(self, code: int, reason: str, msg_id: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.msg_id = msg_id

    def __str__(self) -> str:
        where = f" (msg_id {self.msg_id})" if self.msg_id else ""
        return f"[{self.code}] {self.reason}{where}"


class AuthError(IrisError):
    """Login refused: bad/expired token, invalid user id or unsupported protocol version."""


class MailboxFullError(IrisError):
    """The recipient's mailbox is at its limit; the message was not stored."""


class RateLimitedError(IrisError):
    """Over a rate limit; nothing was stored. ``retry_after`` (seconds) says when the same
    message would pass; the connection stays usable."""

    def __init__(self, code: int, reason: str, msg_id: str = "") -> None:
        super().__init__(code, reason, msg_id)
        m = _RETRY_IN.search(reason)
        self.retry_after = float(m.group(1)) if m else 1.0


_RETRY_IN = re.compile(r"retry in ([0-9.]+) s")


class ConnectionLost(Exception):
    """Internal: the current connection is unusable; reconnect (and resend)."""


def error_for(code: int, reason: str, msg_id: str = "") -> IrisError:
    """Map an ERROR frame to the most specific exception class."""
    if code == MAILBOX_FULL:
        return MailboxFullError(code, reason, msg_id)
    if code == RATE_LIMITED:
        return RateLimitedError(code, reason, msg_id)
    if code in _AUTH_CODES:
        return AuthError(code, reason, msg_id)
    return IrisError(code, reason, msg_id)


def new_msg_id() -> str:
    """16 random bytes, hex encoded (unique per sender, as the protocol expects)."""
    return uuid.uuid4().hex


def to_body(body: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(body, str):
        return body.encode("utf-8")
    return bytes(body)


def _str8_len(value: str, what: str, *, allow_empty: bool = False) -> int:
    n = len(value.encode("utf-8"))
    if n > 255 or (n == 0 and not allow_empty):
        raise ValueError(f"{what} must be 1..255 bytes of UTF-8, got {n}")
    return n


def backoff_delays() -> Iterable[float]:
    """0.05 s doubling up to 1 s, forever."""
    delay = BACKOFF_START
    while True:
        yield delay
        delay = min(delay * 2, BACKOFF_MAX)


def build_addrs(
    host: str, port: int, nodes: Iterable[tuple[str, int]] | None
) -> list[tuple[str, int]]:
    addrs = [(host, int(port))]
    for h, p in nodes or ():
        if (h, int(p)) not in addrs:
            addrs.append((h, int(p)))
    return addrs


@dataclass(frozen=True, slots=True)
class Message:
    """A delivered message. ``ts`` is the server's receive time of the SEND in ms since epoch."""

    sender: str
    msg_id: str
    body: bytes
    ts: int


class _Entry:
    """An inbox entry. ``gen``/``tag`` identify the delivery that must be acked once handed."""

    __slots__ = ("gen", "tag", "msg")

    def __init__(self, gen: int, tag: int, msg: Message) -> None:
        self.gen = gen
        self.tag = tag
        self.msg = msg


class DedupWindow:
    """Bounded, insertion-ordered set of recently seen ``(sender, msg_id)``."""

    __slots__ = ("_keys", "_size")

    def __init__(self, size: int = DEDUP_WINDOW) -> None:
        self._keys: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._size = size

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: tuple[str, str]) -> None:
        self._keys[key] = None
        if len(self._keys) > self._size:
            self._keys.popitem(last=False)


class ClientCore:
    """Protocol state of one logical client session across reconnects.

    A *generation* is one connection; DELIVER tags are only meaningful within their generation
    and must never be acked on a later connection.
    """

    def __init__(self, on_complete: Callable[[str, int | IrisError], None]) -> None:
        # Called for each of our messages the server ACKed or refused, as soon as the frame is
        # processed: a later frame of the same read may raise, and the outcome must not be lost.
        self.on_complete = on_complete
        self.unacked: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self.dedup = DedupWindow()
        self.inbox: deque[_Entry] = deque()
        # Inbox entries not handed yet, so that a redelivery of one adopts the new tag instead of
        # being acked (and deleted on the server) before the application saw the message.
        self._pending: dict[tuple[str, str], _Entry] = {}
        self.generation = 0
        self.highest_tag = 0
        self.acked_tag = 0
        # Tags of current-generation inbox entries; min-heap with lazy deletion.
        self._cur_heap: list[int] = []
        self._cur_tags: set[int] = set()
        self.logged_in = False
        self.max_frame = 65_536
        self.node = ""
        self.login_flags = 0
        self.last_ack_flags = 0
        # Deliveries of messages already received (a redelivery after a failover): dropped.
        self.duplicates_dropped = 0
        self.out: list[tuple] = []
        self.decoder = nat.Decoder(max_frame=_DECODER_MAX_FRAME)

    # -- connection lifecycle ------------------------------------------------------------------

    def begin_connection(self) -> None:
        """Start a new generation; call before the LOGIN of every (re)connect."""
        self.generation += 1
        self.highest_tag = 0
        self.acked_tag = 0
        self._cur_heap.clear()
        self._cur_tags.clear()
        self.logged_in = False
        self.out.clear()
        self.decoder = nat.Decoder(max_frame=_DECODER_MAX_FRAME)

    @staticmethod
    def login_frame(user: str, token: str, device: str = "") -> tuple:
        _str8_len(user, "user id")
        if not device:
            return (nat.LOGIN, PROTOCOL_VERSION, user, token)
        _str8_len(device, "device id")
        return (nat.LOGIN, PROTOCOL_VERSION, user, token, device)

    def resend_frames(self) -> list[tuple]:
        """SENDs for every unACKed message, oldest first, with their original msg_ids."""
        return [(nat.SEND, mid, to, body) for mid, (to, body) in self.unacked.items()]

    @property
    def degraded(self) -> bool:
        return bool(self.last_ack_flags & nat.ACK_DEGRADED)

    # -- sending -------------------------------------------------------------------------------

    def add_unacked(
        self, to: str, body: bytes, msg_id: str | None, sender: str | None = None
    ) -> tuple[str, tuple]:
        """Validate and register a message *before* it is written; returns (msg_id, SEND).

        ``sender`` is our user id (None: assume the longest, 255 bytes).
        """
        mid = new_msg_id() if msg_id is None else msg_id
        n_id = _str8_len(mid, "msg_id")
        n_to = _str8_len(to, "recipient")
        # The server refuses a message whose DELIVER (which names the sender instead of the
        # recipient, plus tag and timestamp) would not fit max_frame, as well as a SEND that
        # does not: both bounds, here, so that it is never sent (or resent) for nothing.
        size = max(
            1 + 1 + n_id + 1 + n_to + len(body),
            deliver_len("x" * 255 if sender is None else sender, mid, len(body)),
        )
        if size > self.max_frame:
            raise IrisError(
                FRAME_TOO_LARGE, f"frame of {size} bytes exceeds max_frame {self.max_frame}", mid
            )
        self.unacked[mid] = (to, body)
        return mid, (nat.SEND, mid, to, body)

    # -- receiving -----------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Process bytes from the socket; replies to send are queued in ``self.out``.

        Raises ConnectionLost (reconnect), AuthError or IrisError (fatal for this connection).
        """
        for frame in self.decoder.feed(data):
            self.handle(frame)

    def handle(self, frame: tuple) -> None:
        kind = frame[0]
        if kind == nat.DELIVER:
            self._on_deliver(frame[1], frame[2], frame[3], frame[4], frame[5])
        elif kind == nat.ACK:
            mid, flags = frame[1], frame[2]
            # ACKs go to the sending *user*: another device's ACKs are not ours to complete.
            if self.unacked.pop(mid, None) is not None:
                self.last_ack_flags = flags
                self.on_complete(mid, flags)
        elif kind == nat.PING:
            self.out.append((nat.PONG, frame[1]))
        elif kind == nat.PONG:
            pass
        elif kind == nat.LOGIN_OK:
            _, _version, flags, node, max_frame = frame
            self.logged_in = True
            self.login_flags = flags
            self.node = node
            self.max_frame = max_frame
        elif kind == nat.ERROR:
            self._on_error(frame[1], frame[2], frame[3])
        elif kind == nat.DECODE_ERROR:
            code, reason = frame[1], frame[2]
            if code == FRAME_TOO_LARGE:
                raise ConnectionLost(f"undecodable stream from server: {reason}")
            # A frame type we do not know may come from a newer server; skip it.
            log.warning("ignoring undecodable frame from server: [%s] %s", code, reason)
        else:
            log.warning("ignoring unexpected frame type %s from server", kind)

    def _on_error(self, code: int, msg_id: str, reason: str) -> None:
        if msg_id:
            if self.unacked.pop(msg_id, None) is not None:
                self.on_complete(msg_id, error_for(code, reason, msg_id))
            else:
                log.warning("server error for unknown msg_id %r: [%s] %s", msg_id, code, reason)
            return
        if code in _RECONNECT_CODES:
            raise ConnectionLost(f"server closed the session: [{code}] {reason}")
        if code in _AUTH_CODES or code in _FATAL_CODES:
            raise error_for(code, reason)
        # Remaining connection-level errors (BAD_FRAME, BAD_ACK, ...) leave the connection open.
        log.warning("server reported error [%s] %s", code, reason)

    def _on_deliver(self, tag: int, ts: int, sender: str, msg_id: str, body: bytes) -> None:
        if tag != self.highest_tag + 1:
            # Tags count 1, 2, 3... per connection. A gap means a DELIVER meant for us never
            # arrived, and a cumulative DELIVER_ACK past it would delete that message unseen.
            # Resynchronise: drop this connection without acknowledging anything past the gap;
            # the server stores what this connection left unacknowledged and delivers it again
            # from storage at the next login, where the receive-side dedup absorbs repeats.
            raise ConnectionLost(
                f"DELIVER tag {tag} after tag {self.highest_tag}: a delivery went missing; "
                "reconnecting to have it again"
            )
        self.highest_tag = tag
        key = (sender, msg_id)
        entry = self._pending.get(key)
        if entry is not None:
            if entry.gen != self.generation:
                # Redelivery of a message still waiting in the inbox: its ack now has to be
                # given with this connection's tag, when the application takes it.
                entry.gen = self.generation
                entry.tag = tag
                self._push_cur(tag)
            return
        if key in self.dedup:
            self.duplicates_dropped += 1
            if not self._cur_tags:
                self._ack(self.highest_tag)
            # Otherwise the ack of a later current-generation entry covers this tag.
            return
        self.dedup.add(key)
        entry = _Entry(self.generation, tag, Message(sender, msg_id, body, ts))
        self.inbox.append(entry)
        self._pending[key] = entry
        self._push_cur(tag)

    def has_message(self) -> bool:
        return bool(self.inbox)

    def pop_message(self) -> Message | None:
        """Hand the next message to the application, queueing its DELIVER_ACK in ``out``."""
        if not self.inbox:
            return None
        entry = self.inbox.popleft()
        msg = entry.msg
        key = (msg.sender, msg.msg_id)
        if self._pending.get(key) is entry:
            del self._pending[key]
        if entry.gen == self.generation:
            self._cur_tags.discard(entry.tag)
            lowest = self._min_cur()
            # Cumulative ack: never cover a current-generation entry not yet handed.
            target = self.highest_tag if lowest is None else min(entry.tag, lowest - 1)
            self._ack(target)
        return msg

    def _ack(self, tag: int) -> None:
        if tag > self.acked_tag:
            self.acked_tag = tag
            self.out.append((nat.DELIVER_ACK, tag))

    def _push_cur(self, tag: int) -> None:
        self._cur_tags.add(tag)
        heapq.heappush(self._cur_heap, tag)

    def _min_cur(self) -> int | None:
        heap = self._cur_heap
        while heap and heap[0] not in self._cur_tags:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def take_out(self) -> bytes | None:
        """Encoded bytes of the queued replies (PONG, DELIVER_ACK), or None."""
        if not self.out:
            return None
        frames, self.out = self.out, []
        return nat.encode_batch(frames)


class ClientBase:
    """Settings and protocol state common to ``IrisClient`` and ``AsyncIrisClient``.

    ``nodes`` are further ``(host, port)`` pairs tried after ``(host, port)``, round-robin.
    ``timeout`` bounds each call (connect + login, or one ``send_msg`` including reconnects).
    """

    def __init__(
        self,
        host: str,
        port: int,
        tls: bool = False,
        *,
        nodes: Iterable[tuple[str, int]] | None = None,
        token: str | None = None,
        timeout: float = 10.0,
        ca_file: str | None = None,
        device: str | None = None,
    ) -> None:
        self.host = host
        # This device's id (docs/protocol.md, LOGIN): the server keeps a delivery cursor per
        # device of a user, so every device gets every message. None: one anonymous device.
        self.device = device
        self.port = port
        self.tls = tls
        self.token = token
        self.timeout = timeout
        self.ca_file = ca_file
        self.user: str | None = None
        self._addrs = build_addrs(host, port, nodes)
        self._idx = 0
        self._core = ClientCore(self._on_complete)
        self._init_io()

    def _init_io(self) -> None:
        """Set up the transport-specific fields (subclasses)."""

    @property
    def unacked(self) -> dict[str, tuple[str, bytes]]:
        """Messages sent but not ACKed yet, oldest first: ``msg_id -> (to, body)``."""
        return self._core.unacked

    @property
    def duplicates_dropped(self) -> int:
        """Deliveries dropped because the message had been received already (redeliveries
        after a failover or a lost DELIVER_ACK: the receive-side dedup at work)."""
        return self._core.duplicates_dropped

    @property
    def last_ack_flags(self) -> int:
        """ACK flags (ACK_STORED | ACK_DUPLICATE | ACK_DEGRADED) of the most recent ACK."""
        return self._core.last_ack_flags

    @property
    def degraded(self) -> bool:
        """True if the most recent ACK said the message is durable on one node only."""
        return self._core.degraded

    @property
    def node(self) -> str:
        """Node id announced by the server we are logged in to."""
        return self._core.node

    def _on_complete(self, msg_id: str, result: int | IrisError) -> None:
        raise NotImplementedError
