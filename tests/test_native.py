"""Tests of the iris_native extension: codec, decode errors, batches and the dedup window."""

from __future__ import annotations

import struct

import iris_native as n
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

SAMPLES = [
    (n.LOGIN, 1, "alice", "tok.en"),
    (n.LOGIN, 1, "alice", ""),
    (n.LOGIN_OK, 1, 1, "node-a", 65536),
    (n.SEND, "m1", "bob", b"hello"),
    (n.SEND, "", "bob", b""),
    (n.ACK, "m1", n.ACK_STORED | n.ACK_DEGRADED),
    (n.DELIVER, 7, 1_700_000_000_000, "alice", "m1", b"\x00\xff body"),
    (n.DELIVER_ACK, 2**64 - 1),
    (n.PING, 42),
    (n.PONG, 0),
    (n.ERROR, 9, "m1", "mailbox full ✓"),
]


def raw(ftype: int, payload: bytes) -> bytes:
    """A frame built by hand, bypassing the encoder."""
    return struct.pack(">IB", len(payload) + 1, ftype) + payload


def decode(data: bytes, max_frame: int = 65536) -> list[tuple]:
    return n.Decoder(max_frame).feed(data)


def only_error(data: bytes) -> tuple:
    out = decode(data)
    assert len(out) == 1, out
    assert out[0][0] == n.DECODE_ERROR, out
    return out[0]


def test_constants() -> None:
    types = [n.LOGIN, n.LOGIN_OK, n.SEND, n.ACK, n.DELIVER, n.DELIVER_ACK, n.PING, n.PONG]
    assert types + [n.ERROR] == list(range(1, 10))
    assert n.DECODE_ERROR == 0
    assert (n.E_BAD_FRAME, n.E_FRAME_TOO_LARGE, n.E_UNKNOWN_TYPE, n.E_BAD_UTF8) == (1, 2, 3, 4)
    assert (n.ACK_STORED, n.ACK_DUPLICATE, n.ACK_DEGRADED) == (1, 2, 4)
    assert (n.DEDUP_NEW, n.DEDUP_PENDING, n.DEDUP_DONE) == (0, 1, 2)


def test_wire_layout() -> None:
    assert n.encode((n.SEND, "ab", "c", b"xy")) == b"\x00\x00\x00\x08\x03\x02ab\x01cxy"
    assert n.encode((n.PING, 258)) == b"\x00\x00\x00\x09\x07" + (258).to_bytes(8, "big")
    assert n.encode((n.ACK, "m", 3)) == b"\x00\x00\x00\x04\x04\x01m\x03"


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: str(f[0]))
def test_roundtrip_every_type(frame: tuple) -> None:
    assert decode(n.encode(frame)) == [frame]


def test_decoded_types() -> None:
    [(t, tag, ts, sender, msg_id, body)] = decode(n.encode(SAMPLES[6]))
    assert type(body) is bytes
    assert type(sender) is str and type(msg_id) is str
    assert type(tag) is int and type(ts) is int


def test_byte_by_byte_matches_whole() -> None:
    data = b"".join(n.encode(f) for f in SAMPLES)
    d = n.Decoder()
    out: list[tuple] = []
    for i in range(len(data)):
        out += d.feed(data[i : i + 1])
    assert out == SAMPLES
    assert d.pending() == 0


def test_one_feed_returns_all_frames_and_buffers_tail() -> None:
    data = b"".join(n.encode(f) for f in SAMPLES)
    d = n.Decoder()
    assert d.feed(data + data[:5]) == SAMPLES
    assert d.pending() == 5
    assert d.feed(data[5:]) == SAMPLES
    assert d.pending() == 0


def test_feed_accepts_buffers() -> None:
    data = n.encode(SAMPLES[3])
    assert n.Decoder().feed(bytearray(data)) == [SAMPLES[3]]
    assert n.Decoder().feed(memoryview(data)) == [SAMPLES[3]]
    with pytest.raises(ValueError):
        n.Decoder().feed("not bytes")  # type: ignore[arg-type]


