"""Restart reload of the dedup window: seconds and peak RSS to load N persisted entries.

Writes N entries (default 1,000,000; 1,000 senders; timestamps spread over the last half hour)
into a real LMDB dedup table in the current layout (``dedup:0``: ``ts | key16 | sender u64``
keys), then loads them in two fresh processes, one after the other, in the same run:

* ``before``: the reload as of commit 167d589 (``load_dedup``: a Python list of (key, ts) tuples,
  then one ``DedupWindow.insert_key`` call per entry; same code, reading ``dedup:0``). With
  ``--old-native DIR`` (a directory holding the iris_native extension built from 167d589, e.g.
  ``pip install --target DIR``) it runs with that extension, i.e. the old window too; without
  it, with the current window.
* ``after``: the current reload (``MailboxStore.iter_dedup`` chunks into ``DedupWindow.load``).

Each process reports the load's wall seconds, its RSS before the load, its RSS once loaded
(window alive), its peak RSS (``ru_maxrss``: the load's transient garbage included); ``after``
also the window's own ``memory_bytes`` per entry. RSS includes the LMDB pages read (the map is
file-backed), the same in both.
Figures only, no assertions.

    python bench/dedup_restart.py --entries 1000000 [--old-native /tmp/dedup_old/site]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time

import lmdb

_U64 = struct.Struct(">Q")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(path: str, n: int, senders: int) -> None:
    import iris_native as N

    env = lmdb.open(path, map_size=1 << 33, max_dbs=300, sync=False, metasync=False)
    db = env.open_db(b"dedup:0")
    with env.begin(write=True, db=env.open_db(b"meta")) as txn:
        # Worker 0 of 1 last reloaded with --workers 1: the reload reads its own table only.
        txn.put(b"dedup_workers:0", _U64.pack(1))
    now = int(time.time() * 1000)
    span = 30 * 60 * 1000
    hashes = [N.dedup_sender(f"user{s}") for s in range(senders)]
    step = 100_000
    for start in range(0, n, step):
        with env.begin(write=True, db=db) as txn:
            items = []
            for i in range(start, min(start + step, n)):
                s = i % senders
                ts = now - span + span * i // n
                key = _U64.pack(ts) + N.dedup_key(f"user{s}", f"m{i}") + _U64.pack(hashes[s])
                items.append((key, b""))
            txn.cursor().putmulti(items, append=False)
    env.sync(True)
    env.close()


def load_before(path: str, entries: int) -> dict:
    """The reload of commit 167d589 (worker.__init__ + MailboxStore.load_dedup), verbatim."""
    from iris_native import DEDUP_DONE, DedupWindow

    env = lmdb.open(path, max_dbs=300, readonly=False, lock=True)
    dedup_db = env.open_db(b"dedup:0")
    window = DedupWindow(entries, 3600 * 1000)
    base = rss_bytes()
    t0 = time.perf_counter()
    floor = int(time.time() * 1000) - 3600 * 1000
    out = []
    with env.begin(db=dedup_db) as txn:
        cur = txn.cursor()
        if cur.set_range(_U64.pack(max(floor, 0))):
            for key in cur.iternext(keys=True, values=False):
                out.append((key[8:24], _U64.unpack_from(key, 0)[0]))
    for key, ts in out:
        window.insert_key(key, DEDUP_DONE, ts)
    seconds = time.perf_counter() - t0
    loaded = len(out)
    del out
    return {
        "seconds": seconds, "loaded": loaded, "len": len(window), "rss_before": base,
        "rss_loaded": rss_bytes(),
    }  # fmt: skip


def load_after(path: str, entries: int) -> dict:
    """The current reload: MailboxStore.iter_dedup chunks into DedupWindow.load."""
    import asyncio

    from iris_native import DedupWindow

    from iris_fast.storage.mailbox import MailboxStore

    loop = asyncio.new_event_loop()
    store = MailboxStore(path, loop, map_size=1 << 33)
    window = DedupWindow(entries, 3600 * 1000)
    base = rss_bytes()
    t0 = time.perf_counter()
    now_ms = int(time.time() * 1000)
    loaded = 0
    for chunk in store.iter_dedup(3600 * 1000, workers=1):
        loaded += window.load(chunk, now_ms)
    seconds = time.perf_counter() - t0
    out = {
        "seconds": seconds,
        "loaded": loaded,
        "len": len(window),
        "rss_before": base,
        "rss_loaded": rss_bytes(),
        "window_bytes": window.memory_bytes,
        "window_bytes_per_entry": window.memory_bytes / max(len(window), 1),
        "senders": window.senders,
    }
    store.close()
    return out


def child(which: str, path: str, entries: int) -> None:
    result = (load_before if which == "before" else load_after)(path, entries)
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))


def run(which: str, path: str, entries: int, old_native: str | None) -> dict:
    env = dict(os.environ)
    if which == "before" and old_native:
        env["PYTHONPATH"] = old_native + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--child", which, "--path", path, "--entries", str(entries)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--senders", type=int, default=1_000)
    ap.add_argument("--old-native", help="directory with the iris_native of commit 167d589")
    ap.add_argument("--json", help="write the figures here too")
    ap.add_argument("--child", choices=["before", "after"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.path, args.entries)
        return
    with tempfile.TemporaryDirectory(prefix="iris-dedup-") as tmp:
        path = os.path.join(tmp, "mailbox")
        t0 = time.perf_counter()
        build(path, args.entries, args.senders)
        print(f"wrote {args.entries} entries in {time.perf_counter() - t0:.1f} s", flush=True)
        results = {}
        for which in ("before", "after"):
            r = run(which, path, args.entries, args.old_native)
            results[which] = r
            mib = 1 << 20
            print(
                f"{which:6} load {r['seconds']:.2f} s  loaded {r['loaded']}  held {r['len']}  "
                f"RSS before {r['rss_before'] / mib:.0f} MiB  "
                f"loaded {r['rss_loaded'] / mib:.0f} MiB  peak {r['peak_rss'] / mib:.0f} MiB"
                + (
                    f"  window {r['window_bytes'] / mib:.0f} MiB "
                    f"({r['window_bytes_per_entry']:.1f} B/entry)"
                    if "window_bytes" in r
                    else ""
                ),
                flush=True,
            )
        results["old_native"] = bool(args.old_native)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
