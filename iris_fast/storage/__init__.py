"""Durable storage of undelivered messages (LMDB, group commit)."""

from iris_fast.storage.mailbox import MailboxStore

__all__ = ["MailboxStore"]
