"""The file layer under the engine: real files, or a fault-injecting model of them in tests.

The engine does every byte of file I/O through :class:`IoFile` and every directory change through
:class:`VolumeFS`, so that :mod:`blockyard.testing.faultfs` can model power loss (unsynced writes
lost, reordered or torn at sector granularity) under the unchanged engine.

OS errors are translated by :func:`blockyard.fileutil.translate_os_error`, in one place.

Short writes: every write goes through :func:`blockyard.fileutil.write_fully`, so no caller can
mistake a partial write for a complete one (see that module).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import shutil
from collections.abc import Sequence
from typing import Protocol

from blockyard.blockdev import BytesLike
from blockyard.errors import VolumeBusyError
from blockyard.fileutil import (
    fsync_dir,
    remaining_views,
    translate_os_error,
    write_fully,
)

log = logging.getLogger(__name__)

#: preadv2(2) flag (Linux 4.14+): fail with EAGAIN rather than wait for the device.
_RWF_NOWAIT = os.RWF_NOWAIT
# linux/falloc.h
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

#: From this size on, :func:`read_buffer` skips zero-filling (a memset of 128 KiB costs more
#: than the ctypes call that avoids it; below, ``bytearray(n)`` is cheaper).
UNINITIALIZED_BUFFER_MIN_BYTES = 64 << 10
_bytearray_uninitialized = ctypes.pythonapi.PyByteArray_FromStringAndSize
_bytearray_uninitialized.restype = ctypes.py_object
_bytearray_uninitialized.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]


def read_buffer(length: int) -> bytearray:
    """A bytearray of ``length`` bytes to read into. Large ones are not zero-filled: the
    caller must overwrite every byte (a whole read) or drop the buffer unseen (a short one)."""
    if length < UNINITIALIZED_BUFFER_MIN_BYTES:
        return bytearray(length)
    buf: bytearray = _bytearray_uninitialized(None, length)
    return buf


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate64
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


class IoFile(Protocol):
    """Positional I/O on one open file. Not thread-safe for overlapping ranges; the engine
    orders its own writes.

    ``pwrite``/``pwritev`` write every byte or raise (implementations use :func:`write_fully`);
    after an error the range's content is undefined until written again."""

    path: str

    def pread(self, length: int, offset: int) -> bytes: ...

    def preadv(self, buffers: Sequence[memoryview | bytearray], offset: int) -> int: ...

    def preadv_nowait(self, buffers: Sequence[memoryview | bytearray], offset: int) -> int | None:
        """Like :meth:`preadv`, but only from what is cached: never waits for the device.
        Returns the bytes read (short when only the start of the range is cached), or None
        when reading would wait, or when the filesystem cannot promise that (then always)."""
        ...

    def pwritev(self, buffers: Sequence[BytesLike], offset: int) -> int: ...

    def pwrite(self, data: BytesLike, offset: int) -> int: ...

    def fdatasync(self) -> None: ...

    def punch_hole(self, offset: int, length: int) -> None: ...

    def write_zeros(self, offset: int, length: int) -> None:
        """Store real zero blocks (allocated, written extents) over the range."""
        ...

    def truncate(self, size: int) -> None: ...

    def size(self) -> int: ...

    def allocated_bytes(self) -> int: ...

    def next_data(self, offset: int) -> int:
        """The first offset ≥ ``offset`` that holds data, or -1 when only holes follow."""
        ...

    def next_hole(self, offset: int) -> int:
        """The first offset ≥ ``offset`` inside a hole (end of file counts as a hole)."""
        ...

    def lock_exclusive(self) -> None: ...

    def drop_cache(self) -> None:
        """Evict the file's clean cached pages (after a failed sync they may hold bytes the
        disk never got). Best effort."""
        ...

    def close(self) -> None: ...


class VolumeFS(Protocol):
    """Directory operations. Each mutating call is durable when it returns."""

    def open(self, path: str, *, create: bool = False) -> IoFile: ...

    def exists(self, path: str) -> bool: ...

    def listdir(self, path: str) -> list[str]: ...

    def mkdir(self, path: str) -> None: ...

    def rename(self, src: str, dst: str) -> None: ...

    def remove(self, path: str) -> None: ...

    def rmtree(self, path: str) -> None: ...

    def free_bytes(self, path: str) -> int: ...


