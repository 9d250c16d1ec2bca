"""Pair replication: every durable mailbox change of a worker streams to the same worker of the
peer node (docs/replication.md).

* ``stream.py``  the origin side: the worker's log going out, acks, degraded mode, catch-up.
* ``replica.py`` the receiving side: the peer's stream applied to local storage.
* ``links.py``   the TCP links (dialing, accepting, hand-off to the right worker, heartbeats).
"""
