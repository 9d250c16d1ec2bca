"""Tests of the replication-link frames of iris_native (docs/replication.md)."""

from __future__ import annotations

import struct

import iris_native as n
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

MAX = 16 << 20

PUT = (n.REC_PUT, "bob", 7, 1_700_000_000_000, "alice", "m1", b"\x00\xff body")
DEL = (n.REC_DEL, "bob", 7)
DEDUP = (n.REC_DEDUP, bytes(range(16)), 5)

SAMPLES = [
    (n.REPL_HELLO, n.REPL_VERSION, "node-a", 2**64 - 1, 65535, n.HELLO_SPLIT, [(0, 5), (65535, 0)]),
    (n.REPL_HELLO, 1, "", 0, 0, 0, []),
    (n.REPL_APPEND, 3, 1, [PUT, DEL, DEDUP]),
    (n.REPL_APPEND, 0, 2**64 - 1, []),
    (n.REPL_ACK, 65535, 42),
    (n.REPL_HEARTBEAT, 1_700_000_000_000, [(2, 9)]),
    (n.REPL_HEARTBEAT, 0, []),
]


def raw(ftype: int, payload: bytes) -> bytes:
    return struct.pack(">IB", len(payload) + 1, ftype) + payload


def decode(data: bytes) -> list[tuple]:
    return n.Decoder(MAX, repl=True).feed(data)


def only_error(data: bytes) -> tuple:
    out = decode(data)
    assert len(out) == 1 and out[0][0] == n.DECODE_ERROR, out
    return out[0]


def test_constants() -> None:
    assert (n.REPL_HELLO, n.REPL_APPEND, n.REPL_ACK, n.REPL_HEARTBEAT) == (0x61, 0x62, 0x63, 0x64)
    assert (n.REC_PUT, n.REC_DEL, n.REC_DEDUP, n.REPL_VERSION) == (1, 2, 3, 2)
    assert n.HELLO_SPLIT == 1


def test_decoder_flag() -> None:
    d = n.Decoder(MAX, repl=True)
    assert d.repl is True and d.internal is False
    assert "repl=True" in repr(d)
    assert n.Decoder().repl is False
    assert n.Decoder(100, internal=True).repl is False
    with pytest.raises(ValueError, match="exclude"):
        n.Decoder(100, internal=True, repl=True)


def test_wire_layout() -> None:
    assert n.encode((n.REPL_ACK, 0x0102, 3)) == raw(0x63, b"\x01\x02" + (3).to_bytes(8, "big"))
    hb = n.encode((n.REPL_HEARTBEAT, 4, [(5, 6)]))
    assert hb == raw(0x64, struct.pack(">QHHQ", 4, 1, 5, 6))
    hello = n.encode((n.REPL_HELLO, 1, "ab", 2, 0x0809, n.HELLO_SPLIT, [(3, 4)]))
    assert hello == raw(0x61, b"\x01\x02ab" + struct.pack(">QHBHHQ", 2, 0x0809, 1, 1, 3, 4))
    recs = [
        (n.REC_PUT, "u", 3, 4, "s", "m", b"xy"),
        (n.REC_DEL, "u", 5),
        (n.REC_DEDUP, b"k" * 16, 6),
    ]
    app = n.encode((n.REPL_APPEND, 1, 2, recs))
    want = struct.pack(">HQI", 1, 2, 3)
    want += b"\x01\x01u" + struct.pack(">QQ", 3, 4) + b"\x01s\x01m" + struct.pack(">I", 2) + b"xy"
    want += b"\x02\x01u" + struct.pack(">Q", 5)
    want += b"\x03" + b"k" * 16 + struct.pack(">Q", 6)
    assert app == raw(0x62, want)


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: hex(f[0]))
def test_roundtrip(frame: tuple) -> None:
    assert decode(n.encode(frame, MAX)) == [frame]


def test_decoded_types() -> None:
    [(_, stream, lsn, [put, dele, dedup])] = decode(n.encode(SAMPLES[2]))
    assert type(put[6]) is bytes and type(dedup[1]) is bytes and len(dedup[1]) == 16
    assert type(put) is tuple
    [hello] = decode(n.encode(SAMPLES[0]))
    assert type(hello[6]) is list and hello[6][0] == (0, 5)


def test_batch_and_byte_by_byte() -> None:
    data = n.encode_batch(SAMPLES, MAX)
    assert data == b"".join(n.encode(f, MAX) for f in SAMPLES)
    d = n.Decoder(MAX, repl=True)
    out: list[tuple] = []
    for i in range(len(data)):
        out += d.feed(data[i : i + 1])
    assert out == SAMPLES