def test_zero_length_is_bad_frame_and_decoding_continues() -> None:
    out = decode(b"\x00\x00\x00\x00" + n.encode((n.PING, 1)))
    assert out[0][:2] == (n.DECODE_ERROR, n.E_BAD_FRAME)
    assert "length 0" in out[0][2]
    assert out[1] == (n.PING, 1)


def test_frame_too_large_poisons_before_body() -> None:
    d = n.Decoder(65536)
    assert d.max_frame == 65536
    assert d.feed(b"\x00\x01") == []
    out = d.feed(b"\x11\x70")  # length 70000, not one body byte sent
    reason = "frame length 70000 exceeds max_frame 65536"
    assert out == [(n.DECODE_ERROR, n.E_FRAME_TOO_LARGE, reason)]
    assert d.poisoned()
    assert d.pending() == 0
    # Poisoned stays poisoned, even for valid input.
    assert d.feed(n.encode((n.PING, 1))) == []
    assert d.feed(b"\x00\x00\x00\x00") == []
    assert d.poisoned()


def test_frames_before_too_large_are_returned() -> None:
    data = n.encode((n.PING, 1)) + struct.pack(">I", 100) + n.encode((n.PING, 2))
    out = decode(data, max_frame=50)
    assert out[0] == (n.PING, 1)
    assert out[1][:2] == (n.DECODE_ERROR, n.E_FRAME_TOO_LARGE)
    assert len(out) == 2


def test_max_frame_is_inclusive() -> None:
    assert decode(n.encode((n.PING, 1)), max_frame=9) == [(n.PING, 1)]


@pytest.mark.parametrize("ftype", [0, 10, 0x42, 255])
def test_unknown_type_is_skipped(ftype: int) -> None:
    out = decode(raw(ftype, b"abc") + n.encode((n.PONG, 5)))
    assert out[0][:2] == (n.DECODE_ERROR, n.E_UNKNOWN_TYPE)
    assert f"0x{ftype:02x}" in out[0][2]
    assert out[1] == (n.PONG, 5)


def fixed_part_len(frame: tuple) -> int:
    """Payload bytes before the `rest` body (all of it for types without one)."""
    payload_len = len(n.encode(frame)) - 5
    if frame[0] in (n.SEND, n.DELIVER):
        return payload_len - len(frame[-1])
    return payload_len


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: str(f[0]))
def test_truncated_fields_are_bad_frame(frame: tuple) -> None:
    payload = n.encode(frame)[5:]
    for cut in range(fixed_part_len(frame)):
        code, reason = only_error(raw(frame[0], payload[:cut]))[1:]
        assert code == n.E_BAD_FRAME, (cut, reason)
        assert "truncated" in reason


def test_str8_length_past_end() -> None:
    _, code, reason = only_error(raw(n.SEND, b"\xc8ab"))
    assert code == n.E_BAD_FRAME
    assert "msg_id" in reason


@pytest.mark.parametrize(
    "frame", [f for f in SAMPLES if f[0] not in (n.SEND, n.DELIVER)], ids=lambda f: str(f[0])
)
def test_trailing_bytes_are_bad_frame(frame: tuple) -> None:
    _, code, reason = only_error(raw(frame[0], n.encode(frame)[5:] + b"\0"))
    assert code == n.E_BAD_FRAME
    assert "trailing" in reason


@pytest.mark.parametrize(
    "data",
    [raw(n.PING, bytes(9)), raw(n.DELIVER_ACK, bytes(7)), raw(n.DELIVER_ACK, bytes(9))],
)
def test_fixed_size_frames_must_be_exact(data: bytes) -> None:
    assert only_error(data)[1] == n.E_BAD_FRAME


