"""Type stubs for the iris_native extension (native wire codec and dedup window)."""

from collections.abc import Iterable
from typing import Final, TypeAlias

DECODE_ERROR: Final[int]
LOGIN: Final[int]
LOGIN_OK: Final[int]
SEND: Final[int]
ACK: Final[int]
DELIVER: Final[int]
DELIVER_ACK: Final[int]
PING: Final[int]
PONG: Final[int]
ERROR: Final[int]

# Internal (worker-link) frame types: decoded only by Decoder(internal=True).
ROUTE_SEND: Final[int]
ROUTE_ACK: Final[int]
ROUTE_ERROR: Final[int]
LINK_HELLO: Final[int]
ROUTE_FLAG_REPLAY: Final[int]

# Replication-link frame types: decoded only by Decoder(repl=True).
REPL_HELLO: Final[int]
REPL_APPEND: Final[int]
REPL_ACK: Final[int]
REPL_HEARTBEAT: Final[int]
REPL_VERSION: Final[int]
# REPL_HELLO flags bit 0: writes accepted in degraded mode since the last healthy link.
HELLO_SPLIT: Final[int]
# Record kinds inside REPL_APPEND.
REC_PUT: Final[int]
REC_DEL: Final[int]
REC_DEDUP: Final[int]
REC_CURSOR: Final[int]

E_BAD_FRAME: Final[int]
E_FRAME_TOO_LARGE: Final[int]
E_UNKNOWN_TYPE: Final[int]
E_BAD_UTF8: Final[int]

ACK_STORED: Final[int]
ACK_DUPLICATE: Final[int]
ACK_DEGRADED: Final[int]

DEDUP_NEW: Final[int]
DEDUP_PENDING: Final[int]
DEDUP_DONE: Final[int]

DEFAULT_MAX_FRAME: Final[int]

# (LOGIN, version, user, token) or, with a device id, (LOGIN, version, user, token, device)
LoginFrame: TypeAlias = tuple[int, int, str, str] | tuple[int, int, str, str, str]
# (LOGIN_OK, version, flags, node, max_frame)
LoginOkFrame: TypeAlias = tuple[int, int, int, str, int]
# (SEND, msg_id, to, body)
SendFrame: TypeAlias = tuple[int, str, str, bytes]
# (ACK, msg_id, flags)
AckFrame: TypeAlias = tuple[int, str, int]
# (DELIVER, tag, ts_ms, sender, msg_id, body)
DeliverFrame: TypeAlias = tuple[int, int, int, str, str, bytes]
# (DELIVER_ACK, tag), (PING, nonce), (PONG, nonce)
IntFrame: TypeAlias = tuple[int, int]
# (ERROR, code, msg_id, reason)
ErrorFrame: TypeAlias = tuple[int, int, str, str]
# (ROUTE_SEND, ts_ms, flags, sender, msg_id, to, body)  -- worker links only
RouteSendFrame: TypeAlias = tuple[int, int, int, str, str, str, bytes]
# (ROUTE_ACK, user, msg_id, flags)  -- worker links only
RouteAckFrame: TypeAlias = tuple[int, str, str, int]
# (ROUTE_ERROR, user, code, msg_id, reason)  -- worker links only
RouteErrorFrame: TypeAlias = tuple[int, str, int, str, str]
# (LINK_HELLO, worker, pid, epoch)  -- worker links only
LinkHelloFrame: TypeAlias = tuple[int, int, int, int]
# (REC_PUT, user, seq, ts_ms, sender, msg_id, body)
PutRecord: TypeAlias = tuple[int, str, int, int, str, str, bytes]
# (REC_DEL, user, seq)
DelRecord: TypeAlias = tuple[int, str, int]
# (REC_DEDUP, key (16 bytes), ts_ms, sender hash)
DedupRecord: TypeAlias = tuple[int, bytes, int, int]
# (REC_CURSOR, user, device, seq, ts_ms)
CursorRecord: TypeAlias = tuple[int, str, str, int, int]
Record: TypeAlias = PutRecord | DelRecord | DedupRecord | CursorRecord
# (stream, lsn)
StreamLsn: TypeAlias = tuple[int, int]
# (REPL_HELLO, version, node, epoch, workers, flags, [(stream, lsn), ...])
#   -- replication links only
ReplHelloFrame: TypeAlias = tuple[int, int, str, int, int, int, list[StreamLsn]]
# (REPL_APPEND, stream, first_lsn, [record, ...])  -- replication links only
ReplAppendFrame: TypeAlias = tuple[int, int, int, list[Record]]
# (REPL_ACK, stream, lsn)  -- replication links only
ReplAckFrame: TypeAlias = tuple[int, int, int]
# (REPL_HEARTBEAT, ts_ms, [(stream, last_lsn), ...])  -- replication links only
ReplHeartbeatFrame: TypeAlias = tuple[int, int, list[StreamLsn]]
# (DECODE_ERROR, code, reason); code E_FRAME_TOO_LARGE is fatal
DecodeErrorItem: TypeAlias = tuple[int, int, str]

