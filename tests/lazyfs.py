"""A FUSE filesystem for power-loss tests: file data reaches the "disk" only when fsynced.

In the spirit of Jepsen's LazyFS. The mount serves files from memory; a backing directory on
the real disk plays the part of the durable medium. Every ``write``/``truncate`` changes the
in-memory file at once (so every process sees it, through ``read`` and through shared ``mmap``,
which FUSE serves from the page cache when the mount is not ``direct_io``), and is kept in a
per-file list of pending (unsynced) changes. ``fsync``/``fdatasync`` of a file (the kernel
routes both to the ``fsync`` handler; the flag is ``datasync``) and writes through a descriptor
opened with ``O_SYNC``/``O_DSYNC`` apply that file's changes to the backing directory.
Namespace operations (create, mkdir, unlink, rename) are durable at once, like a journaled
filesystem's metadata; that is the weaker model, and it does not help LMDB, whose files exist
from the first open.

A power cut is commanded over a Unix control socket (``LazyFS.command``):

* ``crash drop``: every pending change is lost (LazyFS's ``clear-cache``).
* ``crash keep P SEED``: each pending 4 KiB piece of a write reaches the disk with probability
  P, independently and in any order, the rest is lost: the kernel had written back some dirty
  pages before the power went, in an order that need not be the order of the writes. This is
  what a real page cache does, and what breaks a database that writes its meta page before an
  fsync of the pages it points to.

Either way the daemon holds its lock from the moment the command arrives, so no operation
completes after the cut, then exits: the mount answers ``ENOTCONN`` from then on and the
caller kills the processes that used it and unmounts it. A new daemon on the same backing
directory is the machine after the power came back.

``full on`` makes every write that would grow a file fail with ``ENOSPC`` (``full off`` ends
it); ``stats`` answers counters as JSON.

Run as ``python tests/lazyfs.py MOUNTPOINT BACKING CONTROL_SOCKET``; ``LazyFS.start`` does that
and waits for the mount.
"""

from __future__ import annotations

import errno
import json
import os
import random
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PIECE = 4096


class _File:
    __slots__ = ("data", "pending", "mode", "mtime")

    def __init__(self, data: bytes, mode: int) -> None:
        self.data = bytearray(data)
        # ("w", offset, bytes) | ("t", length), oldest first
        self.pending: list[tuple[Any, ...]] = []
        self.mode = mode
        self.mtime = time.time()


