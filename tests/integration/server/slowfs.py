"""A FUSE passthrough filesystem that makes chosen files slow: a stand-in for a stalling disk
under one volume, for the loop-never-blocks test.

Run as a process: ``python slowfs.py BACKING MOUNTPOINT CONTROL``. Everything under MOUNTPOINT
is BACKING, passed through. Files whose path contains the substring named in the CONTROL file
(a JSON object: ``match``, ``write_delay_s``, ``fsync_delay_s``; re-read at most every 50 ms,
so a test can start and stop the stall) sleep that long in every ``write`` and ``fsync``.
Everything else is served at once, by libfuse's multithreaded loop, so one slow file never
delays another. (The kernel still orders the writes and fsyncs of one file: while one of them
sleeps, the others of that file wait.)

Why FUSE and not dm-delay: this kernel has no device-mapper (``dmsetup targets`` fails), and a
FUSE filesystem can slow one volume of a data directory and leave the other at full speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import sys
import threading
import time
from typing import Any

import mfusepy

#: How often the control file is read again.
CONTROL_POLL_S = 0.05

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate64
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


class SlowPassthrough(mfusepy.Operations):
    use_ns = True

    def __init__(self, backing: str, control: str) -> None:
        self._root = os.path.realpath(backing)
        self._control = os.path.realpath(control)  # libfuse changes to / when mounting
        self._lock = threading.Lock()
        self._read_at = 0.0
        self._rules: dict[str, Any] = {}

    # -- the stall --

    def _delay(self, path: str, key: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._read_at > CONTROL_POLL_S:
                self._read_at = now
                try:
                    with open(self._control) as f:
                        self._rules = json.load(f)
                except (OSError, ValueError):
                    self._rules = {}
            rules = self._rules
        match = rules.get("match")
        if match and match in path:
            seconds = float(rules.get(key, 0.0))
            if seconds > 0:
                time.sleep(seconds)

    def _full(self, path: str) -> str:
        return os.path.join(self._root, path.lstrip("/"))

    # -- metadata --

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.fstat(fh) if fh is not None else os.lstat(self._full(path))
        keys = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks", "st_ino")
        out: dict[str, Any] = {k: getattr(st, k) for k in keys}
        out.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        out["st_blksize"] = st.st_blksize
        return out

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._full(path))]

    def mkdir(self, path: str, mode: int) -> int:
        os.mkdir(self._full(path), mode)
        return 0

    def rmdir(self, path: str) -> int:
        os.rmdir(self._full(path))
        return 0

    def unlink(self, path: str) -> int:
        os.unlink(self._full(path))
        return 0

    def rename(self, old: str, new: str) -> int:
        os.rename(self._full(old), self._full(new))
        return 0

    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._full(path), mode)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        os.utime(self._full(path), ns=times)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._full(path))
        keys = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree")
        return {k: getattr(st, k) for k in keys} | {"f_namemax": st.f_namemax}

    # -- files --

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        return os.open(self._full(path), os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)

    def open(self, path: str, flags: int) -> int:
        return os.open(self._full(path), flags & ~(os.O_CREAT | os.O_EXCL))

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        self._delay(path, "write_delay_s")
        return os.pwrite(fh, data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._full(path), length)
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        self._delay(path, "fsync_delay_s")
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        return 0

    def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> int:
        self._delay(path, "write_delay_s")
        if _fallocate(fh, mode, offset, size) != 0:
            return -ctypes.get_errno()
        return 0


def main() -> None:
    backing, mountpoint, control = sys.argv[1:4]
    try:
        mfusepy.FUSE(
            SlowPassthrough(backing, control),
            mountpoint,
            foreground=True,
            nothreads=False,
            allow_other=False,
        )
    except RuntimeError as exc:
        print(f"slowfs: cannot mount {mountpoint}: {exc}", file=sys.stderr)
        sys.exit(errno.EIO)


if __name__ == "__main__":
    main()
