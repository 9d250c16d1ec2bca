"""Operator tools (``iris-fast status``)."""
