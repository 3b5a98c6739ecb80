"""The background flusher and checkpoints of a volume (a mixin of
:class:`~blockyard.engine.volume.Volume`).

The flusher checkpoints when the pending records fill a quarter of the WAL, or after a second
of pending data: it applies the newest image of every pending block to the data region
(sorted, contiguous runs coalesced into one ``pwritev``), advances the checkpoint, and hands the
records' WAL space to replication retention (:mod:`.replication_source`), which frees what no
replica still needs. A checkpoint that fails (a full disk) changes nothing: the WAL keeps the
records, reads keep seeing them, and the flusher retries.

Lock order: ``_apply_lock`` (data region, deltas, superblock writes) before ``_lock`` (WAL head,
log, dirty map) before ``_sync_cv``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from blockyard.engine import superblock as sbmod
from blockyard.engine import wal
from blockyard.engine.fileio import IoFile
from blockyard.engine.limits import (
    BLOCK_SIZE,
    CHECKPOINT_RETRY_S,
    FLUSH_IDLE_INTERVAL_S,
    WAL_UNMAP_MAX_BLOCKS,
)
from blockyard.engine.snapshot import DeltaFile
from blockyard.errors import BlockyardError
from blockyard.fileutil import IOV_MAX

if TYPE_CHECKING:
    from blockyard.engine.volume import VolumeStats
    from blockyard.errors import VolumeFailedError

log = logging.getLogger("blockyard.engine.volume")

_BLOCK_SHIFT = 12
#: Indices into a log entry (see ``Volume._log``).
E_LSN: Final = 0
E_CONSUMED: Final = 6
_Entry = tuple[int, wal.Kind, int, int, memoryview | None, int, int, int, int]


class Checkpointer:
    """Flusher thread and checkpoints; uses the volume's state (declared below)."""

    if TYPE_CHECKING:
        _apply_lock: threading.Lock
        _lock: threading.RLock
        _space_cv: threading.Condition
        _sync_cv: threading.Condition
        _sync_running: bool
        _apply_gen: int
        _data_offset: int
        _deltas: list[DeltaFile]
        _dmap: dict[int, tuple[int, memoryview | None]]
        _durable_lsn: int
        _failure: BlockyardError | None
        _file: IoFile
        _head: int
        _high_water: int
        _log: deque[_Entry]
        _n_applied: int
        _name: str
        _offline: VolumeFailedError | None
        _pending_bytes: int
        _sb: sbmod.Superblock
        _stopping: bool
        _used: int
        _wake: threading.Event
        _wake_sent: bool
        stats: VolumeStats

        def _check_usable(self) -> None: ...
        def _tracked_fdatasync(self) -> None: ...
        def _retention_due(self) -> bool: ...
        def _retained_applied(self, upto: int) -> None: ...
        def _release_covered_locked(self) -> bool: ...
        def _release_due_retained_locked(self) -> None: ...

    def _flusher_main(self) -> None:
        last = time.monotonic()
        while True:
            self._wake.wait(FLUSH_IDLE_INTERVAL_S)
            self._wake.clear()
            self._wake_sent = False
            if self._stopping:
                return
            if self._n_applied == len(self._log):
                last = time.monotonic()
                if self._log and self._retention_due():
                    self._run_checkpoint_step(self._release_due_retained)
                continue
            now = time.monotonic()
            if self._pending_bytes < self._high_water and now - last < 1.0:
                if self._used >= self._high_water and self._retention_due():
                    self._run_checkpoint_step(self._release_due_retained)
                continue
            last = now
            if not self._run_checkpoint_step(self._checkpoint):
                return

    def _run_checkpoint_step(self, step: Callable[[], None]) -> bool:
        """Run a flusher step; a failure is logged once per failing spell and retried later.
        Returns False when the volume went offline (the flusher stops)."""
        try:
            step()
        except BlockyardError as exc:
            if self._offline is not None:
                return False
            if self._failure is None:
                # Once per failing spell, not once per retry: a full disk retries every
                # second for as long as it stays full.
                log.exception(
                    "volume %s: checkpoint failed, the WAL keeps every record and reads "
                    "stay correct; retrying every %.0f s",
                    self._name,
                    CHECKPOINT_RETRY_S,
                )
            self._failure = exc
            with self._lock:
                self._space_cv.notify_all()
            self._wake.wait(CHECKPOINT_RETRY_S)
        else:
            if self._failure is not None:
                log.warning("volume %s: checkpoints succeed again", self._name)
            self._failure = None
        return True

    def checkpoint(self) -> None:
        """Apply every pending record to the data region now and enforce the replication
        retention bounds (what the background flusher does on its own)."""
        self._check_usable()
        self._checkpoint()

    def _checkpoint(self) -> None:
        with self._apply_lock:
            self._checkpoint_locked()
            self._release_due_retained_locked()

    def _release_due_retained(self) -> None:
        with self._apply_lock:
            self._release_due_retained_locked()

    def _checkpoint_locked(self) -> None:
        """Apply every pending record to the data region and advance the checkpoint.

        Durable path — COW copies synced → data writes → fdatasync → superblock → fdatasync →
        release WAL space. Space holding durable records is reused only after a checkpoint
        covering them is durable, so recovery never starts from a position whose durable
        records were overwritten.

        Lazy path — when no record of the batch has been made durable by any fdatasync (no
        flush or FUA covered them) and no sync is in flight, the data writes and the new
        superblock go to the page cache only and the space is released at once. Losing those
        records to power loss is within the contract (they were never flushed), and the next
        fdatasync persists data region and superblock together. This keeps sustained unflushed
        writes from waiting on the disk, as plain buffered writes don't.
        """
        with self._lock:
            log_ = self._log
            if self._n_applied == len(log_):
                return
            batch = [log_[i] for i in range(self._n_applied, len(log_))]
            end_pos = self._head
        first, upto = batch[0][E_LSN], batch[-1][E_LSN]
        images: dict[int, memoryview | None] = {}
        for _lsn, kind, block, count, payload, *_rest in batch:
            if kind is wal.Kind.ZERO or payload is None:
                if count > WAL_UNMAP_MAX_BLOCKS:
                    # Range records were applied when logged, after draining everything older.
                    continue
                for b in range(block, block + count):
                    images[b] = None
            elif count == 1:
                images[block] = payload
            else:
                for i in range(count):
                    images[block + i] = payload[i << _BLOCK_SHIFT : (i + 1) << _BLOCK_SHIFT]
        self._apply_images(images)
        sb = self._sb.with_(checkpoint_lsn=upto + 1, checkpoint_pos=end_pos)
        if self._durable_lsn < first:
            self._write_superblock(sb)
            with self._sync_cv:
                # A sync that started before the superblock write could still complete and
                # declare these records durable after their space was reused: only release
                # lazily when none is running and none has covered the batch.
                if not self._sync_running and self._durable_lsn < first:
                    self._release(batch, images, upto, sb)
                    self.stats.lazy_checkpoints += 1
                    return
        self._tracked_fdatasync()
        self._write_superblock(sb)
        self._tracked_fdatasync()
        self._release(batch, images, upto, sb)

    def _release(
        self,
        batch: list[_Entry],
        images: dict[int, memoryview | None],
        upto: int,
        sb: sbmod.Superblock,
    ) -> None:
        """The batch is in the data region: drop it from the dirty map and hand its WAL space
        to retention, which frees what no replication feed still needs."""
        with self._lock:
            self._n_applied += len(batch)
            self._pending_bytes -= sum(e[E_CONSUMED] for e in batch)
            dmap = self._dmap
            for b in images:
                ent = dmap.get(b)
                if ent is not None and ent[0] <= upto:
                    del dmap[b]
            self._sb = sb
            self.stats.checkpoints += 1
            self._retained_applied(upto)
            self._release_covered_locked()
            self._space_cv.notify_all()

    def _apply_images(self, images: dict[int, memoryview | None]) -> None:
        """Write final block images to the data region, preserving old blocks for the newest
        snapshot first. Caller holds ``_apply_lock`` (or is recovering)."""
        self._apply_gen += 1
        try:
            self._apply_images_now(images)
        finally:
            self._apply_gen += 1

    def _apply_images_now(self, images: dict[int, memoryview | None]) -> None:
        blocks = sorted(images)
        if self._deltas:
            self._preserve(blocks)
        data_offset = self._data_offset
        pwrite = self._file.pwrite
        i, n = 0, len(blocks)
        while i < n:
            b = blocks[i]
            data = images[b]
            j = i + 1
            if data is None:
                while j < n and blocks[j] == b + (j - i) and images[blocks[j]] is None:
                    j += 1
                self._file.punch_hole(data_offset + (b << _BLOCK_SHIFT), (j - i) << _BLOCK_SHIFT)
            elif j == n or blocks[j] != b + 1 or images[blocks[j]] is None:
                # Random writes rarely neighbour each other: one plain pwrite, no list.
                pwrite(data, data_offset + (b << _BLOCK_SHIFT))
            else:
                bufs: list[memoryview] = [data]
                while (
                    j < n
                    and blocks[j] == b + (j - i)
                    and len(bufs) < IOV_MAX
                    and (nxt := images[blocks[j]]) is not None
                ):
                    bufs.append(nxt)
                    j += 1
                self._file.pwritev(bufs, data_offset + (b << _BLOCK_SHIFT))
            i = j

    def _preserve(self, blocks: list[int]) -> None:
        """Copy-on-write: save the current data-region image of each block the newest snapshot
        does not hold yet. Durable before the caller overwrites anything."""
        newest = self._deltas[-1]
        limit = newest.header.size_bytes >> _BLOCK_SHIFT
        todo = [b for b in blocks if b < limit and not newest.has(b)]
        for k in range(0, len(todo), 256):
            items = [
                (b, self._file.pread(BLOCK_SIZE, self._data_offset + (b << _BLOCK_SHIFT)))
                for b in todo[k : k + 256]
            ]
            newest.append(items)

    def _zero_blocks(self, first: int, end: int) -> None:
        """Deallocate data-region blocks [first, end), preserving allocated ones for the newest
        snapshot. Caller holds ``_apply_lock`` and has drained the WAL."""
        self._apply_gen += 1
        try:
            self._zero_blocks_now(first, end)
        finally:
            self._apply_gen += 1

    def _preserve_range(self, first: int, end: int) -> None:
        """Copy-on-write every allocated data-region block in [first, end) the newest snapshot
        does not hold yet. Caller holds ``_apply_lock``."""
        if not self._deltas:
            return
        off = self._data_offset + (first << _BLOCK_SHIFT)
        stop = self._data_offset + (end << _BLOCK_SHIFT)
        while off < stop:
            data = self._file.next_data(off)
            if data < 0 or data >= stop:
                break
            hole = min(self._file.next_hole(data), stop)
            b0 = (data - self._data_offset) >> _BLOCK_SHIFT
            b1 = (hole - self._data_offset + BLOCK_SIZE - 1) >> _BLOCK_SHIFT
            self._preserve(list(range(b0, b1)))
            off = hole

    def _zero_blocks_now(self, first: int, end: int) -> None:
        self._preserve_range(first, end)
        self._file.punch_hole(
            self._data_offset + (first << _BLOCK_SHIFT), (end - first) << _BLOCK_SHIFT
        )

    def _write_superblock(self, sb: sbmod.Superblock) -> None:
        self._file.pwritev([sb.encode()], 0)