BAD_UTF8_CASES = [
    ((n.LOGIN, 1, "\x7f\x7f", "t"), "user"),
    ((n.LOGIN, 1, "u", "\x7f\x7f"), "token"),
    ((n.LOGIN_OK, 1, 0, "\x7f\x7f", 1), "node"),
    ((n.SEND, "\x7f\x7f", "b", b""), "msg_id"),
    ((n.SEND, "m", "\x7f\x7f", b""), "to"),
    ((n.ACK, "\x7f\x7f", 0), "msg_id"),
    ((n.DELIVER, 1, 2, "\x7f\x7f", "m", b""), "sender"),
    ((n.DELIVER, 1, 2, "s", "\x7f\x7f", b""), "msg_id"),
    ((n.ERROR, 1, "\x7f\x7f", "r"), "msg_id"),
    ((n.ERROR, 1, "m", "\x7f\x7f"), "reason"),
]


@pytest.mark.parametrize("frame,field", BAD_UTF8_CASES, ids=lambda x: str(x))
def test_bad_utf8_in_every_string_field(frame: tuple, field: str) -> None:
    # 0x7f 0x7f is a placeholder no other field encodes to; patch in invalid UTF-8.
    data = n.encode(frame).replace(b"\x7f\x7f", b"\xff\xfe")
    _, code, reason = only_error(data)
    assert code == n.E_BAD_UTF8
    assert field in reason


def test_truncated_stream_leaves_pending_and_release() -> None:
    data = n.encode((n.SEND, "m", "b", b"x" * 1000))
    d = n.Decoder()
    assert d.feed(data[:500]) == []
    assert d.pending() == 500
    assert d.capacity() >= len(data)
    d.release()
    assert d.pending() == 500  # release keeps pending bytes
    assert d.feed(data[500:]) == [(n.SEND, "m", "b", b"x" * 1000)]
    assert d.capacity() > 0
    d.release()
    assert d.capacity() == 0
    assert d.feed(n.encode((n.PING, 1))) == [(n.PING, 1)]


def test_decoder_rejects_zero_max_frame() -> None:
    with pytest.raises(ValueError):
        n.Decoder(0)


def test_encode_batch_equals_concatenation() -> None:
    frames = SAMPLES * 3 + [
        (n.DELIVER, i, i * 1000, f"user{i}", f"{i:032x}", bytes([i]) * i) for i in range(100)
    ]
    batch = n.encode_batch(frames)
    assert batch == b"".join(n.encode(f) for f in frames)
    assert decode(batch) == frames
    assert n.encode_batch([]) == b""
    assert n.encode_batch(iter(SAMPLES)) == b"".join(n.encode(f) for f in SAMPLES)


@pytest.mark.parametrize(
    "frame,match",
    [
        ("not a tuple", "tuple"),
        ((), "empty"),
        ((200, 1), "unknown frame type"),
        ((n.PING,), "2 items"),
        ((n.PING, 1, 2), "2 items"),
        ((n.PING, -1), "nonce"),
        ((n.ACK, "m", 256), "flags"),
        ((n.SEND, 1, "b", b""), "msg_id must be str"),
        ((n.SEND, "m", "b", "body"), "body must be bytes"),
        ((n.SEND, "m" * 256, "b", b""), "msg_id is 256 bytes"),
        ((n.ERROR, 1, "", "r" * 65536), "reason is 65536 bytes"),
        ((n.LOGIN, 1, "\ud800", ""), "user"),
        ((n.SEND, "m", "b", b"x" * 70000), "exceeds max_frame 65536"),
    ],
)
def test_encode_rejects_malformed(frame: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        n.encode(frame)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="frame 1"):
        n.encode_batch([(n.PING, 1), frame])  # type: ignore[list-item]


def test_encode_max_frame_kwarg() -> None:
    frame = (n.SEND, "m", "t", bytes(100))  # length 105
    assert len(n.encode(frame, max_frame=105)) == 109
    with pytest.raises(ValueError, match="exceeds max_frame 104"):
        n.encode(frame, max_frame=104)
    with pytest.raises(ValueError, match="exceeds max_frame"):
        n.encode_batch([frame], max_frame=104)
    assert n.encode((n.ERROR, 1, "", "r" * 65535), max_frame=1 << 20)