Frame: TypeAlias = (
    LoginFrame
    | LoginOkFrame
    | SendFrame
    | AckFrame
    | DeliverFrame
    | IntFrame
    | ErrorFrame
    | RouteSendFrame
    | RouteAckFrame
    | RouteErrorFrame
    | LinkHelloFrame
    | ReplHelloFrame
    | ReplAppendFrame
    | ReplAckFrame
    | ReplHeartbeatFrame
)
Decoded: TypeAlias = Frame | DecodeErrorItem

class Decoder:
    """Incremental frame decoder for one connection.

    ``internal=False`` (client connections): the worker-link types ROUTE_SEND,
    ROUTE_ACK, ROUTE_ERROR and LINK_HELLO are reported as
    ``(DECODE_ERROR, E_UNKNOWN_TYPE, reason)``. ``internal=True`` (worker links):
    they decode as well. ``repl=True`` (replication links): only REPL_HELLO,
    REPL_APPEND, REPL_ACK and REPL_HEARTBEAT decode, every other type is
    UNKNOWN_TYPE (and those four are UNKNOWN_TYPE on the other decoders).
    ``internal`` and ``repl`` exclude each other (ValueError).
    """

    def __init__(
        self, max_frame: int = 65536, internal: bool = False, repl: bool = False
    ) -> None: ...
    def feed(self, data: bytes | bytearray | memoryview) -> list[Decoded]:
        """Return every frame (or decode error) completed by ``data``, in order."""
    def pending(self) -> int:
        """Bytes of an incomplete frame held back (non-zero at EOF: truncated)."""
    def take_pending(self) -> bytes:
        """Remove and return the bytes of an incomplete frame (decoder left empty)."""
        ...
    def release(self) -> None:
        """Free the internal buffer's memory; pending bytes are kept."""
    def capacity(self) -> int:
        """Bytes currently allocated for the internal buffer."""
    def poisoned(self) -> bool:
        """True once a frame exceeded max_frame; all further input is ignored."""
    @property
    def max_frame(self) -> int: ...
    @property
    def internal(self) -> bool:
        """True for a worker-link decoder (internal frame types accepted)."""
    @property
    def repl(self) -> bool:
        """True for a replication-link decoder (REPL_* frame types only)."""

def encode(frame: Frame, max_frame: int = 65536) -> bytes:
    """Encode one frame tuple; ValueError if malformed or too large."""

def encode_batch(frames: Iterable[Frame], max_frame: int = 65536) -> bytes:
    """Encode many frame tuples into one bytes object (concatenated encodings)."""

def dedup_key(sender: str, msg_id: str) -> bytes:
    """16-byte big-endian xxh3_128 of len(sender) || sender || msg_id."""

def dedup_sender(sender: str) -> int:
    """xxh3_64 of the sender: whose share of the dedup window an entry counts in."""

class DedupWindow:
    """Bounded window of recently seen (sender, msg_id) pairs, split fairly between senders:
    over the budget the oldest completed entry of the sender holding the most goes first;
    pending entries are never evicted."""

    def __init__(self, max_entries: int, max_age_ms: int) -> None: ...
    def check_and_insert(self, sender: str, msg_id: str, now_ms: int) -> int:
        """DEDUP_NEW (recorded as pending), DEDUP_PENDING or DEDUP_DONE."""
    def mark_done(self, sender: str, msg_id: str) -> bool: ...
    def remove(self, sender: str, msg_id: str) -> bool: ...
    def insert_key(self, key: bytes, state: int, ts_ms: int, sender: int = 0) -> None: ...
    def load(self, records: bytes, now_ms: int) -> int:
        """Insert completed entries from 32-byte records ts_ms u64 | key16 | sender u64 (BE),
        oldest first, skipping those past the age bound; returns how many were inserted."""
    @property
    def max_entries(self) -> int: ...
    @property
    def max_age_ms(self) -> int: ...
    @property
    def pending(self) -> int: ...
    @property
    def senders(self) -> int: ...
    @property
    def capacity_evictions(self) -> int: ...
    @property
    def oldest_ts_ms(self) -> int | None: ...
    @property
    def memory_bytes(self) -> int: ...
    def __len__(self) -> int: ...
