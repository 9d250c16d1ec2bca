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
        count, last, _ = store.scan_mailbox("u")
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
        count, _, _ = store.scan_mailbox("u")
        store.close()
        return count

    assert asyncio.run(run()) == 40


# ---- replication log (docs/replication.md) ------------------------------------------------------


def test_every_change_is_logged_in_its_own_transaction_and_read_back_in_order(tmp_path):
    import iris_native as N

    async def run() -> tuple[list, list, int]:
        loop = asyncio.get_running_loop()
        store = MailboxStore(str(tmp_path), loop, replicated=True, node_id="a", writer_id=3)
        logged: list = []
        store.on_logged = logged.extend
        seqs = [store.next_seq() for _ in range(3)]
        lsns = [store.put("u", s, "snd", f"m{i}", 7, b"b%d" % i, None, None)
                for i, s in enumerate(seqs)]  # fmt: skip
        store.delete("u", seqs[0])
        store.put_dedup(b"k" * 16, 99, 12345)
        done = asyncio.Event()
        store.barrier(done.set)
        await asyncio.wait_for(done.wait(), 10)
        back = store.read_log(1, 100, 1 << 20)
        store.close()
        assert lsns == [1, 2, 3]
        return logged, back, seqs[0]

    logged, back, seq0 = asyncio.run(run())
    assert [lsn for lsn, _ in logged] == [1, 2, 3, 4, 5]
    assert back == logged, "what was sent live equals what catch-up reads from the log"
    assert back[0][1] == (N.REC_PUT, "u", seq0, 7, "snd", "m0", b"b0")
    assert back[3][1] == (N.REC_DEL, "u", seq0)
    assert back[4][1] == (N.REC_DEDUP, b"k" * 16, 99, 12345)

    # The LSN survives a restart; trimming removes what the peer acknowledged.
    async def reopen() -> tuple[int, int, list]:
        store = MailboxStore(str(tmp_path), asyncio.get_running_loop(), replicated=True,
                             node_id="a", writer_id=3)  # fmt: skip
        lsn = store.lsn
        store.trim_log(3)
        done = asyncio.Event()
        store.barrier(done.set)
        await asyncio.wait_for(done.wait(), 10)
        first = store.log_first()
        rest = [lsn for lsn, _ in store.read_log(0, 100, 1 << 20)]
        store.close()
        return lsn, first, rest

    assert asyncio.run(reopen()) == (5, 4, [4, 5])


def test_applied_records_report_what_they_changed_and_persist_the_applied_lsn(tmp_path):
    import iris_native as N

    async def run() -> tuple[list, list, int]:
        store = MailboxStore(str(tmp_path), asyncio.get_running_loop(), replicated=True)
        recs = [
            (N.REC_PUT, "u", 10, 5, "s", "m1", b"x"),
            (N.REC_PUT, "u", 10, 5, "s", "m1", b"x"),  # same key again: not new
            (N.REC_DEL, "u", 10),
            (N.REC_DEL, "u", 10),  # already gone
            (N.REC_DEDUP, b"d" * 16, 5, 6),
        ]
        got: list = []
        done = asyncio.Event()
        store.apply(recs, 42, lambda results: (got.append(results), done.set()))
        await asyncio.wait_for(done.wait(), 10)
        logged = store.read_log(0, 10, 1 << 20)
        store.close()
        reopened = MailboxStore(str(tmp_path), asyncio.get_running_loop())
        applied = reopened.applied
        reopened.close()
        return got, logged, applied

    got, logged, applied = asyncio.run(run())
    assert got == [[True, False, True, False, True]]
    assert logged == [], "the peer's records are not logged again here"
    assert applied == 42


def test_seq_carries_the_node_tag_and_follows_the_peers(tmp_path):
    from iris_fast.storage.mailbox import seq_tag

    async def run() -> tuple[int, int, int]:
        store = MailboxStore(str(tmp_path), asyncio.get_running_loop(), node_id="node-a")
        s1 = store.next_seq()
        store.observe_seq(s1 + (1000 << 8) + 7)  # a later seq handed out by the peer
        s2 = store.next_seq()
        store.close()
        return s1, s1 + (1000 << 8) + 7, s2

    s1, peer, s2 = asyncio.run(run())
    assert s1 & 0xFF == seq_tag("node-a") and s2 & 0xFF == seq_tag("node-a")
    assert s2 > peer > s1


def test_a_failing_disk_is_retried_at_its_pace_and_held_work_counts_as_queued(tmp_path):
    """While commits fail, new work must neither hurry the retries (each operation notifies the
    writer) nor vanish from ``queued``, the back-pressure signal."""
    import lmdb

    from iris_fast.storage import mailbox as M

    async def run() -> tuple[int, int, int, list[int]]:
        loop = asyncio.get_running_loop()
        store = MailboxStore(str(tmp_path), loop)
        real_apply = store._apply_growing
        failing = True

        def apply(ops):
            if failing:
                raise lmdb.DiskError("No space left on device (simulated)")
            real_apply(ops)

        store._apply_growing = apply
        done: list[int] = []
        store.put("u", store.next_seq(), "s", "m0", 1, b"x", None, lambda: done.append(0))
        started = loop.time()
        n = 1
        while loop.time() - started < 10 * M.RETRY_S:  # bounded: about 2 s of new work
            store.put_dedup(bytes(16), 1, 0, lambda i=n: done.append(i))  # each one notifies
            n += 1
            await asyncio.sleep(0.01)
        failures, queued = store.commit_failures, store.queued
        failing = False
        finished = asyncio.Event()
        store.barrier(finished.set)
        await asyncio.wait_for(finished.wait(), 10)
        store.close()
        return failures, queued, n, done

    failures, queued, n, done = asyncio.run(run())
    assert failures <= 10 + 4, f"{failures} attempts in 10 retry pauses"
    assert queued >= n - 5, f"only {queued} of {n} held operations counted as queued"
    assert done == list(range(n)), "every held operation completes, in order, once space is back"