def test_dedup_key() -> None:
    k = n.dedup_key("alice", "m1")
    assert isinstance(k, bytes) and len(k) == 16
    assert k == n.dedup_key("alice", "m1")
    assert n.dedup_key("ab", "c") != n.dedup_key("a", "bc")
    with pytest.raises(ValueError):
        n.dedup_key("x" * 256, "m")


def test_dedup_new_pending_done() -> None:
    w = n.DedupWindow(100, 1000)
    assert w.check_and_insert("alice", "m1", 0) == n.DEDUP_NEW
    assert w.check_and_insert("alice", "m1", 1) == n.DEDUP_PENDING
    assert w.check_and_insert("bob", "m1", 1) == n.DEDUP_NEW
    assert w.mark_done("alice", "m1")
    assert w.check_and_insert("alice", "m1", 2) == n.DEDUP_DONE
    assert not w.mark_done("carol", "m1")
    assert len(w) == 2


def test_dedup_max_entries() -> None:
    w = n.DedupWindow(3, 10**9)
    for i in range(5):
        assert w.check_and_insert("a", str(i), i) == n.DEDUP_NEW
        w.mark_done("a", str(i))
    assert len(w) == 3
    assert w.capacity_evictions == 2
    assert w.check_and_insert("a", "4", 10) == n.DEDUP_DONE
    assert w.check_and_insert("a", "0", 10) == n.DEDUP_NEW


def test_dedup_pending_is_never_evicted() -> None:
    # In flight: neither the budget nor age may drop it, or a resend would be taken as new.
    w = n.DedupWindow(2, 1000)
    for i in range(5):
        assert w.check_and_insert("a", str(i), 0) == n.DEDUP_NEW
    assert len(w) == 5 and w.pending == 5
    assert w.check_and_insert("a", "0", 10**6) == n.DEDUP_PENDING
    for i in range(5):
        w.mark_done("a", str(i))
    assert len(w) == 2 and w.pending == 0


def test_dedup_one_sender_cannot_evict_another() -> None:
    w = n.DedupWindow(100, 10**9)
    w.check_and_insert("alice", "m1", 0)
    w.mark_done("alice", "m1")
    for i in range(10_000):
        w.check_and_insert("mallory", str(i), 1)
        w.mark_done("mallory", str(i))
    assert w.check_and_insert("alice", "m1", 2) == n.DEDUP_DONE
    assert len(w) == 100 and w.senders == 2
    assert w.capacity_evictions == 10_000 - 99
    assert w.oldest_ts_ms == 0
    assert w.memory_bytes > 0


def test_dedup_load_batches() -> None:
    def rec(ts: int, sender: str, msg_id: str) -> bytes:
        return (
            struct.pack(">Q", ts)
            + n.dedup_key(sender, msg_id)
            + struct.pack(">Q", n.dedup_sender(sender))
        )

    w = n.DedupWindow(10, 1000)
    batch = rec(100, "a", "old") + rec(1500, "a", "new") + rec(1600, "b", "x")
    assert w.load(batch, 2000) == 2
    assert w.check_and_insert("a", "new", 2000) == n.DEDUP_DONE
    assert w.check_and_insert("b", "x", 2000) == n.DEDUP_DONE
    assert w.check_and_insert("a", "old", 2000) == n.DEDUP_NEW
    with pytest.raises(ValueError, match="multiple of 32"):
        w.load(batch[:-1], 2000)


def test_dedup_max_age() -> None:
    w = n.DedupWindow(100, 1000)
    w.check_and_insert("a", "old", 0)
    w.mark_done("a", "old")
    assert w.check_and_insert("a", "old", 1000) == n.DEDUP_DONE
    assert w.check_and_insert("a", "new", 1001) == n.DEDUP_NEW
    assert len(w) == 1
    assert w.check_and_insert("a", "old", 1002) == n.DEDUP_NEW


def test_dedup_remove_and_reinsert() -> None:
    w = n.DedupWindow(2, 1000)
    w.check_and_insert("a", "1", 0)
    assert w.remove("a", "1")
    assert not w.remove("a", "1")
    assert len(w) == 0
    assert w.check_and_insert("a", "1", 900) == n.DEDUP_NEW
    # The stale entry from ts 0 must not expire the reinsert.
    assert w.check_and_insert("a", "1", 1500) == n.DEDUP_PENDING


