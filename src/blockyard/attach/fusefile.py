"""A FUSE filesystem holding exactly one regular file whose bytes are a BlockDevice.

Two layers:

- :class:`SectorFile` turns byte-addressed file I/O (what FUSE delivers) into block I/O on any
  :class:`~blockyard.blockdev.BlockDevice`. It does not know FUSE and is unit-tested alone.
- :func:`serve` mounts it with libfuse3 through ``mfusepy`` (ctypes; chosen by measurement, see
  docs/attach.md) and runs libfuse's multithreaded loop until the mount goes away.

Contract of the file, as the loop device above it relies on:

- ``read``/``write`` at any offset and length; sub-sector edges are read-modify-written as whole
  512-byte sectors, serialised against every other write so no write is lost.
- A write returning means later reads see it. ``fsync``/``fdatasync`` (what the loop device sends
  for REQ_OP_FLUSH, i.e. what SYNCHRONIZE CACHE becomes) and ``close`` call ``device.flush()``:
  everything acknowledged before is durable when they return.
- ``fallocate(PUNCH_HOLE|KEEP_SIZE)`` (discard) calls ``device.unmap``; ``ZERO_RANGE`` calls
  ``device.write_zeroes``. Both read back as zeros at once.
- Every open is ``direct_io`` so the FUSE file's page cache never holds a second copy of what the
  loop device's page cache (or the filesystem above it) already caches.
- Errors become an errno: see :func:`errno_for`.

Thread safety: every method of :class:`SectorFile` may be called from many threads at once,
which is what libfuse's multithreaded loop does.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from blockyard.attach.errors import AttachError
from blockyard.blockdev import BlockDevice
from blockyard.errors import (
    BlockyardError,
    BlockyardTimeoutError,
    CorruptionError,
    FencedError,
    InvalidArgumentError,
    NoSpaceError,
    NotFoundError,
    StorageIOError,
    VolumeClosedError,
)

log = logging.getLogger(__name__)

#: The one file's name inside the mount.
FILE_NAME = "disk"
#: SBC-4 §6.6.2: the BlockDevice protocol's logical block size; the unit of read-modify-write.
SECTOR_SIZE = 512
#: fallocate(2) mode bits (linux/falloc.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
#: st_blksize reported to stat(2): the engine's physical block, so tools align I/O to it.
PREFERRED_IO_BYTES = 4096
#: lba_status calls one SEEK_DATA/SEEK_HOLE may make before answering conservatively.
SEEK_RUNS_MAX = 4096
#: Largest single FUSE request libfuse 3.14 negotiates (FUSE_MAX_MAX_PAGES x 4 KiB).
FUSE_MAX_WRITE_BYTES = 1 << 20
#: FUSE requests the kernel keeps in flight for asynchronous (loop device) I/O: above the
#: worker thread count, so the threads, not the kernel, bound the concurrency.
FUSE_MAX_BACKGROUND = 64


def errno_for(exc: BaseException) -> int:
    """The errno a FUSE caller sees for a device error. One place, by type, never by message."""
    if isinstance(exc, NoSpaceError):
        return errno.ENOSPC
    if isinstance(exc, BlockyardTimeoutError):
        return errno.ETIMEDOUT
    if isinstance(exc, FencedError):
        # This path no longer speaks for the volume's current epoch: writes are refused for good.
        return errno.EROFS
    if isinstance(exc, VolumeClosedError | NotFoundError):
        return errno.ENXIO
    if isinstance(exc, InvalidArgumentError):
        return errno.EINVAL
    if isinstance(exc, StorageIOError | CorruptionError):
        return errno.EIO
    if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno > 0:
        return exc.errno
    return errno.EIO


class _SharedExclusiveLock:
    """Many shared holders or one exclusive holder; a waiting exclusive holder blocks new shared.

    Aligned writes hold it shared (they never touch bytes outside their own range); a
    read-modify-write holds it exclusive so no write can land between its read and its write.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cv:
            while self._exclusive or self._waiting_exclusive:
                self._cv.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cv:
                self._shared -= 1
                if not self._shared:
                    self._cv.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cv:
            self._waiting_exclusive += 1
            while self._exclusive or self._shared:
                self._cv.wait()
            self._waiting_exclusive -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cv:
                self._exclusive = False
                self._cv.notify_all()


class SectorFile:
    """Byte-addressed file semantics over a BlockDevice (see the module docstring).

    Methods raise ``OSError`` with the errno from :func:`errno_for`; the device error is chained.
    """

    def __init__(self, device: BlockDevice, *, name: str = "") -> None:
        assert device.logical_block_size == SECTOR_SIZE, "the BlockDevice protocol is 512 B LBAs"
        self.device = device
        self.name = name
        self.size_bytes = device.block_count * SECTOR_SIZE
        self._max_blocks = device.max_transfer_blocks
        self._lock = _SharedExclusiveLock()

    def refresh_size(self) -> int:
        """Take the device's current size (it grew online); the file never shrinks under the
        loop device. Returns the size in bytes."""
        self.size_bytes = max(self.size_bytes, self.device.block_count * SECTOR_SIZE)
        return self.size_bytes

    # ---- error boundary ----------------------------------------------------------------------

    def _fail(self, what: str, offset: int, length: int, exc: BaseException) -> OSError:
        code = errno_for(exc)
        log.error(
            "%s of %d bytes at offset %d on %s failed (%s): %s",
            what,
            length,
            offset,
            self.name or "device",
            errno.errorcode.get(code, code),
            exc,
        )
        err = OSError(code, f"{what} failed: {exc}")
        err.__cause__ = exc
        return err

    @contextmanager
    def _boundary(self, what: str, offset: int, length: int) -> Iterator[None]:
        try:
            yield
        except (BlockyardError, OSError) as exc:
            raise self._fail(what, offset, length, exc) from exc

    # ---- block helpers (LBA units, chunked to the device's transfer cap) ---------------------

    def _read_blocks(self, lba: int, count: int) -> bytearray:
        out = bytearray(count * SECTOR_SIZE)
        view = memoryview(out)
        done = 0
        while done < count:
            step = min(self._max_blocks, count - done)
            self.device.readinto(lba + done, view[done * SECTOR_SIZE : (done + step) * SECTOR_SIZE])
            done += step
        return out

    def _write_blocks(self, lba: int, data: memoryview) -> None:
        count = len(data) // SECTOR_SIZE
        done = 0
        while done < count:
            step = min(self._max_blocks, count - done)
            self.device.write(lba + done, data[done * SECTOR_SIZE : (done + step) * SECTOR_SIZE])
            done += step

    def _ranged(self, op: Callable[[int, int], object], lba: int, count: int) -> None:
        done = 0
        while done < count:
            step = min(self._max_blocks, count - done)
            op(lba + done, step)
            done += step

    # ---- file operations ---------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset``; short only at the end of the device."""
        if offset < 0 or size < 0:
            raise OSError(errno.EINVAL, "negative offset or size")
        end = min(offset + size, self.size_bytes)
        if end <= offset:
            return b""
        first = offset // SECTOR_SIZE
        last = (end + SECTOR_SIZE - 1) // SECTOR_SIZE
        with self._boundary("read", offset, end - offset):
            data = self._read_blocks(first, last - first)
        skip = offset - first * SECTOR_SIZE
        if skip == 0 and len(data) == end - offset:
            return bytes(data)
        return bytes(memoryview(data)[skip : skip + end - offset])

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at ``offset``; returns the byte count written (short at the end).

        A write starting at or past the end fails with ENOSPC, as on a block device.
        """
        if offset < 0:
            raise OSError(errno.EINVAL, "negative offset")
        if not data:
            return 0
        if offset >= self.size_bytes:
            raise OSError(errno.ENOSPC, f"write at offset {offset} is past the end of the device")
        view = memoryview(data).cast("B")
        length = min(len(view), self.size_bytes - offset)
        view = view[:length]
        end = offset + length
        with self._boundary("write", offset, length):
            if offset % SECTOR_SIZE == 0 and end % SECTOR_SIZE == 0:
                with self._lock.shared():
                    self._write_blocks(offset // SECTOR_SIZE, view)
            else:
                with self._lock.exclusive():
                    self._write_unaligned(offset, view)
        return length

    def _write_unaligned(self, offset: int, view: memoryview) -> None:
        end = offset + len(view)
        first = offset // SECTOR_SIZE
        last = (end + SECTOR_SIZE - 1) // SECTOR_SIZE
        head = offset - first * SECTOR_SIZE
        if last - first <= self._max_blocks:
            buf = bytearray(self._read_edges(first, last))
            buf[head : head + len(view)] = view
            self._write_blocks(first, memoryview(buf))
            return
        # Large unaligned writes: only the two edge sectors need the old bytes.
        head_end = (first + 1) * SECTOR_SIZE
        self._write_unaligned(offset, view[: head_end - offset])
        mid_end = (last - 1) * SECTOR_SIZE
        self._write_blocks(first + 1, view[head_end - offset : mid_end - offset])
        self._write_unaligned(mid_end, view[mid_end - offset :])

    def _read_edges(self, first: int, last: int) -> bytearray:
        """The current bytes of sectors [first, last), reading only the two edges when large."""
        count = last - first
        if count <= 2:
            return self._read_blocks(first, count)
        buf = bytearray(count * SECTOR_SIZE)
        buf[:SECTOR_SIZE] = self._read_blocks(first, 1)
        buf[-SECTOR_SIZE:] = self._read_blocks(last - 1, 1)
        return buf

    def sync(self) -> None:
        """Barrier: every write acknowledged before the call is durable when it returns."""
        with self._boundary("flush", 0, 0):
            self.device.flush()

    def punch_hole(self, offset: int, length: int) -> None:
        """Deallocate ``[offset, offset+length)`` (clamped to the device); reads zeros after."""
        self._zero(offset, length, self.device.unmap, "punch hole")

    def zero_range(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` read as zeros (clamped to the device)."""
        self._zero(offset, length, self.device.write_zeroes, "zero range")

    def _zero(self, offset: int, length: int, op: Callable[[int, int], object], what: str) -> None:
        if offset < 0 or length <= 0:
            raise OSError(errno.EINVAL, f"{what}: bad range offset={offset} length={length}")
        end = min(offset + length, self.size_bytes)
        if end <= offset:
            return
        first_full = (offset + SECTOR_SIZE - 1) // SECTOR_SIZE
        last_full = end // SECTOR_SIZE
        with self._boundary(what, offset, end - offset), self._lock.exclusive():
            if first_full >= last_full:
                # Inside one sector (or straddling two without covering either): zero bytes.
                self._write_unaligned(offset, memoryview(bytes(end - offset)))
                return
            if offset < first_full * SECTOR_SIZE:
                self._write_unaligned(offset, memoryview(bytes(first_full * SECTOR_SIZE - offset)))
            self._ranged(op, first_full, last_full - first_full)
            if end > last_full * SECTOR_SIZE:
                tail = last_full * SECTOR_SIZE
                self._write_unaligned(tail, memoryview(bytes(end - tail)))

    def seek(self, offset: int, whence: int) -> int:
        """lseek(2) SEEK_DATA/SEEK_HOLE from the device's provisioning (``lba_status``).

        Lets sparse-aware tools (cp --sparse, qemu-img) skip unmapped ranges of the file. After
        :data:`SEEK_RUNS_MAX` runs the answer is the current position (SEEK_DATA) or the end
        (SEEK_HOLE), which lseek(2) allows: a hole may always be reported as data.
        """
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "only SEEK_DATA and SEEK_HOLE reach the filesystem")
        if offset < 0 or offset >= self.size_bytes:
            raise OSError(errno.ENXIO, "offset is at or past the end of the file")
        want_mapped = whence == os.SEEK_DATA
        lba = offset // SECTOR_SIZE
        with self._boundary("seek", offset, 0):
            for _ in range(SEEK_RUNS_MAX):
                status = self.device.lba_status(lba)
                if status.mapped is want_mapped:
                    return max(offset, status.lba * SECTOR_SIZE)
                lba = status.lba + status.block_count
                if lba >= self.device.block_count:
                    break
            else:
                return offset if want_mapped else self.size_bytes
        if want_mapped:
            raise OSError(errno.ENXIO, "no data after this offset")
        return self.size_bytes

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on the file: PUNCH_HOLE|KEEP_SIZE unmaps, ZERO_RANGE zeroes.

        Plain allocation is refused with EOPNOTSUPP: a thin volume cannot reserve space, and
        posix_fallocate(3) then falls back to writing zeros, which is honest.
        """
        if mode & FALLOC_FL_PUNCH_HOLE:
            if not mode & FALLOC_FL_KEEP_SIZE:
                raise OSError(errno.EINVAL, "PUNCH_HOLE needs KEEP_SIZE (fallocate(2))")
            self.punch_hole(offset, length)
            return
        if mode & FALLOC_FL_ZERO_RANGE:
            if offset + length > self.size_bytes:
                raise OSError(errno.ENOSPC, "the device cannot grow")
            self.zero_range(offset, length)
            return
        raise OSError(errno.EOPNOTSUPP, "space reservation is not supported on a thin volume")


# ---- the mfusepy adapter ---------------------------------------------------------------------


class _Operations:
    """libfuse high-level callbacks (called by mfusepy from libfuse's worker threads)."""

    #: mfusepy: timestamps in integer nanoseconds (floats are deprecated there).
    use_ns = True

    def __init__(self, file: SectorFile, on_init: Callable[[], None]) -> None:
        self._file = file
        self._on_init = on_init
        self._mtime_ns = time.time_ns()
        self._uid = os.getuid()
        self._gid = os.getgid()

    def _check(self, path: str | None) -> None:
        if path is not None and path != "/" + FILE_NAME:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))

    def init_with_config(self, conn: Any, config: Any) -> None:
        """FUSE INIT. The loop device submits direct I/O asynchronously, and the kernel keeps
        at most ``max_background`` such FUSE requests in flight (default 12, throttled from
        75 %): raise it so a deep queue on /dev/loopN reaches every worker thread, and thus
        reaches a remote device (iSCSI) as that many concurrent commands."""
        if conn is not None:
            conn.max_background = FUSE_MAX_BACKGROUND
            conn.congestion_threshold = FUSE_MAX_BACKGROUND * 3 // 4
        self._on_init()

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        base = {
            "st_uid": self._uid,
            "st_gid": self._gid,
            "st_atime": self._mtime_ns,
            "st_mtime": self._mtime_ns,
            "st_ctime": self._mtime_ns,
        }
        if path == "/":
            return base | {"st_mode": stat.S_IFDIR | 0o700, "st_nlink": 2}
        self._check(path)
        size = self._file.size_bytes
        return base | {
            "st_mode": stat.S_IFREG | 0o600,
            "st_nlink": 1,
            "st_size": size,
            "st_blocks": size // 512,
            "st_blksize": PREFERRED_IO_BYTES,
        }

    def readdir(self, path: str, fh: int) -> list[str]:
        if path != "/":
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return [".", "..", FILE_NAME]

    def open(self, path: str, flags: int) -> int:
        self._check(path)
        return 0

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        return self._file.read(offset, size)

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        return self._file.write(offset, data)

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        self._file.sync()
        return 0

    def flush(self, path: str | None, fh: int) -> int:
        self._file.sync()
        return 0

    def release(self, path: str | None, fh: int) -> int:
        return 0

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        if length != self._file.size_bytes:
            raise OSError(errno.EPERM, "the device file has a fixed size")
        return 0

    def fallocate(self, path: str | None, mode: int, offset: int, size: int, fh: int) -> int:
        self._file.fallocate(mode, offset, size)
        return 0

    def lseek(self, path: str | None, offset: int, whence: int, fh: int) -> int:
        return self._file.seek(offset, whence)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        blocks = self._file.size_bytes // PREFERRED_IO_BYTES
        return {
            "f_bsize": PREFERRED_IO_BYTES,
            "f_frsize": PREFERRED_IO_BYTES,
            "f_blocks": blocks,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": 1,
            "f_ffree": 0,
            "f_namemax": 255,
        }


def serve(
    file: SectorFile,
    mountpoint: str,
    *,
    fsname: str,
    on_init: Callable[[], None],
    max_threads: int = 16,
) -> None:
    """Mount ``file`` at ``mountpoint`` and serve until the mount is unmounted (blocks).

    ``on_init`` runs once the kernel has completed FUSE INIT, i.e. when the file can be opened.
    Call from any thread: the caller keeps the main thread (and its signal handlers) for itself.
    Raises :class:`~blockyard.attach.errors.AttachError` if libfuse fails to mount or loop.
    """
    try:
        # Imported here: loading it loads libfuse3, which listing attachments does not need.
        import mfusepy  # type: ignore[import-untyped]  # noqa: PLC0415  # no type stubs
    except (ImportError, OSError) as exc:
        raise AttachError(
            f"cannot load the FUSE binding ({exc}); install the fuse3 package (libfuse3-3) and "
            "the mfusepy Python package"
        ) from exc

    class _Fuse(mfusepy.FUSE):  # type: ignore[misc]  # mfusepy is untyped
        """mfusepy declares libfuse's lseek callback but wraps no method for it: add one."""

        def lseek(self, path: bytes | None, offset: int, whence: int, fip: Any) -> int:
            result: int = self.operations.lseek(
                None if path is None else path.decode(), offset, whence, 0
            )
            return result

    ops = _Operations(file, on_init)
    try:
        _Fuse(
            ops,
            mountpoint,
            foreground=True,
            fsname=fsname,
            subtype="blockyard",
            # Becomes fuse_config.direct_io: every open gets FOPEN_DIRECT_IO.
            direct_io=True,
            max_threads=max_threads,
            max_idle_threads=max_threads,
        )
    except RuntimeError as exc:
        raise AttachError(
            f"libfuse failed to mount or serve {mountpoint} ({exc}); check that /dev/fuse exists "
            "and the fuse3 package is installed"
        ) from exc