def test_records_may_be_tuples() -> None:
    assert decode(n.encode((n.REPL_APPEND, 1, 1, (DEL,)))) == [(n.REPL_APPEND, 1, 1, [DEL])]


@pytest.mark.parametrize("flags", [0, n.HELLO_SPLIT, 0xFE, 0xFF])
@pytest.mark.parametrize("workers", [0, 1, 16, 65535])
def test_hello_workers_and_flags_roundtrip(workers: int, flags: int) -> None:
    frame = (n.REPL_HELLO, n.REPL_VERSION, "node-b", 7, workers, flags, [(1, 2)])
    data = n.encode(frame)
    # workers u16 and flags u8 sit right after epoch u64.
    assert data[5:] == bytes([n.REPL_VERSION]) + b"\x06node-b" + struct.pack(
        ">QHBHHQ", 7, workers, flags, 1, 1, 2
    )
    # Reserved flag bits are carried through unchanged; interpreting them is up to the receiver.
    [(_, _, _, _, got_workers, got_flags, lsns)] = decode(data)
    assert (got_workers, got_flags, lsns) == (workers, flags, [(1, 2)])
    assert bool(got_flags & n.HELLO_SPLIT) == bool(flags & 1)


def test_hello_truncated_before_flags_is_bad_frame() -> None:
    # version, node, epoch and workers present; the flags byte is missing.
    payload = b"\x01\x01n" + struct.pack(">QH", 1, 4)
    _, code, reason = only_error(raw(n.REPL_HELLO, payload))
    assert code == n.E_BAD_FRAME
    assert reason.startswith("REPL_HELLO") and "truncated in field flags" in reason, reason
    # Every shorter prefix of a full HELLO is truncated as well.
    data = n.encode(SAMPLES[0])
    for cut in range(len(data) - 5):
        _, code, reason = only_error(raw(n.REPL_HELLO, data[5 : 5 + cut]))
        assert code == n.E_BAD_FRAME and "truncated" in reason, (cut, reason)


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: hex(f[0]))
def test_rejected_on_client_and_worker_links(frame: tuple) -> None:
    data = n.encode(frame, MAX)
    want = (n.DECODE_ERROR, n.E_UNKNOWN_TYPE, f"unknown frame type 0x{frame[0]:02x}")
    assert n.Decoder(MAX).feed(data) == [want]
    assert n.Decoder(MAX, internal=True).feed(data) == [want]


def test_client_and_worker_frames_rejected_on_repl_link() -> None:
    for f in [(n.PING, 1), (n.SEND, "m", "t", b""), (n.LINK_HELLO, 1, 2, 3)]:
        assert decode(n.encode(f)) == [
            (n.DECODE_ERROR, n.E_UNKNOWN_TYPE, f"unknown frame type 0x{f[0]:02x}")
        ]


def test_truncations_and_count_mismatch() -> None:
    data = n.encode(SAMPLES[2])
    t, payload = data[4], data[5:]
    for cut in range(len(payload)):
        _, code, reason = only_error(raw(t, payload[:cut]))
        assert code == n.E_BAD_FRAME and "truncated" in reason, (cut, reason)
    e = only_error(raw(t, payload[:-1]))
    assert e[1] == n.E_BAD_FRAME and "field ts_ms" in e[2] and e[2].endswith("(record 2)")
    more = payload[:10] + struct.pack(">I", 4) + payload[14:]
    assert "truncated in field kind" in only_error(raw(t, more))[2]
    fewer = payload[:10] + struct.pack(">I", 2) + payload[14:]
    e = only_error(raw(t, fewer))
    assert e[1] == n.E_BAD_FRAME and "trailing" in e[2]


def test_unknown_record_kind() -> None:
    payload = struct.pack(">HQI", 1, 1, 1) + b"\x09rest"
    assert only_error(raw(0x62, payload)) == (
        n.DECODE_ERROR,
        n.E_BAD_FRAME,
        "REPL_APPEND record 0 has unknown record kind 9",
    )