def test_dedup_insert_key_reload() -> None:
    w = n.DedupWindow(10, 1000)
    w.insert_key(n.dedup_key("a", "done"), n.DEDUP_DONE, 100)
    w.insert_key(n.dedup_key("a", "pend"), n.DEDUP_PENDING, 100)
    assert len(w) == 2
    assert w.check_and_insert("a", "done", 200) == n.DEDUP_DONE
    assert w.check_and_insert("a", "pend", 200) == n.DEDUP_PENDING
    with pytest.raises(ValueError):
        w.insert_key(b"short", n.DEDUP_DONE, 1)
    with pytest.raises(ValueError):
        w.insert_key(bytes(16), 3, 1)


# ---------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------

str8 = st.text(max_size=60).filter(lambda s: len(s.encode()) <= 255)
str16 = st.text(max_size=300)
u8 = st.integers(0, 255)
u64 = st.integers(0, 2**64 - 1)
body = st.binary(max_size=500)

frames = st.one_of(
    st.tuples(st.just(n.LOGIN), u8, str8, str16),
    st.tuples(st.just(n.LOGIN_OK), u8, u8, str8, st.integers(0, 2**32 - 1)),
    st.tuples(st.just(n.SEND), str8, str8, body),
    st.tuples(st.just(n.ACK), str8, u8),
    st.tuples(st.just(n.DELIVER), u64, u64, str8, str8, body),
    st.tuples(st.sampled_from([n.DELIVER_ACK, n.PING, n.PONG]), u64),
    st.tuples(st.just(n.ERROR), st.integers(0, 65535), str8, str16),
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted(c % (len(data) + 1) for c in cuts)
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@settings(max_examples=300, deadline=None)
@given(st.lists(frames, min_size=1, max_size=8), st.lists(st.integers(0, 10**6), max_size=6))
def test_decode_inverts_encode(fs: list[tuple], cuts: list[int]) -> None:
    data = n.encode_batch(fs, max_frame=1 << 20)
    d = n.Decoder(1 << 20)
    out: list[tuple] = []
    for chunk in split(data, cuts):
        out += d.feed(chunk)
    assert out == fs
    assert d.pending() == 0


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=3000),
    st.lists(st.integers(0, 10**6), max_size=20),
    st.integers(1, 2048),
)
def test_byte_soup_only_returns_tuples(data: bytes, cuts: list[int], max_frame: int) -> None:
    d = n.Decoder(max_frame)
    fatal = False
    for chunk in split(data, cuts):
        for item in d.feed(chunk):
            assert isinstance(item, tuple)
            assert not fatal
            if item[0] == n.DECODE_ERROR:
                codes = (n.E_BAD_FRAME, n.E_FRAME_TOO_LARGE, n.E_UNKNOWN_TYPE, n.E_BAD_UTF8)
                assert item[1] in codes
                assert isinstance(item[2], str) and item[2]
                fatal = item[1] == n.E_FRAME_TOO_LARGE
            else:
                assert 1 <= item[0] <= 9
                assert n.encode(item, max_frame=max_frame)  # decoded frames re-encode
        assert d.pending() <= max_frame + 4
    assert d.poisoned() == fatal


# ---------------------------------------------------------------------------
# Internal (worker-link) frames
# ---------------------------------------------------------------------------

INTERNAL_SAMPLES = [
    (n.ROUTE_SEND, 1_700_000_000_000, n.ROUTE_FLAG_REPLAY, "alice", "m1", "bob", b"\x00\xff body"),
    (n.ROUTE_SEND, 0, 0, "", "", "", b""),
    (n.ROUTE_ACK, "alice", "m1", n.ACK_STORED | n.ACK_DUPLICATE),
    (n.ROUTE_ERROR, "alice", 9, "m1", "mailbox full ✓"),
    (n.LINK_HELLO, 65535, 2**32 - 1, 2**64 - 1),
]


