"""The read path of a volume (a mixin of :class:`~blockyard.engine.volume.Volume`).

Reads take no lock: clean ranges are one ``pread`` of the data region, dirty blocks come from
the dirty map (the newest WAL image). A sequence counter bumped around every data-region change
makes a read retry when a checkpoint ran underneath it (a seqlock), so a read never sees a
half-applied block; after a few retries it takes the apply lock.

:meth:`ReadPath.try_read` is the same read for a caller that must not wait (the volume
server's event loop): clean ranges only from the page cache (``RWF_NOWAIT``), and never the
apply lock; when either would be needed it answers None and the caller reads off the loop.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from blockyard.blockdev import LbaStatus
from blockyard.engine.fileio import IoFile, read_buffer
from blockyard.engine.limits import (
    BLOCK_SIZE,
    LOGICAL_BLOCK_SIZE,
    MAX_TRANSFER_BLOCKS,
    SECTORS_PER_BLOCK,
)
from blockyard.errors import MisalignedError

_BLOCK_SHIFT: Final = 12
_LBA_SHIFT: Final = 9
_ZERO_BLOCK: Final = bytes(BLOCK_SIZE)
_MAX_TRANSFER_BLOCKS: Final = MAX_TRANSFER_BLOCKS
#: Lock-free reads retry this often when a checkpoint runs underneath, then take the lock.
_READ_RETRIES: Final = 3


class _WouldWait(Exception):
    """A clean range of a :meth:`ReadPath.try_read` is not in the page cache."""


class ReadPath:
    """Reads and provisioning status; uses the volume's state (declared below)."""

    if TYPE_CHECKING:
        _apply_gen: int
        _apply_lock: threading.Lock
        _block_limit: int
        _closed: bool
        _data_offset: int
        _dmap: dict[int, tuple[int, memoryview | None]]
        _file: IoFile
        _lba_count: int

        def _check_range(self, lba: int, block_count: int, *, cap: bool = True) -> None: ...
        def _check_usable(self) -> None: ...

    def read(self, lba: int, block_count: int) -> bytes:
        """Newest data for ``block_count`` logical blocks at ``lba``. Lock-free on clean data.

        A read never sees a block half-applied by the background flusher: it re-reads when a
        checkpoint ran underneath it (a sequence counter, like a seqlock).
        """
        if self._closed:
            self._check_usable()
        self._check_range(lba, block_count)
        start = lba << _LBA_SHIFT
        length = block_count << _LBA_SHIFT
        for _ in range(_READ_RETRIES):
            gen = self._apply_gen
            if not self._dmap:
                data = self._file.pread(length, self._data_offset + start)
            else:
                data = b"".join(self._read_parts(start, length))
            if gen == self._apply_gen and not gen & 1:
                return data
        with self._apply_lock:
            return b"".join(self._read_parts(start, length))

    def try_read(self, lba: int, block_count: int) -> bytes | bytearray | None:
        """What :meth:`read` returns, if it can be had without waiting; else None.

        None when a clean part of the range is not in the page cache (or the filesystem
        cannot read without waiting: tmpfs, FUSE), when a checkpoint is applying blocks
        underneath (a read would retry, then take the apply lock), or when the volume is not
        open; the caller then calls :meth:`read` where it may block, and gets its errors.
        Range errors are raised as :meth:`read` raises them. Thread-safe, takes no lock.
        """
        if self._closed:
            return None
        if (
            lba < 0
            or block_count < 0
            or lba + block_count > self._lba_count
            or block_count > _MAX_TRANSFER_BLOCKS
        ):
            self._check_range(lba, block_count)  # raises, as read() would
        start = lba << _LBA_SHIFT
        length = block_count << _LBA_SHIFT
        # One attempt: if a checkpoint runs underneath, read() retries (and may wait); so does
        # the caller, off its loop.
        gen = self._apply_gen
        if gen & 1:
            return None
        if not self._dmap:
            buf = read_buffer(length)  # dropped unseen unless the read fills it
            if self._file.preadv_nowait([buf], self._data_offset + start) != length:
                return None
            data: bytes | bytearray = buf
        else:
            try:
                data = b"".join(self._read_parts(start, length, cached_only=True))
            except _WouldWait:
                return None
        return data if gen == self._apply_gen else None

    def _pread_cached(self, length: int, offset: int) -> bytearray:
        buf = read_buffer(length)
        if self._file.preadv_nowait([buf], offset) != length:
            raise _WouldWait
        return buf

    def readinto(self, lba: int, buf: memoryview) -> None:
        """Like :meth:`read` into a caller-owned buffer (no allocation on clean data)."""
        if len(buf) % LOGICAL_BLOCK_SIZE:
            raise MisalignedError(
                f"buffer of {len(buf)} bytes is not a whole number of {LOGICAL_BLOCK_SIZE}-byte "
                "blocks"
            )
        if self._closed:
            self._check_usable()
        self._check_range(lba, len(buf) >> _LBA_SHIFT)
        start = lba << _LBA_SHIFT
        for _ in range(_READ_RETRIES):
            gen = self._apply_gen
            self._readinto(start, buf)
            if gen == self._apply_gen and not gen & 1:
                return
        with self._apply_lock:
            self._readinto(start, buf)

    def _readinto(self, start: int, buf: memoryview) -> None:
        if not self._dmap:
            got = self._file.preadv([buf], self._data_offset + start)
            if got < len(buf):
                buf[got:] = bytes(len(buf) - got)
            return
        pos = 0
        for part in self._read_parts(start, len(buf)):
            buf[pos : pos + len(part)] = part
            pos += len(part)

    def _read_parts(
        self, start: int, length: int, *, cached_only: bool = False
    ) -> Iterator[bytes | bytearray | memoryview]:
        """Yield the newest bytes of [start, start+length): WAL overlay over the data region.
        With ``cached_only`` the data region is read from the page cache only (raising
        :class:`_WouldWait` when it does not hold a part)."""
        pread = self._pread_cached if cached_only else self._file.pread
        end = start + length
        dmap = self._dmap
        run_start = start
        b = start >> _BLOCK_SHIFT
        last = (end - 1) >> _BLOCK_SHIFT
        while b <= last:
            ent = dmap.get(b)
            if ent is not None:
                bstart = b << _BLOCK_SHIFT
                s = max(start, bstart)
                e = min(end, bstart + BLOCK_SIZE)
                if s > run_start:
                    yield pread(s - run_start, self._data_offset + run_start)
                data = ent[1]
                if data is None:
                    yield _ZERO_BLOCK[: e - s]
                else:
                    yield data[s - bstart : e - bstart]
                run_start = e
            b += 1
        if end > run_start:
            yield pread(end - run_start, self._data_offset + run_start)

    def _read_block(self, block: int) -> bytes:
        ent = self._dmap.get(block)
        if ent is not None:
            return _ZERO_BLOCK if ent[1] is None else bytes(ent[1])
        return self._file.pread(BLOCK_SIZE, self._data_offset + (block << _BLOCK_SHIFT))

    def lba_status(self, lba: int) -> LbaStatus:
        """Whether the run of blocks starting at ``lba`` is mapped (SBC-4 GET LBA STATUS)."""
        self._check_usable()
        self._check_range(lba, 1)
        block = lba >> 3
        total_blocks = self._block_limit
        ent = self._dmap.get(block)
        if ent is not None:
            mapped = ent[1] is not None
            end = block + 1
            while end < total_blocks and end - block < 4096:
                e = self._dmap.get(end)
                if e is None or (e[1] is not None) != mapped:
                    break
                end += 1
        else:
            off = self._data_offset + (block << _BLOCK_SHIFT)
            limit = self._data_offset + (total_blocks << _BLOCK_SHIFT)
            data = self._file.next_data(off)
            mapped = 0 <= data <= off
            if mapped:
                stop = min(self._file.next_hole(off), limit)
            else:
                stop = limit if data < 0 else min(data, limit)
            end = max(block + 1, (stop - self._data_offset) >> _BLOCK_SHIFT)
            for b in range(block + 1, min(end, block + 4096)):
                if b in self._dmap:
                    end = b
                    break
        end_lba = min(end * SECTORS_PER_BLOCK, self._lba_count)
        return LbaStatus(lba=lba, block_count=end_lba - lba, mapped=mapped)
