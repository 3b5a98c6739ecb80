"""The write path of a volume (a mixin of :class:`~blockyard.engine.volume.Volume`).

``write()`` appends a record with one ``pwritev`` (page cache) and points the in-memory dirty map
(block → newest image) at the payload, so later reads see it at once; the payload stays in
memory until checkpointed, bounded by the WAL size. A full WAL applies back-pressure: writers
wait on a condition (bounded, ``WalFullTimeoutError``) while the flusher frees space. Every
write returns the LSN of the record that holds it, so a caller can tie an acknowledgement to it.

Writers are serialised on ``_lock`` (the WAL is a single append point).

:meth:`WritePath.try_write` is the same write for a caller that must not wait (the volume
server's event loop): it logs only whole aligned blocks, only if the lock is free, the WAL has
room for the records right now and the volume's recent appends were quick; otherwise it answers
None and the caller writes off the loop. Both share one append path.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Final

from blockyard.blockdev import BytesLike
from blockyard.engine import superblock as sbmod
from blockyard.engine import wal
from blockyard.engine.fileio import IoFile
from blockyard.engine.limits import (
    BLOCK_SIZE,
    LOGICAL_BLOCK_SIZE,
    MAX_TRANSFER_BLOCKS,
    SECTOR_SIZE,
    WAL_UNMAP_MAX_BLOCKS,
    WRITE_SAME_CHUNK_BYTES,
)
from blockyard.errors import BlockyardError, MisalignedError, WalFullTimeoutError

if TYPE_CHECKING:
    from blockyard.engine.replication_source import Feed
    from blockyard.engine.volume import VolumeStats
    from blockyard.errors import VolumeFailedError

_now_ns = time.monotonic_ns
_PAD: Final = bytes(SECTOR_SIZE)
#: Sector padding views by length, so the hot write path slices nothing.
_PADS: Final = [memoryview(_PAD)[:n] for n in range(SECTOR_SIZE)]
_BLOCK_SHIFT: Final = 12
_LBA_SHIFT: Final = 9
_MAX_IO_BYTES: Final = MAX_TRANSFER_BLOCKS * LOGICAL_BLOCK_SIZE
_WRITE: Final = wal.Kind.WRITE
#: A WAL append (one pwritev into the page cache) slower than this is slow: the device, the
#: kernel's dirty-page throttling or another write to the file holding its inode lock pushes
#: back. A page-cache write of the largest record (1 MiB) takes well under a millisecond.
SLOW_APPEND_NS: Final = 5_000_000
#: This many slow appends in a row mark the volume's appends slow. One alone is no sign: a
#: thread preempted on a busy machine or paused by the garbage collector makes one now and then
#: (measured here under load: about 1 in 10,000 page-cache writes of 4 KiB over 5 ms), a
#: stalling disk makes every one.
SLOW_APPENDS_IN_A_ROW: Final = 2
#: Once marked, :meth:`WritePath.try_write` declines for this long (every later slow append,
#: made off the loop, extends it), so a disk that stalls costs the event loop a couple of
#: stalled appends per period instead of one per write.
SLOW_APPEND_HOLD_NS: Final = 100_000_000
#: A range record's block count is a u32 on disk.
_RANGE_RECORD_MAX_BLOCKS: Final = 1 << 30
_Entry = tuple[int, wal.Kind, int, int, memoryview | None, int, int, int, int]


class WritePath:
    """Writes, unmaps and the WAL append; uses the volume's state (declared below)."""

    #: Until when (monotonic ns) try_write declines because appends were slow; 0: it does not.
    _slow_until_ns: int = 0
    #: Slow appends in a row, up to the last one.
    _slow_appends: int = 0

    if TYPE_CHECKING:
        _lock: threading.RLock
        _apply_lock: threading.Lock
        _space_cv: threading.Condition
        _background: bool
        _backpressure_timeout_s: float
        _closed: bool
        _stopping: bool
        _offline: VolumeFailedError | None
        _failure: BlockyardError | None
        _dmap: dict[int, tuple[int, memoryview | None]]
        _durable_lsn: int
        _feeds_waiting: list[Feed]
        _file: IoFile
        _gap: int
        _generation: int
        _hdr: bytearray
        _hdr_view: memoryview
        _head: int
        _high_water: int
        _last_lsn: int
        _next_lsn: int
        _lba_count: int
        _log: deque[_Entry]
        _max_payload: int
        _name: str
        _pending_bytes: int
        _role_refuses_writes: bool
        _sb: sbmod.Superblock
        _seed: int
        _used: int
        _wake: threading.Event
        _wake_sent: bool
        _wal_offset: int
        _wal_size: int
        _write_seq: int
        stats: VolumeStats

        def _check_usable(self) -> None: ...
        def _check_epoch(self, epoch: int | None) -> None: ...
        def _check_range(self, lba: int, block_count: int, *, cap: bool = True) -> None: ...
        def _refuse_write(self) -> None: ...
        def _read_block(self, block: int) -> bytes: ...
        def _sync_until(self, target: int, timeout_s: float | None = None) -> None: ...
        def _checkpoint_locked(self) -> None: ...
        def _release_due_retained_locked(self) -> None: ...
        def _preserve_range(self, first: int, end: int) -> None: ...
        def _zero_blocks(self, first: int, end: int) -> None: ...
        def _take_offline(self, exc: BlockyardError, what: str) -> None: ...
        def _wake_feeds(self) -> None: ...

    def write(
        self, lba: int, data: BytesLike, *, fua: bool = False, epoch: int | None = None
    ) -> int:
        """Log ``data`` at ``lba``. Visible to reads on return; durable on return if ``fua``.

        Returns the LSN of the (last) record that holds the write, so a caller can tie an
        acknowledgement to it (replication waits for replicas up to that LSN); 0 for an empty
        write. ``epoch``, when given, must equal the volume's epoch (fencing for replication).
        Partial 4 KiB blocks are read-modify-written under the writer lock, so concurrent
        sub-block writes never lose each other's sectors.
        """
        length = len(data)
        if length % LOGICAL_BLOCK_SIZE:
            raise MisalignedError(
                f"volume {self._name!r}: {length} bytes is not a whole number of "
                f"{LOGICAL_BLOCK_SIZE}-byte blocks; pad the write"
            )
        if lba < 0 or lba + (length >> _LBA_SHIFT) > self._lba_count or length > _MAX_IO_BYTES:
            self._check_range(lba, length >> _LBA_SHIFT)
        if length == 0:
            return 0
        start = lba << _LBA_SHIFT
        with self._lock:
            if self._closed or self._stopping:
                self._check_usable()
            if self._role_refuses_writes:
                self._refuse_write()
            if epoch is not None:
                self._check_epoch(epoch)
            if not (start | length) & (BLOCK_SIZE - 1):
                self._log_whole_blocks(start >> _BLOCK_SHIFT, data)
            else:
                end = start + length
                first = start >> _BLOCK_SHIFT
                last = (end - 1) >> _BLOCK_SHIFT
                buf = bytearray((last - first + 1) << _BLOCK_SHIFT)
                if start & (BLOCK_SIZE - 1):
                    buf[:BLOCK_SIZE] = self._read_block(first)
                if end & (BLOCK_SIZE - 1) and (last != first or not start & (BLOCK_SIZE - 1)):
                    buf[-BLOCK_SIZE:] = self._read_block(last)
                off = start - (first << _BLOCK_SHIFT)
                buf[off : off + length] = data
                self._append_blocks(first, memoryview(buf).toreadonly())
            seq = self._write_seq
            lsn = self._last_lsn
        if fua:
            self._sync_until(seq)
        return lsn

    def try_write(self, lba: int, data: BytesLike) -> int | None:
        """What :meth:`write` does (without FUA), if it can be done without waiting; else None.

        Logs only whole aligned 4 KiB blocks (a partial block would read the data region), and
        only when the writer lock is free, the WAL has room for every record of it right now
        (no back-pressure wait), no append of the volume was slow lately (SLOW_APPEND_NS,
        SLOW_APPEND_HOLD_NS) and the volume takes writes (open, not stopping or offline, not a
        replica). Returns the LSN as :meth:`write` does; None means nothing was logged: call
        :meth:`write` where it may block (it raises the errors, if any). Thread-safe.
        """
        length = len(data)
        start = lba << _LBA_SHIFT
        if (
            (start | length) & (BLOCK_SIZE - 1)
            or not length
            or lba < 0
            or lba + (length >> _LBA_SHIFT) > self._lba_count
            or length > _MAX_IO_BYTES
        ):
            return None
        if self._slow_until_ns:
            if _now_ns() < self._slow_until_ns:
                return None
            self._slow_until_ns = 0
        lock = self._lock
        if not lock.acquire(False):  # blocking=False, positional: this runs per write
            return None
        try:
            if (
                self._closed
                or self._stopping
                or self._role_refuses_writes
                or not self._wal_room_now(length)
            ):
                return None
            self._log_whole_blocks(start >> _BLOCK_SHIFT, data)
            return self._last_lsn
        finally:
            lock.release()

    def _wal_room_now(self, length: int) -> bool:
        """Whether the records logging ``length`` bytes of whole blocks fit in the WAL now, so
        appending them cannot wait for space. Caller holds ``_lock``. A write of several
        records is counted with the whole tail as a wrap gap, which bounds any wrap among them
        (only one fits in a WAL that has room for all of them)."""
        step = self._max_payload
        tail = self._wal_size - self._head
        if length <= step:
            need = wal.record_bytes(length)
            if tail < need:
                need += tail
        else:
            full, rest = divmod(length, step)
            need = full * wal.record_bytes(step) + tail
            if rest:
                need += wal.record_bytes(rest)
        return self._used + need <= self._wal_size

    def _log_whole_blocks(self, block: int, data: BytesLike) -> None:
        """Log whole blocks starting at ``block``: one owned copy of the caller's buffer, which
        the dirty map and the flusher share until the checkpoint. Caller holds ``_lock``."""
        payload = memoryview(bytes(data))
        if len(payload) <= self._max_payload:
            self._append_at(_WRITE, block, len(payload) >> _BLOCK_SHIFT, payload, None, 0, 0)
        else:
            self._append_blocks(block, payload)

    def _append_blocks(self, block: int, payload: memoryview) -> None:
        step = self._max_payload
        if len(payload) <= step:
            self._append(wal.Kind.WRITE, block, len(payload) >> _BLOCK_SHIFT, payload)
            return
        for off in range(0, len(payload), step):
            chunk = payload[off : off + step]
            self._append(
                wal.Kind.WRITE, block + (off >> _BLOCK_SHIFT), len(chunk) >> _BLOCK_SHIFT, chunk
            )

    def _append(
        self, kind: wal.Kind, block: int, block_count: int, payload: memoryview | None
    ) -> None:
        """Append one record of this volume's own at the WAL head. Caller holds ``_lock``."""
        self._append_at(kind, block, block_count, payload, None, 0, 0)

    def _append_at(
        self,
        kind: wal.Kind,
        block: int,
        block_count: int,
        payload: memoryview | None,
        lsn: int | None,
        epoch: int,
        generation: int,
    ) -> None:
        """Append one record with the given identity (a replica keeps the primary's LSN, epoch
        and generation), or with ``lsn`` None the volume's own next one. Caller holds
        ``_lock`` and has checked an explicit ``lsn`` follows the log."""
        payload_len = 0 if payload is None else len(payload)
        length = wal.record_bytes(payload_len)
        wal_size = self._wal_size
        tail_room = wal_size - self._head
        need = length if tail_room >= length else length + tail_room
        if self._used + need > wal_size:
            # Releases _lock while waiting: other writers may append meanwhile.
            self._wait_space(need)
            tail_room = wal_size - self._head
        if lsn is None:
            lsn, epoch, generation = self._next_lsn, self._sb.epoch, self._generation
        hdr = self._hdr
        if tail_room < length:
            wal.pack_header(
                hdr,
                self._seed,
                wal.Kind.WRAP,
                lsn,
                epoch,
                self._durable_lsn,
                0,
                0,
                None,
                self._hdr_view,
                generation,
            )
            self._file.pwritev([hdr], self._wal_offset + self._head)
            self._used += tail_room
            self._gap += tail_room
            self._head = 0
        wal.pack_header(
            hdr,
            self._seed,
            kind,
            lsn,
            epoch,
            self._durable_lsn,
            block,
            block_count,
            payload,
            self._hdr_view,
            generation,
        )
        pad = length - wal.HEADER_BYTES - payload_len
        pos = self._head
        off = self._wal_offset + pos
        started = _now_ns()
        if payload is None:
            self._file.pwritev([hdr], off)
        elif pad:
            self._file.pwritev([hdr, payload, _PADS[pad]], off)
        else:
            self._file.pwritev([hdr, payload], off)
        done = _now_ns()
        if done - started > SLOW_APPEND_NS:
            self._slow_appends += 1
            if self._slow_appends >= SLOW_APPENDS_IN_A_ROW:
                self._slow_until_ns = done + SLOW_APPEND_HOLD_NS
        elif self._slow_appends:
            self._slow_appends = 0
        consumed = length + self._gap
        self._gap = 0
        self._log.append((lsn, kind, block, block_count, payload, epoch, consumed, generation, pos))
        self._pending_bytes += consumed
        dmap = self._dmap
        if payload is None:
            if block_count <= WAL_UNMAP_MAX_BLOCKS:
                for b in range(block, block + block_count):
                    dmap[b] = (lsn, None)
        elif block_count == 1:
            dmap[block] = (lsn, payload)
        else:
            for i in range(block_count):
                dmap[block + i] = (lsn, payload[i << _BLOCK_SHIFT : (i + 1) << _BLOCK_SHIFT])
        self._head += length
        if self._head == wal_size:
            self._head = 0
        self._used += length
        self._last_lsn = lsn
        self._next_lsn = lsn + 1
        self._write_seq += 1
        self.stats.wal_records += 1
        if self._feeds_waiting:
            self._wake_feeds()
        if self._pending_bytes >= self._high_water and not self._wake_sent:
            # Event.set() takes a lock; set it once per checkpoint round, not per write.
            self._wake_sent = True
            self._wake.set()

    def _wait_space(self, need: int) -> None:
        """Back-pressure: wait (bounded) for the flusher to free WAL space."""
        self.stats.backpressure_waits += 1
        if not self._background:
            # Single-threaded mode: free space right here. _lock is re-entrant, so the
            # checkpoint's inner acquisition is ours; no other thread can hold _apply_lock.
            with self._apply_lock:
                self._checkpoint_locked()
                # Records kept for replicas past the retention bound go to their bitmaps, as
                # the background flusher would do: never write over what a replica still needs.
                self._release_due_retained_locked()
            if self._used + need > self._wal_size:
                raise WalFullTimeoutError(
                    f"volume {self._name!r}: the WAL stays full after a checkpoint; a record "
                    "of this size cannot fit"
                )
            return
        deadline = time.monotonic() + self._backpressure_timeout_s
        while self._used + need > self._wal_size:
            if self._offline is not None:
                self._check_usable()
            if self._failure is not None:
                raise type(self._failure)(
                    f"volume {self._name!r}: WAL full and the flusher is failing: {self._failure}"
                ) from self._failure
            self._check_usable()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WalFullTimeoutError(
                    f"volume {self._name!r}: no WAL space freed within "
                    f"{self._backpressure_timeout_s} s; the disk is too slow for the write load "
                    "or stalled — check the data directory's device"
                )
            self._wake.set()
            self._space_cv.wait(min(remaining, 0.5))

    def unmap(self, lba: int, block_count: int) -> int:
        """Deallocate blocks; they read as zeros at once and are durable after the next flush.

        Sub-4 KiB edges are zero-written; small whole-block ranges are logged; large ranges
        drain the WAL and punch holes in the data region directly (O(extents), not O(blocks)).
        Returns the LSN of the last record that holds it (0 when nothing was logged).
        """
        self._check_range(lba, block_count, cap=False)
        if block_count == 0:
            return 0
        self._check_usable()
        with self._lock:
            if self._role_refuses_writes:
                self._refuse_write()
        start = lba << _LBA_SHIFT
        end = (lba + block_count) << _LBA_SHIFT
        first_full = (start + BLOCK_SIZE - 1) >> _BLOCK_SHIFT
        end_full = end >> _BLOCK_SHIFT
        if first_full >= end_full:
            return self._write_zero_bytes(start, end)
        if start < first_full << _BLOCK_SHIFT:
            self._write_zero_bytes(start, first_full << _BLOCK_SHIFT)
        if end > end_full << _BLOCK_SHIFT:
            self._write_zero_bytes(end_full << _BLOCK_SHIFT, end)
        if end_full - first_full <= WAL_UNMAP_MAX_BLOCKS:
            with self._lock:
                self._check_usable()
                self._append(wal.Kind.ZERO, first_full, end_full - first_full, None)
                return self._last_lsn
        return self._zero_range_direct(first_full, end_full)

    def _write_zero_bytes(self, start: int, end: int) -> int:
        return self.write(start >> _LBA_SHIFT, bytes(end - start))

    def write_zeroes(self, lba: int, block_count: int) -> int:
        """Zero a range. Blocks are deallocated: they read as zeros (LBPRZ) and use no space.
        Returns the LSN of the last record that holds it."""
        return self.unmap(lba, block_count)

    def write_same(self, lba: int, block_count: int, pattern: BytesLike) -> int:
        """Write one logical block's ``pattern`` to every block of the range. Returns the LSN
        of the last record that holds it."""
        if len(pattern) != LOGICAL_BLOCK_SIZE:
            raise MisalignedError(
                f"write-same pattern must be exactly {LOGICAL_BLOCK_SIZE} bytes, got {len(pattern)}"
            )
        self._check_range(lba, block_count, cap=False)
        if not any(pattern):
            return self.write_zeroes(lba, block_count)
        per_chunk = WRITE_SAME_CHUNK_BYTES >> _LBA_SHIFT
        chunk = bytes(pattern) * min(per_chunk, block_count)
        done = lsn = 0
        while done < block_count:
            n = min(per_chunk, block_count - done)
            lsn = self.write(lba + done, chunk[: n << _LBA_SHIFT])
            done += n
        return lsn

    def _zero_range_direct(self, first: int, end: int) -> int:
        """Unmap a large range: drain the WAL, log one range record, punch the data region.

        The range record goes into the WAL (so replication ships the discard and replay
        re-applies it in LSN order) but into neither the dirty map nor any checkpoint batch: it
        is applied here, directly. Writers are held off from the drain until the record is
        appended, so no write can land between them out of LSN order. Lock order here is
        _apply_lock → _lock → _sync_cv (the drain's fdatasync); the only other path taking
        _sync_cv and then _lock is the lazy checkpoint, which also needs _apply_lock.
        """
        with self._apply_lock:
            with self._lock:
                self._check_usable()
                self._checkpoint_locked()
                # Copy-on-write for the newest snapshot first: it needs space and may fail,
                # and nothing may be logged until only the (space-free) punch is left.
                self._preserve_range(first, end)
                block = first
                while block < end:
                    count = min(end - block, _RANGE_RECORD_MAX_BLOCKS)
                    self._append(wal.Kind.ZERO, block, count, None)
                    block += count
            try:
                self._zero_blocks(first, end)
            except BlockyardError as exc:
                # The record is logged but the data region still holds the old blocks: reads
                # would disagree with what recovery replays. Only a reopen reconciles them.
                self._take_offline(exc, "punching an unmapped range")
                raise
            with self._lock:
                self._write_seq += 1
                return self._last_lsn
