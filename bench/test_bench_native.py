"""Figures for the native codec and dedup window (pytest-benchmark; no timing assertions)."""

from __future__ import annotations

import itertools

import iris_native as n

BODY = bytes(range(100))
DELIVER = (n.DELIVER, 1, 1_700_000_000_000, "alice", "0123456789abcdef0123456789abcdef", BODY)


def test_decode_send_frames(benchmark) -> None:
    frames = [(n.SEND, f"{i:032x}", "bob", BODY) for i in range(1000)]
    data = n.encode_batch(frames)

    def run() -> list[tuple]:
        return n.Decoder().feed(data)

    out = benchmark(run)
    assert out == frames
    benchmark.extra_info["frames_per_call"] = len(frames)
    benchmark.extra_info["ns_per_frame"] = round(benchmark.stats.stats.mean * 1e9 / len(frames), 1)


def test_encode_deliver(benchmark) -> None:
    # Many iterations per round so timer overhead does not dominate a ~100 ns call.
    out = benchmark.pedantic(n.encode, args=(DELIVER,), rounds=500, iterations=200)
    assert n.Decoder().feed(out) == [DELIVER]
    benchmark.extra_info["ns_per_frame"] = round(benchmark.stats.stats.mean * 1e9, 1)


def test_encode_batch_100_deliver(benchmark) -> None:
    frames = [(n.DELIVER, i + 1, *DELIVER[2:]) for i in range(100)]
    out = benchmark(n.encode_batch, frames)
    assert n.Decoder().feed(out) == frames
    benchmark.extra_info["us_per_batch"] = round(benchmark.stats.stats.mean * 1e6, 2)
    benchmark.extra_info["ns_per_frame"] = round(benchmark.stats.stats.mean * 1e9 / 100, 1)


def test_dedup_check_and_insert_fresh(benchmark) -> None:
    window = n.DedupWindow(100_000, 60_000)
    counter = itertools.count()
    per_round = 1000

    def fresh_ids() -> tuple[tuple[list[str]], dict]:
        # Built outside the timed region: only the check itself is measured.
        return ([f"{next(counter):032x}" for _ in range(per_round)],), {}

    def run(ids: list[str]) -> list[int]:
        # The life of an entry in the server: checked (pending), then completed. Pending
        # entries are never evicted, so without the mark_done nothing would go.
        check, done = window.check_and_insert, window.mark_done
        return [(check("alice", msg_id, 1_000), done("alice", msg_id))[0] for msg_id in ids]

    results = benchmark.pedantic(run, setup=fresh_ids, rounds=300)
    assert results == [n.DEDUP_NEW] * per_round
    assert len(window) == 100_000  # 300k fresh keys through a 100k window
    benchmark.extra_info["ns_per_check"] = round(benchmark.stats.stats.mean * 1e9 / per_round, 1)
