"""Protocol constants shared by server and client (see docs/protocol.md).

Frame type numbers and the codec live in the Rust module ``iris_native``; this module re-exports
them and adds what only Python needs: error codes, their names and which are fatal.
"""

from __future__ import annotations

from iris_native import (  # noqa: F401  (re-exported)
    ACK,
    ACK_DEGRADED,
    ACK_DUPLICATE,
    ACK_STORED,
    DECODE_ERROR,
    DELIVER,
    DELIVER_ACK,
    ERROR,
    LOGIN,
    LOGIN_OK,
    PING,
    PONG,
    SEND,
)

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME = 65536
# A DELIVER frame's length without its sender, msg_id and body: type, tag u64, ts_ms u64 and the
# two str8 length bytes. A SEND is taken only if the DELIVER it becomes fits max_frame.
DELIVER_OVERHEAD = 1 + 8 + 8 + 1 + 1

E_BAD_FRAME = 1
E_FRAME_TOO_LARGE = 2
E_UNKNOWN_TYPE = 3
E_BAD_UTF8 = 4
E_NOT_LOGGED_IN = 5
E_AUTH_FAILED = 6
E_UNSUPPORTED_VERSION = 7
E_ALREADY_LOGGED_IN = 8
E_MAILBOX_FULL = 9
E_TOO_MANY_ERRORS = 10
E_RATE_LIMITED = 11
E_BAD_RECIPIENT = 12
E_SHUTTING_DOWN = 13
E_LOGIN_TIMEOUT = 14
E_BAD_ACK = 15
E_TOO_MANY_CONNECTIONS = 16
E_STORAGE_UNAVAILABLE = 17

ERROR_NAMES: dict[int, str] = {
    E_BAD_FRAME: "bad_frame",
    E_FRAME_TOO_LARGE: "frame_too_large",
    E_UNKNOWN_TYPE: "unknown_type",
    E_BAD_UTF8: "bad_utf8",
    E_NOT_LOGGED_IN: "not_logged_in",
    E_AUTH_FAILED: "auth_failed",
    E_UNSUPPORTED_VERSION: "unsupported_version",
    E_ALREADY_LOGGED_IN: "already_logged_in",
    E_MAILBOX_FULL: "mailbox_full",
    E_TOO_MANY_ERRORS: "too_many_errors",
    E_RATE_LIMITED: "rate_limited",
    E_BAD_RECIPIENT: "bad_recipient",
    E_SHUTTING_DOWN: "shutting_down",
    E_LOGIN_TIMEOUT: "login_timeout",
    E_BAD_ACK: "bad_ack",
    E_TOO_MANY_CONNECTIONS: "too_many_connections",
    E_STORAGE_UNAVAILABLE: "storage_unavailable",
}

# After these the server closes the connection: the stream or the peer can't be trusted further.
FATAL_ERRORS = frozenset(
    {
        E_FRAME_TOO_LARGE,
        E_AUTH_FAILED,
        E_UNSUPPORTED_VERSION,
        E_TOO_MANY_ERRORS,
        E_SHUTTING_DOWN,
        E_LOGIN_TIMEOUT,
        E_TOO_MANY_CONNECTIONS,
    }
)


def valid_user_id(user: str) -> bool:
    """A user id is 1..255 UTF-8 bytes without NUL (it is part of storage keys)."""
    return 0 < len(user.encode()) <= 255 and "\x00" not in user


def deliver_len(sender: str, msg_id: str, body_len: int) -> int:
    """Length (type byte + payload, as counted against max_frame) of the DELIVER of a message."""
    return DELIVER_OVERHEAD + len(sender.encode()) + len(msg_id.encode()) + body_len
