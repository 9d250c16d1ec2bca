"""iris-fast: a 1:1 messaging server whose hot path is native code."""

__version__ = "0.1.0"