def decode_internal(data: bytes, max_frame: int = 65536) -> list[tuple]:
    return n.Decoder(max_frame, internal=True).feed(data)


def only_internal_error(data: bytes) -> tuple:
    out = decode_internal(data)
    assert len(out) == 1, out
    assert out[0][0] == n.DECODE_ERROR, out
    return out[0]


def test_internal_constants_and_decoder_flag() -> None:
    assert (n.ROUTE_SEND, n.ROUTE_ACK, n.ROUTE_ERROR, n.LINK_HELLO) == (0x41, 0x42, 0x43, 0x44)
    assert n.ROUTE_FLAG_REPLAY == 1
    assert n.Decoder().internal is False
    assert n.Decoder(100).internal is False
    assert n.Decoder(100, True).internal is True
    d = n.Decoder(max_frame=100, internal=True)
    assert d.internal and d.max_frame == 100
    assert "internal=True" in repr(d)


def test_internal_wire_layout() -> None:
    assert n.encode((n.ROUTE_ACK, "u", "ab", 3)) == b"\x00\x00\x00\x07\x42\x01u\x02ab\x03"
    assert n.encode((n.LINK_HELLO, 0x0102, 0x03040506, 7)) == (
        b"\x00\x00\x00\x0f\x44\x01\x02\x03\x04\x05\x06" + (7).to_bytes(8, "big")
    )
    assert n.encode((n.ROUTE_SEND, 1, 1, "s", "m", "t", b"xy")) == (
        b"\x00\x00\x00\x12\x41" + (1).to_bytes(8, "big") + b"\x01\x01s\x01m\x01txy"
    )
    assert n.encode((n.ROUTE_ERROR, "u", 0x0102, "m", "r")) == (
        b"\x00\x00\x00\x0a\x43\x01u\x01\x02\x01m\x00\x01r"
    )


@pytest.mark.parametrize("frame", INTERNAL_SAMPLES, ids=lambda f: hex(f[0]))
def test_internal_roundtrip(frame: tuple) -> None:
    assert decode_internal(n.encode(frame)) == [frame]


def test_internal_decoded_types() -> None:
    [(t, ts, flags, sender, msg_id, to, body)] = decode_internal(n.encode(INTERNAL_SAMPLES[0]))
    assert t == n.ROUTE_SEND
    assert type(body) is bytes
    assert type(sender) is str and type(msg_id) is str and type(to) is str
    assert type(ts) is int and type(flags) is int


def test_internal_decoder_also_speaks_client_frames() -> None:
    frames = SAMPLES + INTERNAL_SAMPLES + SAMPLES
    data = n.encode_batch(frames)
    assert data == b"".join(n.encode(f) for f in frames)
    assert decode_internal(data) == frames
    d = n.Decoder(internal=True)
    out: list[tuple] = []
    for i in range(len(data)):
        out += d.feed(data[i : i + 1])
    assert out == frames
    assert d.pending() == 0


@pytest.mark.parametrize("frame", INTERNAL_SAMPLES, ids=lambda f: hex(f[0]))
def test_default_decoder_rejects_internal_as_unknown(frame: tuple) -> None:
    t = frame[0]
    want = (n.DECODE_ERROR, n.E_UNKNOWN_TYPE, f"unknown frame type 0x{t:02x}")
    data = n.encode(frame) + n.encode((n.PONG, 5))
    assert n.Decoder().feed(data) == [want, (n.PONG, 5)]
    assert n.Decoder(internal=False).feed(data) == [want, (n.PONG, 5)]
    # Identical to what a never-assigned type gets, whatever the payload.
    assert decode(raw(t, b"")) == [want]
    assert decode(raw(t, b"\xff\xfe\xfd")) == [want]
    other = decode(raw(0x45, b"abc"))
    assert other == [(n.DECODE_ERROR, n.E_UNKNOWN_TYPE, "unknown frame type 0x45")]


