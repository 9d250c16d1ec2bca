"""``from iris_client import IrisClient``: the seed's client import, kept working unchanged.

The seed's acceptance scripts import the client under this top-level name; the library lives in
``iris_fast.client`` and this module only re-exports it.
"""

from iris_fast.client import (
    AsyncIrisClient,
    AuthError,
    IrisClient,
    IrisError,
    MailboxFullError,
    Message,
    RateLimitedError,
)

__all__ = [
    "AsyncIrisClient",
    "AuthError",
    "IrisClient",
    "IrisError",
    "MailboxFullError",
    "Message",
    "RateLimitedError",
]
