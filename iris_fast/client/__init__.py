"""Python client library of iris-fast.

``IrisClient`` is blocking (plain sockets, no threads); ``AsyncIrisClient`` is its asyncio
counterpart. Both resend unACKed messages after reconnects, fail over across nodes and
deduplicate deliveries by ``(sender, msg_id)``.
"""

from ._core import AuthError, IrisError, MailboxFullError, Message, RateLimitedError
from .aio import AsyncIrisClient
from .sync import IrisClient

__all__ = [
    "AsyncIrisClient",
    "AuthError",
    "IrisClient",
    "IrisError",
    "MailboxFullError",
    "Message",
    "RateLimitedError",
]