def _serve(mountpoint: str, backing: str, control: str) -> None:
    import mfusepy as fuse

    class Lazy(fuse.Operations):
        use_ns = False

        def __init__(self) -> None:
            self.mutex = threading.Lock()
            self.backing = backing
            self.files: dict[str, _File] = {}
            self.dirs: dict[str, int] = {"/": 0o755}
            self.fh_flags: dict[int, int] = {}
            self.next_fh = 1
            self.full = False
            self.counters = {"fsyncs": 0, "writes": 0, "sync_writes": 0, "enospc": 0}
            for root, dirnames, filenames in os.walk(backing):
                rel = "/" + os.path.relpath(root, backing)
                rel = "/" if rel == "/." else rel
                for d in dirnames:
                    self.dirs[os.path.join(rel, d)] = 0o755
                for f in filenames:
                    with open(os.path.join(root, f), "rb") as fp:
                        self.files[os.path.join(rel, f)] = _File(fp.read(), 0o644)

        def _real(self, path: str) -> str:
            return os.path.join(self.backing, path.lstrip("/"))

        def _apply(self, path: str, changes: list[tuple[Any, ...]]) -> None:
            if not changes:
                return
            fd = os.open(self._real(path), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                for ch in changes:
                    if ch[0] == "w":
                        os.pwrite(fd, ch[2], ch[1])
                    else:
                        os.ftruncate(fd, ch[1])
            finally:
                os.close(fd)

        # -- control (called from the control thread) --------------------------------------

        def crash(self, keep: float, seed: int) -> dict[str, int]:
            """Take the lock for good: apply the surviving pending changes, drop the rest."""
            self.mutex.acquire()
            rng = random.Random(seed)
            kept = dropped = 0
            for path, f in self.files.items():
                survivors: list[tuple[Any, ...]] = []
                for ch in f.pending:
                    if keep <= 0:
                        dropped += 1
                        continue
                    if ch[0] == "t":
                        if rng.random() < keep:
                            survivors.append(ch)
                            kept += 1
                        else:
                            dropped += 1
                        continue
                    off, data = ch[1], ch[2]
                    pos = 0
                    while pos < len(data):
                        end = min(len(data), pos + PIECE - (off + pos) % PIECE)
                        if rng.random() < keep:
                            survivors.append(("w", off + pos, data[pos:end]))
                            kept += 1
                        else:
                            dropped += 1
                        pos = end
                rng.shuffle(survivors)  # written back in no particular order
                self._apply(path, survivors)
            return {"kept": kept, "dropped": dropped}

        # -- metadata ------------------------------------------------------------------------

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            with self.mutex:
                if path in self.dirs:
                    return {"st_mode": stat.S_IFDIR | self.dirs[path], "st_nlink": 2}
                f = self.files.get(path)
                if f is None:
                    raise fuse.FuseOSError(errno.ENOENT)
                return {
                    "st_mode": stat.S_IFREG | f.mode,
                    "st_nlink": 1,
                    "st_size": len(f.data),
                    "st_mtime": f.mtime,
                    "st_ctime": f.mtime,
                    "st_atime": f.mtime,
                    "st_uid": os.getuid(),
                    "st_gid": os.getgid(),
                }

        def readdir(self, path: str, fh: int) -> list[str]:
            with self.mutex:
                prefix = path.rstrip("/") + "/"
                names = [".", ".."]
                for p in list(self.dirs) + list(self.files):
                    if p != "/" and p.startswith(prefix) and "/" not in p[len(prefix) :]:
                        names.append(p[len(prefix) :])
                return names

        def mkdir(self, path: str, mode: int) -> int:
            with self.mutex:
                os.makedirs(self._real(path), exist_ok=True)
                self.dirs[path] = mode & 0o7777
                return 0

        def rmdir(self, path: str) -> int:
            with self.mutex:
                os.rmdir(self._real(path))
                self.dirs.pop(path, None)
                return 0

        def unlink(self, path: str) -> int:
            with self.mutex:
                if self.files.pop(path, None) is None:
                    raise fuse.FuseOSError(errno.ENOENT)
                try:
                    os.unlink(self._real(path))
                except FileNotFoundError:
                    pass
                return 0

        def rename(self, old: str, new: str) -> int:
            with self.mutex:
                if old in self.files:
                    self.files[new] = self.files.pop(old)
                elif old in self.dirs:
                    self.dirs[new] = self.dirs.pop(old)
                else:
                    raise fuse.FuseOSError(errno.ENOENT)
                os.rename(self._real(old), self._real(new))
                return 0

        def chmod(self, path: str, mode: int) -> int:
            with self.mutex:
                if path in self.files:
                    self.files[path].mode = mode & 0o7777
                return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            return 0

        def utimens(self, path: str, times: Any = None) -> int:
            return 0

        def statfs(self, path: str) -> dict[str, int]:
            return {"f_bsize": PIECE, "f_frsize": PIECE, "f_blocks": 1 << 20,
                    "f_bfree": 1 << 19, "f_bavail": 1 << 19, "f_namemax": 255}  # fmt: skip

        # -- data ----------------------------------------------------------------------------

        def _open_fh(self, flags: int) -> int:
            fh = self.next_fh
            self.next_fh += 1
            self.fh_flags[fh] = flags
            return fh

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            with self.mutex:
                if path not in self.files:
                    self.files[path] = _File(b"", mode & 0o7777)
                    open(self._real(path), "ab").close()
                return self._open_fh(os.O_RDWR)

        def open(self, path: str, flags: int) -> int:
            with self.mutex:
                if path not in self.files:
                    raise fuse.FuseOSError(errno.ENOENT)
                return self._open_fh(flags)

        def release(self, path: str, fh: int) -> int:
            with self.mutex:
                self.fh_flags.pop(fh, None)
                return 0

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            with self.mutex:
                f = self.files.get(path)
                if f is None:
                    raise fuse.FuseOSError(errno.ENOENT)
                return bytes(f.data[offset : offset + size])

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            with self.mutex:
                f = self.files.get(path)
                if f is None:
                    raise fuse.FuseOSError(errno.ENOENT)
                end = offset + len(data)
                if self.full and end > len(f.data):
                    self.counters["enospc"] += 1
                    raise fuse.FuseOSError(errno.ENOSPC)
                if end > len(f.data):
                    f.data.extend(bytes(end - len(f.data)))
                f.data[offset:end] = data
                f.mtime = time.time()
                self.counters["writes"] += 1
                change = ("w", offset, bytes(data))
                if self.fh_flags.get(fh, 0) & (os.O_SYNC | os.O_DSYNC):
                    # Synchronous descriptor: this write and everything before it is durable.
                    self.counters["sync_writes"] += 1
                    self._apply(path, [*f.pending, change])
                    f.pending = []
                else:
                    f.pending.append(change)
                return len(data)

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            with self.mutex:
                f = self.files.get(path)
                if f is None:
                    raise fuse.FuseOSError(errno.ENOENT)
                if self.full and length > len(f.data):
                    raise fuse.FuseOSError(errno.ENOSPC)
                if length < len(f.data):
                    del f.data[length:]
                else:
                    f.data.extend(bytes(length - len(f.data)))
                f.pending.append(("t", length))
                return 0

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            with self.mutex:
                f = self.files.get(path)
                if f is not None:
                    self._apply(path, f.pending)
                    f.pending = []
                self.counters["fsyncs"] += 1
                return 0

        def flush(self, path: str, fh: int) -> int:
            return 0

    ops = Lazy()

    def control_loop() -> None:
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(control)
        srv.listen(4)
        while True:
            conn, _ = srv.accept()
            with conn:
                words = conn.recv(4096).decode().split()
                if words[:1] == ["crash"]:
                    keep = float(words[2]) if words[1:2] == ["keep"] else 0.0
                    seed = int(words[3]) if len(words) > 3 else 0
                    result = ops.crash(keep, seed)
                    conn.sendall(json.dumps(result).encode())
                    conn.close()
                    # The power is off: nothing after this point reaches the "disk".
                    os._exit(0)
                elif words == ["full", "on"] or words == ["full", "off"]:
                    with ops.mutex:
                        ops.full = words[1] == "on"
                    conn.sendall(b"{}")
                elif words == ["stats"]:
                    with ops.mutex:
                        pending = sum(len(f.pending) for f in ops.files.values())
                        conn.sendall(json.dumps({**ops.counters, "pending": pending}).encode())
                else:
                    conn.sendall(json.dumps({"error": f"unknown command {words}"}).encode())

    threading.Thread(target=control_loop, daemon=True).start()
    # kernel_cache: the page cache is not dropped on each open (one mount, every change goes
    # through this kernel, so it is never stale), which keeps LMDB's shared mmap of lock.mdb
    # coherent between its processes. No direct_io: mmap must work.
    fuse.FUSE(ops, mountpoint, foreground=True, nothreads=False, kernel_cache=True)


class LazyFS:
    """One mounted LazyFS daemon (a child process) over ``backing`` at ``mountpoint``."""

    def __init__(self, mountpoint: Path, backing: Path, log_path: Path) -> None:
        self.mountpoint = mountpoint
        self.backing = backing
        self.control = str(mountpoint.parent / f".{mountpoint.name}.ctl")
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> LazyFS:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.backing.mkdir(parents=True, exist_ok=True)
        if os.path.exists(self.control):
            os.unlink(self.control)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(self.mountpoint), str(self.backing), self.control],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"LazyFS could not mount {self.mountpoint} (exit {self.proc.returncode}): "
                    f"{self.log_path.read_text(errors='replace')[-3000:]}"
                )
            if os.path.ismount(self.mountpoint) and os.path.exists(self.control):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"LazyFS did not mount {self.mountpoint} within {timeout} s")

    def command(self, line: str, timeout: float = 30.0) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.control)
            s.sendall(line.encode())
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
                if line != "crash" and not line.startswith("crash "):
                    break
        return json.loads(b"".join(chunks) or b"{}")

    def crash(self, keep: float = 0.0, seed: int = 0) -> dict[str, Any]:
        """Power cut: unsynced data is lost (all of it, or all but a random ``keep`` share)."""
        line = f"crash keep {keep} {seed}" if keep > 0 else "crash drop"
        result = self.command(line)
        assert self.proc is not None
        self.proc.wait(timeout=10)
        return result

    def unmount(self) -> None:
        """Detach the mount (after a crash the daemon is gone and the mount is dead)."""
        subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False,
                       capture_output=True)  # fmt: skip
        deadline = time.monotonic() + 10
        while os.path.ismount(self.mountpoint) and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        """Clean unmount (everything the daemon holds is flushed to the backing first)."""
        if self.proc is not None and self.proc.poll() is None:
            self.unmount()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        else:
            self.unmount()


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2], sys.argv[3])