class OsFile:
    """An :class:`IoFile` over a real file descriptor.

    :meth:`preadv_nowait` is ``preadv2(RWF_NOWAIT)`` (Linux 4.14+): served from the page cache
    or refused with EAGAIN. ext4, xfs and btrfs support it for buffered reads; tmpfs and FUSE
    refuse the flag (EOPNOTSUPP), and then every such read answers None (the caller reads off
    its event loop instead).
    """

    __slots__ = ("_fd", "_nowait", "path")

    def __init__(self, path: str, *, create: bool = False) -> None:
        flags = os.O_RDWR | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        try:
            self._fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise translate_os_error(exc, f"open {path}") from exc
        self.path = path
        #: Whether RWF_NOWAIT reads are supported here (learnt at the first refusal).
        self._nowait = True

    @property
    def fd(self) -> int:
        return self._fd

    def pread(self, length: int, offset: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise translate_os_error(exc, f"read {self.path}@{offset}") from exc
        if len(data) < length:
            # Reads past EOF of a sparse tail are zeros by definition of our layout.
            data += bytes(length - len(data))
        return data

    def preadv(self, buffers: Sequence[memoryview | bytearray], offset: int) -> int:
        try:
            return os.preadv(self._fd, buffers, offset)
        except OSError as exc:
            raise translate_os_error(exc, f"read {self.path}@{offset}") from exc

    def preadv_nowait(self, buffers: Sequence[memoryview | bytearray], offset: int) -> int | None:
        if not self._nowait:
            return None
        try:
            return os.preadv(self._fd, buffers, offset, _RWF_NOWAIT)
        except BlockingIOError:
            return None  # EAGAIN: part of the range is not in the page cache
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                log.info(
                    "%s: this filesystem cannot read without waiting (RWF_NOWAIT: %s); its "
                    "reads run off the event loop",
                    self.path,
                    exc.strerror,
                )
                self._nowait = False
                return None
            raise translate_os_error(exc, f"read {self.path}@{offset}") from exc

    def _raw_pwritev(self, buffers: Sequence[BytesLike], offset: int) -> int:
        try:
            return os.pwritev(self._fd, buffers, offset)
        except OSError as exc:
            raise translate_os_error(exc, f"write {self.path}@{offset}") from exc

    def pwritev(self, buffers: Sequence[BytesLike], offset: int) -> int:
        return write_fully(self._raw_pwritev, buffers, offset, what=f"write {self.path}@{offset}")

    def pwrite(self, data: BytesLike, offset: int) -> int:
        try:
            n = os.pwrite(self._fd, data, offset)
        except OSError as exc:
            raise translate_os_error(exc, f"write {self.path}@{offset}") from exc
        if n == len(data):
            return n
        return n + write_fully(
            self._raw_pwritev,
            remaining_views([data], n),
            offset + n,
            what=f"write {self.path}@{offset}",
        )

    def fdatasync(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise translate_os_error(exc, f"fdatasync {self.path}") from exc

    def punch_hole(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        rc = _fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        if rc != 0:
            err = ctypes.get_errno()
            exc = OSError(err, os.strerror(err))
            if err == errno.EOPNOTSUPP:
                # Filesystems without hole punching: write zeros instead (same read result).
                self.write_zeros(offset, length)
                return
            raise translate_os_error(exc, f"punch {self.path}@{offset}+{length}") from exc

    def write_zeros(self, offset: int, length: int) -> None:
        chunk = bytes(min(length, 1 << 20))
        while length > 0:
            n = min(length, len(chunk))
            self.pwritev([memoryview(chunk)[:n]], offset)
            offset += n
            length -= n

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
        except OSError as exc:
            raise translate_os_error(exc, f"resize {self.path} to {size}") from exc

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def allocated_bytes(self) -> int:
        return os.fstat(self._fd).st_blocks * 512

    def next_data(self, offset: int) -> int:
        try:
            return os.lseek(self._fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return -1
            raise translate_os_error(exc, f"seek {self.path}@{offset}") from exc

    def next_hole(self, offset: int) -> int:
        try:
            return os.lseek(self._fd, offset, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return offset
            raise translate_os_error(exc, f"seek {self.path}@{offset}") from exc

    def lock_exclusive(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise VolumeBusyError(
                f"{self.path} is open in another process (is `blockyard serve` running on this "
                "data directory?); stop it or use its management API"
            ) from exc

    def drop_cache(self) -> None:
        if self._fd < 0:
            return
        try:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            log.warning("could not drop the cached pages of %s: %s", self.path, exc)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class OsFS:
    """The real filesystem. Directory changes are fsynced so they survive power loss."""

    def open(self, path: str, *, create: bool = False) -> IoFile:
        f = OsFile(path, create=create)
        if create:
            fsync_dir(os.path.dirname(path) or ".")
        return f

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def mkdir(self, path: str) -> None:
        try:
            os.makedirs(path, exist_ok=True)
            fsync_dir(os.path.dirname(os.path.abspath(path)))
        except OSError as exc:
            raise translate_os_error(exc, f"mkdir {path}") from exc

    def rename(self, src: str, dst: str) -> None:
        try:
            os.rename(src, dst)
            fsync_dir(os.path.dirname(os.path.abspath(dst)))
        except OSError as exc:
            raise translate_os_error(exc, f"rename {src} -> {dst}") from exc

    def remove(self, path: str) -> None:
        try:
            os.unlink(path)
            fsync_dir(os.path.dirname(os.path.abspath(path)))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise translate_os_error(exc, f"remove {path}") from exc

    def rmtree(self, path: str) -> None:
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise translate_os_error(exc, f"remove {path}") from exc

    def free_bytes(self, path: str) -> int:
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize
