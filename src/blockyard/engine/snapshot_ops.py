"""Snapshot operations of a volume: create, delete, read, list, restore (a mixin of
:class:`~blockyard.engine.volume.Volume`).

A snapshot is an empty delta file plus a superblock counter bump: O(1) in volume size. The
flusher copies a block's old image into the newest snapshot's delta before it first overwrites
or punches that block (see ``Volume._preserve``). Reading snapshot *S* at block *b* takes the
first delta holding *b* among *S* and every newer snapshot, else the live data region.

Thread safety: every method takes the volume's apply lock (data region, deltas, superblock).
"""

from __future__ import annotations

import threading
import time
import uuid as uuidlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blockyard.engine import superblock as sbmod
from blockyard.engine.fileio import IoFile, VolumeFS
from blockyard.engine.limits import (
    BLOCK_SIZE,
    MAX_TRANSFER_BLOCKS,
    SECTORS_PER_BLOCK,
    SNAPSHOT_MAX_COUNT,
)
from blockyard.engine.names import check_name
from blockyard.engine.snapshot import DeltaFile, SnapshotHeader
from blockyard.errors import (
    InvalidSizeError,
    OutOfRangeError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    TransferTooLargeError,
)

SNAPSHOT_PREFIX = "snap-"
SNAPSHOT_SUFFIX = ".cow"
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_BLOCK_SHIFT = 12
_LBA_SHIFT = 9


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    name: str
    seq: int
    uuid: uuidlib.UUID
    size_bytes: int
    created_ns: int
    #: Blocks this snapshot's delta holds (what it costs beyond the live volume).
    delta_blocks: int


def snapshot_file_name(seq: int) -> str:
    return f"{SNAPSHOT_PREFIX}{seq:08d}{SNAPSHOT_SUFFIX}"


