"""The replica's side of replication in the engine (a mixin of
:class:`~blockyard.engine.volume.Volume`).

- :meth:`ReplicaSink.apply_replicated` logs the primary's records with the primary's LSN, epoch
  and generation, so every copy agrees on "everything up to LSN n" and, after a failover, the
  new primary's LSNs continue the old primary's sequence.
- :meth:`ReplicaSink.apply_backfill` writes resync block images straight into the data region
  (they carry no LSN: they are the primary's current content of blocks the replica missed).
  The caller passes only blocks no live record touched since the resync began, so live writes
  always win over older backfill.
- :meth:`ReplicaSink.reset_log` starts a new log at a given LSN (a full rebuild, or records
  that diverged from the primary's history): the WAL checksum salt changes, so no record of the
  old log can ever be replayed or mistaken for a new one.

Durability is the volume's as always: records and backfill are durable after the next
``flush()``; the replication layer acknowledges a barrier only after one.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from blockyard.engine import superblock as sbmod
from blockyard.engine import wal
from blockyard.engine.checkpoint import E_CONSUMED
from blockyard.engine.epoch import Role
from blockyard.engine.history import History
from blockyard.engine.limits import BLOCK_SIZE, WAL_UNMAP_MAX_BLOCKS
from blockyard.errors import (
    BlockyardError,
    FencedError,
    InvalidArgumentError,
    ReplicationGapError,
    StaleEpochError,
    VolumeFailedError,
)

if TYPE_CHECKING:
    from collections import deque

    from blockyard.blockdev import BytesLike
    from blockyard.engine.fileio import IoFile

_BLOCK_SHIFT = 12


class ReplicatedRecord(Protocol):
    """A record as the primary shipped it (blocks are 4 KiB physical blocks)."""

    @property
    def lsn(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def generation(self) -> int: ...
    @property
    def kind(self) -> int: ...
    @property
    def block(self) -> int: ...
    @property
    def block_count(self) -> int: ...
    @property
    def data(self) -> BytesLike: ...


def _is_range(rec: ReplicatedRecord) -> bool:
    return rec.kind == wal.Kind.ZERO and rec.block_count > WAL_UNMAP_MAX_BLOCKS


class ReplicaSink:
    """Applying what a primary ships. Uses the volume's state (declared below)."""

    if TYPE_CHECKING:
        _lock: threading.RLock
        _apply_lock: threading.Lock
        _sb: sbmod.Superblock
        _name: str
        _dir: str
        _last_lsn: int
        _next_lsn: int
        _write_seq: int
        _durable_lsn: int
        _block_limit: int
        _seed: int
        _file: IoFile
        _wal_offset: int
        _wal_size: int
        _history: History
        _log: deque[tuple[int, wal.Kind, int, int, memoryview | None, int, int, int, int]]
        _n_applied: int
        _used: int
        _retained_since: deque[tuple[int, float]]
        _dmap: dict[int, tuple[int, memoryview | None]]
        _head: int
        _slow_until_ns: int
        _closed: bool
        _stopping: bool
        _offline: VolumeFailedError | None

        def _check_usable(self) -> None: ...
        def _append_at(
            self,
            kind: wal.Kind,
            block: int,
            block_count: int,
            payload: memoryview | None,
            lsn: int | None,
            epoch: int,
            generation: int,
        ) -> None: ...
        def _checkpoint_locked(self) -> None: ...
        def _release_due_retained_locked(self) -> None: ...
        def _apply_images(self, images: dict[int, memoryview | None]) -> None: ...
        def _preserve_range(self, first: int, end: int) -> None: ...
        def _zero_blocks(self, first: int, end: int) -> None: ...
        def _take_offline(self, exc: BlockyardError, what: str) -> None: ...
        def _store_superblock(self, sb: sbmod.Superblock) -> None: ...
        def _save_history(self) -> None: ...

    def apply_replicated(self, records: Sequence[ReplicatedRecord]) -> int:
        """Log records shipped by the primary, in LSN order. Visible at once, durable after the
        next flush. Records at or below the last LSN held are duplicates (a resend after a
        reconnect) and skipped; a record must follow the last one, or start a new history
        segment. Returns the last LSN held.

        Refused unless the volume is a replica or rebuilding copy, and for records of a newer
        epoch than the volume's (it must be told the new epoch first).

        A range record (an unmap of more than ``WAL_UNMAP_MAX_BLOCKS`` blocks) is applied as
        the primary applied it: everything logged before it is checkpointed, the record is
        logged, and the data region is punched at once (it never enters the block map, and
        checkpoints skip it; recovery replays it in LSN order)."""
        i = 0
        n = len(records)
        last = self._last_lsn
        while i < n:
            j = i
            while j < n and not _is_range(records[j]):
                j += 1
            if j > i:
                with self._lock:
                    self._check_replica()
                    for rec in records[i:j]:
                        self._log_replicated_locked(rec)
            if j < n:
                self._apply_range_record(records[j])
                j += 1
            i = j
        with self._lock:
            if n == 0:
                self._check_replica()
            last = self._last_lsn
        return last

    def try_apply_replicated(self, records: Sequence[ReplicatedRecord]) -> int | None:
        """What :meth:`apply_replicated` does, if it can be done without waiting; else None
        and nothing is applied. For the receiver's event loop (the replica acknowledges
        receipt once applied, and a primary's writer waits for that): as the primary's
        ``try_write``, only plain WAL appends into room the WAL has now, with the writer lock
        free and no slow append lately — no range record (it punches the data region), no
        record starting a new history segment (its note is fsynced), no duplicate or gap, and
        a replica that takes records; anything else is left to :meth:`apply_replicated`, which
        raises the errors."""
        if not records:
            return None
        if self._slow_until_ns and time.monotonic_ns() < self._slow_until_ns:
            return None
        lock = self._lock
        if not lock.acquire(False):  # blocking=False, positional: this runs per batch
            return None
        try:
            if (
                self._closed
                or self._stopping
                or self._offline is not None
                or self._sb.role not in (Role.REPLICA, Role.REBUILDING)
            ):
                return None
            last_seg = self._history.last
            if last_seg is None:
                return None
            key = last_seg.key()
            expect = self._last_lsn + 1
            # Where each record would go, as _append_at places it (a record that does not fit
            # before the end wraps, using up the tail): all must fit without waiting for space.
            size, head, used = self._wal_size, self._head, self._used
            for rec in records:
                if (
                    rec.lsn != expect
                    or _is_range(rec)
                    or (rec.epoch, rec.generation) != key
                    or rec.epoch > self._sb.epoch
                ):
                    return None
                expect += 1
                length = wal.record_bytes(len(rec.data) if rec.kind == wal.Kind.WRITE else 0)
                tail = size - head
                if tail >= length:
                    used, head = used + length, head + length
                else:
                    used, head = used + tail + length, length
                if used > size:
                    return None
            for rec in records:
                self._log_replicated_locked(rec)
            return self._last_lsn
        finally:
            lock.release()

    def _check_replica(self) -> None:
        self._check_usable()
        if self._sb.role not in (Role.REPLICA, Role.REBUILDING):
            raise FencedError(
                f"volume {self._name!r} is {self._sb.role.name.lower()}, not a replica; "
                "only a replica takes replicated records"
            )

    def _log_replicated_locked(self, rec: ReplicatedRecord) -> bool:
        """Validate and log one record (caller holds ``_lock``). False for a duplicate."""
        lsn = rec.lsn
        if lsn <= self._last_lsn:
            return False
        volume_epoch = self._sb.epoch
        if rec.epoch > volume_epoch:
            raise StaleEpochError(
                f"volume {self._name!r} is at epoch {volume_epoch} but a replicated "
                f"record carries epoch {rec.epoch}; assign the new epoch first",
                volume_epoch=volume_epoch,
                request_epoch=rec.epoch,
            )
        last_seg = self._history.last
        new_segment = last_seg is None or last_seg.key() != (rec.epoch, rec.generation)
        if lsn != self._last_lsn + 1 and not new_segment:
            raise ReplicationGapError(
                f"volume {self._name!r} holds records up to LSN {self._last_lsn}; "
                f"record {lsn} of the same history segment does not follow it"
            )
        kind = wal.Kind(rec.kind)
        if kind is wal.Kind.WRITE:
            data = rec.data
            if len(data) != rec.block_count << _BLOCK_SHIFT or rec.block_count < 1:
                raise InvalidArgumentError(
                    f"replicated record {lsn}: {len(data)} bytes for {rec.block_count} blocks"
                )
            payload: memoryview | None = memoryview(bytes(data))
        elif kind is wal.Kind.ZERO:
            payload = None
        else:
            raise InvalidArgumentError(f"replicated record {lsn} has kind {kind.name}")
        if rec.block + rec.block_count > self._block_limit or rec.block_count < 1:
            raise InvalidArgumentError(
                f"replicated record {lsn} writes blocks [{rec.block}, "
                f"{rec.block + rec.block_count}) past the volume's {self._block_limit}"
            )
        if new_segment:
            # Durable before any record of the segment is: a restart must know which history
            # its records belong to.
            self._history.note_record(rec.epoch, rec.generation, lsn, previous_lsn=self._last_lsn)
            self._save_history()
        self._append_at(kind, rec.block, rec.block_count, payload, lsn, rec.epoch, rec.generation)
        return True

    def _apply_range_record(self, rec: ReplicatedRecord) -> None:
        """See :meth:`apply_replicated`; the primary's ``_zero_range_direct`` in replica form
        (same lock order: ``_apply_lock`` → ``_lock``)."""
        with self._apply_lock:
            with self._lock:
                self._check_replica()
                if rec.lsn <= self._last_lsn:
                    return
                self._checkpoint_locked()
                self._preserve_range(rec.block, rec.block + rec.block_count)
                self._log_replicated_locked(rec)
            try:
                self._zero_blocks(rec.block, rec.block + rec.block_count)
            except BlockyardError as exc:
                # Logged but not punched: reads would disagree with what recovery replays.
                self._take_offline(exc, "punching a replicated unmapped range")
                raise
            with self._lock:
                self._write_seq += 1

    def apply_backfill(self, runs: Sequence[tuple[int, int, BytesLike | None]]) -> None:
        """Write resync images ``(block, block_count, data or None for a hole)`` into the data
        region. The caller must leave out blocks a live record touched since the resync began
        (their newer image is in the WAL). Durable after the next flush."""
        with self._apply_lock:
            self._check_usable()
            if self._sb.role is not Role.REBUILDING and self._sb.role is not Role.REPLICA:
                raise FencedError(
                    f"volume {self._name!r} is {self._sb.role.name.lower()}; only a replica "
                    "takes resync blocks"
                )
            images: dict[int, memoryview | None] = {}
            for block, count, data in runs:
                if count < 1 or block + count > self._block_limit:
                    raise InvalidArgumentError(
                        f"resync run [{block}, {block + count}) is outside the volume's "
                        f"{self._block_limit} blocks"
                    )
                if data is None:
                    for b in range(block, block + count):
                        images[b] = None
                    continue
                if len(data) != count * BLOCK_SIZE:
                    raise InvalidArgumentError(
                        f"resync run at block {block}: {len(data)} bytes for {count} blocks"
                    )
                mv = memoryview(data)
                for i in range(count):
                    images[block + i] = mv[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
            with self._lock:
                # A live record may have landed since the caller filtered: it wins.
                for b in [b for b in images if b in self._dmap]:
                    del images[b]
            if images:
                self._apply_images(images)
                with self._lock:
                    # The next flush must sync these data-region writes too (it skips the
                    # fdatasync when nothing was written since the last one).
                    self._write_seq += 1

    def logged_extents_after(self, after_lsn: int) -> list[tuple[int, int]] | None:
        """Block runs touched by the records after ``after_lsn`` this copy still has in its
        WAL (a replica whose records diverged reports them so the primary resends them). None
        when some of those records are no longer in the WAL (then everything must be resent).
        Reads the whole WAL region; the caller applies nothing meanwhile."""
        with self._apply_lock:
            self._check_usable()
            last = self._last_lsn
            if last <= after_lsn:
                return []
            scanner = wal.WalScanner(
                self._file,
                volume=self._name,
                wal_offset=self._wal_offset,
                wal_size=self._wal_size,
                seed=self._seed,
                block_limit=self._block_limit,
            )
            found = scanner.records_after(after_lsn, last)
        if found is None:
            return None
        return sorted(found)

    def reset_log(self, next_lsn: int, history: History) -> None:
        """Drop the local log and continue at ``next_lsn`` with the primary's ``history``:
        everything logged so far is applied to the data region first, then a new WAL salt
        retires every old record at once. Durable on return. Used before a resync whose live
        stream does not continue this copy's records."""
        with self._apply_lock:
            self._check_usable()
            if self._sb.role not in (Role.REPLICA, Role.REBUILDING):
                raise FencedError(
                    f"volume {self._name!r} is {self._sb.role.name.lower()}, not a replica"
                )
            self._checkpoint_locked()
            self._release_due_retained_locked()
            with self._lock:
                if self._n_applied != len(self._log):
                    raise InvalidArgumentError("records were logged during a log reset")
                salt = secrets.randbelow((1 << 32) - 1) + 1
                sb = self._sb.with_(wal_salt=salt, checkpoint_lsn=next_lsn)
            # The primary's history as far as this copy will hold it: up to the record before
            # the stream's first, whose segment (if the stream continues one) stays open.
            history = History(history.segments)
            history.truncate(next_lsn - 1)
            self._history = history
            self._save_history()
            self._store_superblock(sb)
            with self._lock:
                self._seed = wal.seed_for(sb.uuid.bytes, salt)
                # Applied records still held (for replicas this copy tracked as a primary)
                # are retired with the old salt: their space is free again.
                self._used -= sum(e[E_CONSUMED] for e in self._log)
                self._retained_since.clear()
                self._log.clear()
                self._n_applied = 0
                self._next_lsn = next_lsn
                self._last_lsn = next_lsn - 1
                self._durable_lsn = next_lsn - 1
