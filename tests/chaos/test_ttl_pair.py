"""Issue 10: a message that outlives --message-ttl is deleted on both nodes of a pair.

Node ``b`` runs without a TTL, so whatever disappears from its LMDB was deleted by the DEL
records of ``a``'s sweep, which travel the replication stream like an acknowledged delivery's.
"""

from __future__ import annotations

import iris_native as N
import pytest
from rawclient import RawClient
from test_retention import stored_in_lmdb, wait_for
from test_workers import users_on

pytestmark = pytest.mark.timeout(180)


def test_expired_mail_is_deleted_on_both_nodes_and_never_delivered(pair_factory):
    pair = pair_factory(2, "--message-ttl", "2", start=False)
    pair.b.extra += ["--message-ttl", "0"]  # the last occurrence wins: b never expires mail
    pair.start()
    sender, rcpt = users_on(2, 0, 1, prefix="pttl")
    s = RawClient(pair.a.addr)
    s.login(sender)
    s.send(*[(N.SEND, f"e{i}", rcpt, b"expires") for i in range(10)])
    acks = s.collect(N.ACK, 10)
    assert {a[2] for a in acks} == {N.ACK_STORED}  # on both nodes, not degraded
    assert len(stored_in_lmdb(pair.a.data_dir, rcpt)) == 10
    assert len(stored_in_lmdb(pair.b.data_dir, rcpt)) == 10
    wait_for(
        lambda: (
            stored_in_lmdb(pair.a.data_dir, rcpt) == []
            and stored_in_lmdb(pair.b.data_dir, rcpt) == []
        ),
        20,
        "the TTL sweep on a and its DELs on b",
    )
    assert pair.a.metrics()["iris_messages_expired_total"] == 10
    assert pair.b.metrics()["iris_messages_expired_total"] == 0
    for node in (pair.b, pair.a):
        r = RawClient(node.addr)
        r.login(rcpt)
        assert r.drain(1.0) == []
        r.close()
    # ACKed when it was stored on both nodes; its expiry is not reported to the sender.
    assert s.drain(0.5) == []
