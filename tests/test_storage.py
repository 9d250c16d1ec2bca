"""MailboxStore on its own: real LMDB files, the group-commit thread, map growth."""

from __future__ import annotations

import asyncio

import pytest

from iris_fast.storage.mailbox import MailboxStore, decode_value, encode_value

pytestmark = pytest.mark.timeout(60)


def test_value_codec_round_trip():
    v = encode_value("sender", "id-1", 123456789, b"\x00body\xff")
    assert decode_value(v) == ("sender", "id-1", 123456789, b"\x00body\xff")


def test_puts_commit_in_groups_and_read_back_in_seq_order(tmp_path):
    async def run() -> tuple[list, int, int]:
        loop = asyncio.get_running_loop()
        batches: list[int] = []
        store = MailboxStore(str(tmp_path), loop, on_commit=lambda n, s: batches.append(n))
        done = asyncio.Event()
        acked = []
        seqs = [store.next_seq() for _ in range(500)]
        for i, seq in enumerate(seqs):
            store.put("u", seq, "s", f"m{i}", 1, b"x", None, lambda i=i: acked.append(i))
        store.barrier(done.set)
        await asyncio.wait_for(done.wait(), 10)
        msgs = store.read("u", 0, 1000)
        count, last = store.scan_mailbox("u")
        store.close()
        assert acked == list(range(500))
        assert count == 500 and last == seqs[-1]
        return msgs, len(batches), sum(batches)

    msgs, commits, ops = asyncio.run(run())
    assert [m[2] for m in msgs] == [f"m{i}" for i in range(500)]
    assert ops == 500 and commits < 500


def test_seq_survives_restart_even_if_the_clock_steps_back(tmp_path, monkeypatch):
    async def first() -> int:
        store = MailboxStore(str(tmp_path), asyncio.get_running_loop())
        store.seq_hwm += 10**12  # as if the clock had run far ahead
        seq = store.next_seq()
        done = asyncio.Event()
        store.put("u", seq, "s", "m", 1, b"x", None, done.set)
        await done.wait()
        store.close()
        return seq

    async def second() -> int:
        store = MailboxStore(str(tmp_path), asyncio.get_running_loop())
        seq = store.next_seq()
        store.close()
        return seq

    s1 = asyncio.run(first())
    assert asyncio.run(second()) > s1


def test_map_full_grows_the_map_instead_of_failing(tmp_path):
    async def run() -> int:
        store = MailboxStore(str(tmp_path), asyncio.get_running_loop(), map_size=1 << 20)
        done = asyncio.Event()
        for i in range(40):
            store.put("u", store.next_seq(), "s", f"m{i}", 1, b"y" * 60_000, None, None)
        store.barrier(done.set)
        await asyncio.wait_for(done.wait(), 20)
        count, _ = store.scan_mailbox("u")
        store.close()
        return count

    assert asyncio.run(run()) == 40