def internal_fixed_part_len(frame: tuple) -> int:
    payload_len = len(n.encode(frame)) - 5
    return payload_len - len(frame[-1]) if frame[0] == n.ROUTE_SEND else payload_len


@pytest.mark.parametrize("frame", INTERNAL_SAMPLES, ids=lambda f: hex(f[0]))
def test_internal_truncated_fields_are_bad_frame(frame: tuple) -> None:
    payload = n.encode(frame)[5:]
    for cut in range(internal_fixed_part_len(frame)):
        code, reason = only_internal_error(raw(frame[0], payload[:cut]))[1:]
        assert code == n.E_BAD_FRAME, (cut, reason)
        assert "truncated" in reason


@pytest.mark.parametrize(
    "frame", [f for f in INTERNAL_SAMPLES if f[0] != n.ROUTE_SEND], ids=lambda f: hex(f[0])
)
def test_internal_trailing_bytes_are_bad_frame(frame: tuple) -> None:
    _, code, reason = only_internal_error(raw(frame[0], n.encode(frame)[5:] + b"\0"))
    assert code == n.E_BAD_FRAME
    assert "trailing" in reason


INTERNAL_BAD_UTF8_CASES = [
    ((n.ROUTE_SEND, 1, 0, "\x7f\x7f", "m", "t", b""), "sender"),
    ((n.ROUTE_SEND, 1, 0, "s", "\x7f\x7f", "t", b""), "msg_id"),
    ((n.ROUTE_SEND, 1, 0, "s", "m", "\x7f\x7f", b""), "to"),
    ((n.ROUTE_ACK, "\x7f\x7f", "m", 0), "user"),
    ((n.ROUTE_ACK, "u", "\x7f\x7f", 0), "msg_id"),
    ((n.ROUTE_ERROR, "\x7f\x7f", 1, "m", "r"), "user"),
    ((n.ROUTE_ERROR, "u", 1, "\x7f\x7f", "r"), "msg_id"),
    ((n.ROUTE_ERROR, "u", 1, "m", "\x7f\x7f"), "reason"),
]


@pytest.mark.parametrize("frame,field", INTERNAL_BAD_UTF8_CASES, ids=lambda x: str(x))
def test_internal_bad_utf8(frame: tuple, field: str) -> None:
    data = n.encode(frame).replace(b"\x7f\x7f", b"\xff\xfe")
    _, code, reason = only_internal_error(data)
    assert code == n.E_BAD_UTF8
    assert field in reason
    assert only_error(data)[1] == n.E_UNKNOWN_TYPE  # a client decoder never parses it


@pytest.mark.parametrize(
    "frame,match",
    [
        ((n.ROUTE_SEND, 1, 0, "s", "m", "t"), "ROUTE_SEND tuple must have 7 items"),
        ((n.ROUTE_ACK, "u", "m"), "ROUTE_ACK tuple must have 4 items"),
        ((n.ROUTE_ERROR, "u", 1, "m"), "ROUTE_ERROR tuple must have 5 items"),
        ((n.LINK_HELLO, 1, 2), "LINK_HELLO tuple must have 4 items"),
        ((n.ROUTE_SEND, 1, 256, "s", "m", "t", b""), "flags"),
        ((n.ROUTE_SEND, 1, 0, "s", "m", "t", "body"), "body must be bytes"),
        ((n.ROUTE_SEND, 1, 0, "s", "m", "t" * 256, b""), "to is 256 bytes"),
        ((n.ROUTE_ACK, 1, "m", 0), "user must be str"),
        ((n.ROUTE_ERROR, "u", 65536, "m", "r"), "code"),
        ((n.LINK_HELLO, 65536, 1, 1), "worker"),
        ((n.LINK_HELLO, 1, 2**32, 1), "pid"),
        ((n.LINK_HELLO, 1, 1, -1), "epoch"),
    ],
)
def test_encode_rejects_malformed_internal(frame: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        n.encode(frame)
    with pytest.raises(ValueError, match="frame 1"):
        n.encode_batch([(n.PING, 1), frame])


internal_frames = st.one_of(
    st.tuples(st.just(n.ROUTE_SEND), u64, u8, str8, str8, str8, body),
    st.tuples(st.just(n.ROUTE_ACK), str8, str8, u8),
    st.tuples(st.just(n.ROUTE_ERROR), str8, st.integers(0, 65535), str8, str16),
    st.tuples(st.just(n.LINK_HELLO), st.integers(0, 65535), st.integers(0, 2**32 - 1), u64),
)
all_frames = st.one_of(frames, internal_frames)
INTERNAL_TYPES = (n.ROUTE_SEND, n.ROUTE_ACK, n.ROUTE_ERROR, n.LINK_HELLO)


@settings(max_examples=300, deadline=None)
@given(st.lists(all_frames, min_size=1, max_size=8), st.lists(st.integers(0, 10**6), max_size=6))
def test_internal_decode_inverts_encode(fs: list[tuple], cuts: list[int]) -> None:
    data = n.encode_batch(fs, max_frame=1 << 20)
    assert data == b"".join(n.encode(f, max_frame=1 << 20) for f in fs)
    d = n.Decoder(1 << 20, internal=True)
    out: list[tuple] = []
    for chunk in split(data, cuts):
        out += d.feed(chunk)
    assert out == fs
    assert d.pending() == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(all_frames, min_size=1, max_size=8), st.lists(st.integers(0, 10**6), max_size=6))