class SnapshotOps:
    """The snapshot half of a volume. Uses the volume's state, declared here for the checker."""

    if TYPE_CHECKING:
        _apply_lock: threading.Lock
        _deltas: list[DeltaFile]
        _name: str
        _sb: sbmod.Superblock
        _dir: str
        _fs: VolumeFS
        _file: IoFile
        _data_offset: int

        def _check_usable(self) -> None: ...
        def _checkpoint_locked(self) -> None: ...
        def _store_superblock(self, sb: sbmod.Superblock) -> None: ...
        def write(self, lba: int, data: bytes, *, fua: bool = False) -> int: ...
        def unmap(self, lba: int, block_count: int) -> int: ...
        def flush(self, timeout_s: float | None = None) -> None: ...

    def _find_snapshot(self, name: str) -> int:
        for i, d in enumerate(self._deltas):
            if d.header.name == name:
                return i
        raise SnapshotNotFoundError(
            f"volume {self._name!r} has no snapshot {name!r}; list them with "
            "`blockyard volume snapshot list`"
        )

    def _info(self, d: DeltaFile) -> SnapshotInfo:
        h = d.header
        return SnapshotInfo(
            name=h.name,
            seq=h.seq,
            uuid=h.snapshot_uuid,
            size_bytes=h.size_bytes,
            created_ns=h.created_ns,
            delta_blocks=d.block_count,
        )

    def list_snapshots(self) -> list[SnapshotInfo]:
        self._check_usable()
        with self._apply_lock:
            return [self._info(d) for d in self._deltas]

    def get_snapshot(self, name: str) -> SnapshotInfo:
        self._check_usable()
        with self._apply_lock:
            return self._info(self._deltas[self._find_snapshot(name)])

    def create_snapshot(self, name: str) -> SnapshotInfo:
        """Point-in-time snapshot of everything acknowledged before the call; durable on return.

        O(1) in volume size: it drains the WAL (bounded by the WAL size) and creates an empty
        delta file. Later overwrites pay one block copy each, once.
        """
        check_name(name, what="snapshot")
        self._check_usable()
        with self._apply_lock:
            if any(d.header.name == name for d in self._deltas):
                raise SnapshotExistsError(
                    f"volume {self._name!r} already has a snapshot {name!r}; pick another name"
                )
            if len(self._deltas) >= SNAPSHOT_MAX_COUNT:
                raise InvalidSizeError(
                    f"volume {self._name!r} has {SNAPSHOT_MAX_COUNT} snapshots, the maximum; "
                    "delete old ones first"
                )
            self._checkpoint_locked()
            seq = self._sb.snapshot_seq + 1
            self._store_superblock(self._sb.with_(snapshot_seq=seq))
            header = SnapshotHeader(
                seq=seq,
                volume_uuid=self._sb.uuid,
                snapshot_uuid=uuidlib.uuid4(),
                name=name,
                size_bytes=self._sb.size_bytes,
                created_ns=time.time_ns(),
            )
            final = f"{self._dir}/{snapshot_file_name(seq)}"
            tmp = f"{final}.tmp"
            self._fs.remove(tmp)
            f = self._fs.open(tmp, create=True)
            try:
                DeltaFile.create(f, header, self._name)
            finally:
                f.close()
            self._fs.rename(tmp, final)
            delta = DeltaFile.load(self._fs.open(final), self._name)
            self._deltas.append(delta)
            return self._info(delta)

    def delete_snapshot(self, name: str) -> None:
        """Delete a snapshot; older snapshots keep their view. Durable on return."""
        self._check_usable()
        with self._apply_lock:
            i = self._find_snapshot(name)
            d = self._deltas[i]
            if i > 0:
                prev = self._deltas[i - 1]
                # The older snapshot may be smaller (the volume grew in between): blocks past
                # its end are not part of its view.
                limit = prev.header.size_bytes >> _BLOCK_SHIFT
                todo = [b for b in d.blocks() if b < limit and not prev.has(b)]
                for k in range(0, len(todo), 256):
                    prev.append([(b, d.read_block(b)) for b in todo[k : k + 256]])
            path = d.file.path
            d.close()
            del self._deltas[i]
            self._fs.remove(path)

    def read_snapshot(self, name: str, lba: int, block_count: int) -> bytes:
        """Read a snapshot's view of ``block_count`` logical blocks at ``lba``."""
        self._check_usable()
        with self._apply_lock:
            i = self._find_snapshot(name)
            size = self._deltas[i].header.size_bytes
            if block_count > MAX_TRANSFER_BLOCKS:
                raise TransferTooLargeError(
                    f"{block_count} blocks exceeds the cap of {MAX_TRANSFER_BLOCKS}; split it"
                )
            if lba < 0 or block_count < 0 or (lba + block_count) << _LBA_SHIFT > size:
                raise OutOfRangeError(
                    f"snapshot {name!r}: blocks [{lba}, {lba + block_count}) are outside its "
                    f"{size >> _LBA_SHIFT} blocks"
                )
            start = lba << _LBA_SHIFT
            end = start + (block_count << _LBA_SHIFT)
            parts: list[bytes] = []
            for b in range(start >> _BLOCK_SHIFT, ((end - 1) >> _BLOCK_SHIFT) + 1 if end else 0):
                img = self._snapshot_block(i, b)
                bstart = b << _BLOCK_SHIFT
                parts.append(
                    img[max(start, bstart) - bstart : min(end, bstart + BLOCK_SIZE) - bstart]
                )
            return b"".join(parts)

    def _snapshot_block(self, index: int, block: int) -> bytes:
        for d in self._deltas[index:]:
            if d.has(block):
                return d.read_block(block)
        return self._file.pread(BLOCK_SIZE, self._data_offset + (block << _BLOCK_SHIFT))

    def snapshot_extents(self, name: str) -> list[tuple[int, int]]:
        """Block ranges (first, count) that may hold non-zero data in the snapshot's view."""
        self._check_usable()
        with self._apply_lock:
            i = self._find_snapshot(name)
            limit = self._deltas[i].header.size_bytes >> _BLOCK_SHIFT
            blocks: set[int] = set()
            for d in self._deltas[i:]:
                blocks.update(b for b in d.blocks() if b < limit)
            extents = self._data_extents(0, limit)
        for b in blocks:
            extents.append((b, 1))
        return _merge_extents(extents)

    def _data_extents(self, first: int, end: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        off = self._data_offset + (first << _BLOCK_SHIFT)
        stop = self._data_offset + (end << _BLOCK_SHIFT)
        while off < stop:
            data = self._file.next_data(off)
            if data < 0 or data >= stop:
                break
            hole = min(self._file.next_hole(data), stop)
            b0 = (data - self._data_offset) >> _BLOCK_SHIFT
            b1 = (hole - self._data_offset + BLOCK_SIZE - 1) >> _BLOCK_SHIFT
            out.append((b0, b1 - b0))
            off = max(hole, off + BLOCK_SIZE)
        return out

    def restore_snapshot(self, name: str) -> None:
        """Make the live volume read exactly as the snapshot; durable on return.

        Writes go through the WAL, so newer snapshots keep their views. Not atomic: run it on a
        volume nobody is using, and run it again if it was interrupted.
        """
        self._check_usable()
        with self._apply_lock:
            # Blocks written since the snapshot but still only in the WAL have no delta copy
            # yet: apply them first so the deltas name every block that changed.
            self._checkpoint_locked()
            i = self._find_snapshot(name)
            snap_size = self._deltas[i].header.size_bytes
            blocks = sorted({b for d in self._deltas[i:] for b in d.blocks()})
            limit = snap_size >> _BLOCK_SHIFT
        for k in range(0, len(blocks), 256):
            group = [b for b in blocks[k : k + 256] if b < limit]
            with self._apply_lock:
                images = [(b, self._snapshot_block(i, b)) for b in group]
            for b, img in images:
                if img == _ZERO_BLOCK:
                    self.unmap(b * SECTORS_PER_BLOCK, SECTORS_PER_BLOCK)
                else:
                    self.write(b * SECTORS_PER_BLOCK, img)
        if self._sb.size_bytes > snap_size:
            self.unmap(snap_size >> _LBA_SHIFT, (self._sb.size_bytes - snap_size) >> _LBA_SHIFT)
        self.flush()


def _merge_extents(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for first, count in sorted(extents):
        if out and first <= out[-1][0] + out[-1][1]:
            last_first, last_count = out[-1]
            out[-1] = (last_first, max(last_count, first + count - last_first))
        else:
            out.append((first, count))
    return out
