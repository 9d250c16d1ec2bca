"""The seed's client calls, verbatim in shape: ``from iris_client import IrisClient``.

The seed's acceptance scripts (shared/seeds) import the client under the top-level name
``iris_client`` and use ``IrisClient(host, port)``, ``login``, ``send_msg``, ``recv_msg(timeout=)``
and ``close``; they must run unchanged against iris-fast.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(60)


def test_the_seeds_import_and_calls_work_unchanged(server):
    from iris_client import IrisClient

    host, port = server.addr
    c = IrisClient(host, port)
    c.login("failover_sender")
    for i in range(100):
        c.send_msg("failover_receiver", f"MUST_SURVIVE_FAILOVER_{i}")
    c.close()

    c = IrisClient(host, port)
    c.login("failover_receiver")
    received = []
    while True:
        try:
            msg = c.recv_msg(timeout=1)
        except TimeoutError:
            break
        if b"MUST_SURVIVE_FAILOVER_" in msg:
            received.append(msg)
    c.close()
    assert received == [f"MUST_SURVIVE_FAILOVER_{i}".encode() for i in range(100)]


def test_iris_client_is_the_library_client():
    import iris_client
    from iris_fast import client

    assert iris_client.IrisClient is client.IrisClient
    assert iris_client.AsyncIrisClient is client.AsyncIrisClient
