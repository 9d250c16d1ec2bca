"""Cost of the issue-10 retention work on a real LMDB file (figures, no assertions).

* one step of the TTL sweep (``MailboxStore.scan_expired``, TTL_SWEEP_KEYS keys) and a whole
  pass over a mailbox table of many small mailboxes, as one of two workers sees it;
* what an evicted mailbox costs when it is needed again (``scan_mailbox``), by mailbox size;
* a per-sender recount (``sender_usage``) of a full mailbox.

    python bench/retention.py [--users 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

from iris_fast.server.links import home_of
from iris_fast.server.worker import TTL_SWEEP_KEYS
from iris_fast.storage.mailbox import MailboxStore, encode_value, mailbox_key


def _timed(fn, repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=200_000, help="mailboxes of 2 messages each")
    args = ap.parse_args()
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory() as tmp:
        store = MailboxStore(tmp, loop, map_size=4 << 30)
        now_ms = int(time.time() * 1000)
        body = b"b" * 100
        with store.env.begin(write=True, db=store._msgs) as txn:
            for u in range(args.users):
                for seq in (1, 2):
                    txn.put(
                        mailbox_key(f"user-{u}", seq), encode_value("s", f"m{seq}", now_ms, body)
                    )
            for size in (10, 1_000, 10_000):
                for seq in range(size):
                    txn.put(
                        mailbox_key(f"big-{size}", seq),
                        encode_value(f"snd-{seq % 7}", f"m{seq}", now_ms, body),
                    )

        def mine(user: str) -> bool:
            return home_of(user, 2) == 0

        # Nothing expired (cutoff before every message): a step visits one key per mailbox.
        step = _timed(lambda: store.scan_expired(b"", now_ms - 1, TTL_SWEEP_KEYS, mine), 20)
        steps, cursor, t0 = 0, b"", time.perf_counter()
        while True:
            _, cursor = store.scan_expired(cursor, now_ms - 1, TTL_SWEEP_KEYS, mine)
            steps += 1
            if not cursor:
                break
        full = time.perf_counter() - t0
        print(f"TTL sweep, {args.users:,} mailboxes, nothing expired: one step of "
              f"{TTL_SWEEP_KEYS} keys {step * 1e3:.2f} ms; a pass {steps} steps "
              f"({steps} s at one step per second), {full * 1e3:.0f} ms of work")  # fmt: skip
        # Everything expired: a step collects TTL_SWEEP_KEYS messages to delete.
        found = store.scan_expired(b"", now_ms + 1, TTL_SWEEP_KEYS, mine)[0]
        step_all = _timed(lambda: store.scan_expired(b"", now_ms + 1, TTL_SWEEP_KEYS, mine), 20)
        print(f"TTL sweep, everything expired: one step {step_all * 1e3:.2f} ms "
              f"({len(found)} messages found)")  # fmt: skip
        for size in (10, 1_000, 10_000):
            t = _timed(lambda s=size: store.scan_mailbox(f"big-{s}"), 20)
            print(f"rebuilding an evicted mailbox of {size:,} messages (scan_mailbox): "
                  f"{t * 1e6:,.0f} µs")  # fmt: skip
        t = _timed(lambda: store.sender_usage("big-10000"), 10)
        print(f"per-sender recount of a 10,000-message mailbox (sender_usage): {t * 1e3:.1f} ms")
        store.close()
    loop.close()


if __name__ == "__main__":
    main()
