"""Messages near ``--max-frame`` across a replicated pair: the node that takes a SEND refuses
what the other node could not deliver, and whatever it takes reaches a device on either node in
a DELIVER no longer than ``max_frame``."""

from __future__ import annotations

import iris_native as N
import pytest
from rawclient import RawClient

from iris_fast import protocol as P

pytestmark = pytest.mark.timeout(180)

MAX_FRAME = 65536
SENDER = "pair-big-sender"


def strict(addr: tuple[str, int], user: str) -> RawClient:
    c = RawClient(addr)
    c.decoder = N.Decoder(MAX_FRAME)  # a longer DELIVER would be a decode error here
    c.login(user)
    return c


def test_bodies_around_the_deliver_bound_across_the_pair(pair):
    live = strict(pair.b.addr, "pair-live")
    s = RawClient(pair.a.addr)
    s.login(SENDER)
    taken = []
    for delta in range(-3, 4):
        for to in ("pair-live", "pair-offline"):
            msg_id = f"{to}-{delta + 3}"
            n = MAX_FRAME - P.deliver_len(SENDER, msg_id, 0) + delta
            s.send((N.SEND, msg_id, to, b"b" * n))
            if delta <= 0:
                if to == "pair-live":
                    d = live.expect(N.DELIVER, timeout=15)
                    assert (d[3], d[4], len(d[5])) == (SENDER, msg_id, n)
                    live.send((N.DELIVER_ACK, d[1]))
                f = s.next(15)
                assert f is not None and f[:2] == (N.ACK, msg_id), f
                taken.append((to, msg_id, n))
            else:
                f = s.next(15)
                assert f is not None and f[:3] == (N.ERROR, P.E_FRAME_TOO_LARGE, msg_id), f
    # The offline recipient logs in on the other node: what was taken comes from its storage.
    later = strict(pair.b.addr, "pair-offline")
    for to, msg_id, n in taken:
        if to != "pair-offline":
            continue
        d = later.expect(N.DELIVER, timeout=15)
        assert (d[4], len(d[5])) == (msg_id, n)
        later.send((N.DELIVER_ACK, d[1]))
    assert [f for f in later.drain(0.3) if f[0] == N.DELIVER] == []
    assert [f for f in live.drain(0.3) if f[0] == N.DELIVER] == []