def test_default_decoder_reports_internal_frames_as_unknown(
    fs: list[tuple], cuts: list[int]
) -> None:
    d = n.Decoder(1 << 20)
    out: list[tuple] = []
    for chunk in split(n.encode_batch(fs, max_frame=1 << 20), cuts):
        out += d.feed(chunk)
    want = [
        (n.DECODE_ERROR, n.E_UNKNOWN_TYPE, f"unknown frame type 0x{f[0]:02x}")
        if f[0] in INTERNAL_TYPES
        else f
        for f in fs
    ]
    assert out == want
    assert d.pending() == 0


def test_feed_login_returns_the_offset_past_the_first_good_login() -> None:
    login = n.encode((n.LOGIN, 1, "alice", ""))
    ping = n.encode((n.PING, 3))
    bad_login = n.encode((n.LOGIN, 1, "x", ""))[:-3] + b"\xff\x00\x00"  # invalid UTF-8 user
    d = n.Decoder()
    # The bytes after it are what a hand-off carries, undecodable ones included.
    tail = b"\x00\x00\x00\x02\x7f\x00" + ping + login[:5]
    frames, end = d.feed_login(bytearray(ping + bad_login + login + tail))
    assert [f[0] for f in frames] == [n.PING, n.DECODE_ERROR, n.LOGIN, n.DECODE_ERROR, n.PING]
    assert end == len(ping + bad_login + login)
    assert d.pending() == 5
    assert d.feed_login(login[5:]) == ([(n.LOGIN, 1, "alice", "")], len(login) - 5)
    assert d.feed_login(ping) == ([(n.PING, 3)], None)


def test_login_device_id_is_an_optional_trailing_field() -> None:
    old = n.encode((n.LOGIN, 1, "u", "t"))
    new = n.encode((n.LOGIN, 1, "u", "t", "phone"))
    assert new == old[:3] + bytes([old[3] + 6]) + old[4:] + b"\x05phone"
    dec = n.Decoder(1 << 16)
    assert dec.feed(old + new) == [(n.LOGIN, 1, "u", "t"), (n.LOGIN, 1, "u", "t", "phone")]
    # Present but empty: refused, so that a LOGIN has one encoding.
    bad = old[:3] + bytes([old[3] + 1]) + old[4:] + b"\x00"
    out = n.Decoder(1 << 16).feed(bad)
    assert out[0][:2] == (n.DECODE_ERROR, n.E_BAD_FRAME), out
    rec = (n.REC_CURSOR, "u", "phone", 7, 1234)
    frame = (n.REPL_APPEND, 1, 3, [rec])
    assert n.Decoder(1 << 16, repl=True).feed(n.encode(frame))[0][3] == [rec]