def test_bad_utf8() -> None:
    data = bytearray(n.encode((n.REPL_APPEND, 1, 1, [(n.REC_DEL, "\x7f\x7f", 1)])))
    i = data.index(b"\x7f\x7f")
    data[i : i + 2] = b"\xff\xfe"
    e = only_error(bytes(data))
    assert e[1] == n.E_BAD_UTF8 and "field user" in e[2]
    data = bytearray(n.encode((n.REPL_HELLO, 1, "\x7f", 1, 2, 0, [])))
    data[data.index(b"\x7f")] = 0xFF
    assert only_error(bytes(data))[1] == n.E_BAD_UTF8


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        ((n.REPL_ACK, 1), "REPL_ACK tuple must have 3 items"),
        ((n.REPL_ACK, 65536, 1), "REPL_ACK field stream"),
        ((n.REPL_APPEND, 1, 1, "x"), "field records must be a list"),
        ((n.REPL_APPEND, 1, 1, [DEL, "x"]), "REPL_APPEND record 1: record must be a tuple"),
        ((n.REPL_APPEND, 1, 1, [(9, "u")]), "record 0: unknown record kind 9"),
        ((n.REPL_APPEND, 1, 1, [(n.REC_DEL, "u")]), "REC_DEL tuple must have 3 items"),
        ((n.REPL_APPEND, 1, 1, [(n.REC_DEDUP, b"short", 1)]), "key must be 16 bytes, got 5"),
        (
            (n.REPL_APPEND, 1, 1, [(n.REC_PUT, "u", 1, 1, "s", "m", "b")]),
            "field body must be bytes",
        ),
        ((n.REPL_APPEND, 1, 1, [(n.REC_PUT, "u", 1, 1, "x" * 256, "m", b"")]), "field sender"),
        ((n.REPL_HELLO, 1, "n", 1, [(1, 2)]), "REPL_HELLO tuple must have 7 items"),
        ((n.REPL_HELLO, 1, "n", 1, 65536, 0, []), "REPL_HELLO field workers"),
        ((n.REPL_HELLO, 1, "n", 1, 1, 256, []), "REPL_HELLO field flags"),
        ((n.REPL_HELLO, 1, "n", 1, 1, 0, [(1, -1)]), "field applied item 0"),
        ((n.REPL_HELLO, 1, "n", 1, 1, 0, [(0, 0)] * 65536), "at most 65535"),
        ((n.REPL_HEARTBEAT, 1, 5), "field last_lsn must be a list"),
    ],
)
def test_encode_errors(frame: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        n.encode(frame, MAX)
    with pytest.raises(ValueError, match="frame 1"):
        n.encode_batch([(n.PING, 1), frame], MAX)


def test_max_frame_applies() -> None:
    f = (n.REPL_APPEND, 1, 1, [(n.REC_PUT, "u", 1, 1, "s", "m", b"x" * 70000)])
    with pytest.raises(ValueError, match="exceeds max_frame"):
        n.encode(f)
    data = n.encode(f, MAX)
    assert decode(data) == [f]
    assert n.Decoder(65536, repl=True).feed(data)[0][1] == n.E_FRAME_TOO_LARGE


u16 = st.integers(0, 2**16 - 1)
u64 = st.integers(0, 2**64 - 1)
s8 = st.text(max_size=60).filter(lambda s: len(s.encode()) <= 255)
records = st.one_of(
    st.tuples(st.just(n.REC_PUT), s8, u64, u64, s8, s8, st.binary(max_size=300)),
    st.tuples(st.just(n.REC_DEL), s8, u64),
    st.tuples(st.just(n.REC_DEDUP), st.binary(min_size=16, max_size=16), u64),
)
lsns = st.lists(st.tuples(u16, u64), max_size=10)
repl_frames = st.one_of(
    st.tuples(st.just(n.REPL_HELLO), st.integers(0, 255), s8, u64, u16, st.integers(0, 255), lsns),
    st.tuples(st.just(n.REPL_APPEND), u16, u64, st.lists(records, max_size=8)),
    st.tuples(st.just(n.REPL_ACK), u16, u64),
    st.tuples(st.just(n.REPL_HEARTBEAT), u64, lsns),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(repl_frames, min_size=1, max_size=6), st.lists(st.integers(0, 10**6), max_size=5))
def test_roundtrip_property(frames: list[tuple], cuts: list[int]) -> None:
    data = n.encode_batch(frames, MAX)
    points = sorted(c % (len(data) + 1) for c in cuts)
    d = n.Decoder(MAX, repl=True)
    out: list[tuple] = []
    prev = 0
    for p in [*points, len(data)]:
        out += d.feed(data[prev:p])
        prev = p
    assert out == frames
    assert d.pending() == 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_byte_soup_never_raises(data: bytes) -> None:
    d = n.Decoder(1024, repl=True)
    for item in d.feed(data):
        assert isinstance(item, tuple)
