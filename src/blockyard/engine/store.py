"""A data directory of volumes.

Layout::

    DIR/<name>/volume.blk            superblock + WAL + data region
    DIR/<name>/snap-00000001.cow     one delta file per snapshot
    DIR/.tmp-<name>-<rand>/          a volume being created (removed at start-up if found)
    DIR/.trash-<name>-<rand>/        a volume being deleted (removed at start-up if found)

Create and delete are atomic with respect to crashes: a volume appears by renaming a finished
directory into place and disappears by renaming it into the trash, so a crash never leaves a
half-made volume under its real name. Deleting a volume removes every file it owns.

Thread safety: all methods are thread-safe; a volume is open at most once per store (and, via
an exclusive file lock, once per machine).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass

from blockyard.engine import superblock as sbmod
from blockyard.engine.epoch import Role
from blockyard.engine.fileio import OsFS, VolumeFS
from blockyard.engine.limits import (
    BLOCK_SIZE,
    DEFAULT_BACKPRESSURE_TIMEOUT_S,
    DEFAULT_FLUSH_TIMEOUT_S,
    LOGICAL_BLOCK_SIZE,
    MAX_TRANSFER_BLOCKS,
    MAX_VOLUME_SIZE_BYTES,
    MAX_WAL_SIZE_BYTES,
    MIN_VOLUME_SIZE_BYTES,
    MIN_WAL_SIZE_BYTES,
    default_wal_size,
)
from blockyard.engine.names import check_name
from blockyard.engine.volume import SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX, VOLUME_FILE, Volume
from blockyard.errors import (
    InvalidSizeError,
    VolumeBusyError,
    VolumeExistsError,
    VolumeNotFoundError,
)

log = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


@dataclass(frozen=True, slots=True)
class VolumeInfo:
    name: str
    uuid: uuidlib.UUID
    size_bytes: int
    epoch: int
    role: Role
    wal_size_bytes: int
    allocated_bytes: int
    snapshot_count: int
    created_ns: int


def _check_size(size_bytes: int) -> None:
    if not MIN_VOLUME_SIZE_BYTES <= size_bytes <= MAX_VOLUME_SIZE_BYTES:
        raise InvalidSizeError(
            f"volume size {size_bytes} bytes is out of range: use {MIN_VOLUME_SIZE_BYTES} "
            f"(1 MiB) to {MAX_VOLUME_SIZE_BYTES} bytes"
        )
    if size_bytes % BLOCK_SIZE:
        rounded = (size_bytes + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE
        raise InvalidSizeError(
            f"volume size {size_bytes} is not a multiple of {BLOCK_SIZE} bytes; use {rounded}"
        )


class VolumeStore:
    def __init__(
        self,
        root: str,
        *,
        fs: VolumeFS | None = None,
        backpressure_timeout_s: float = DEFAULT_BACKPRESSURE_TIMEOUT_S,
        flush_timeout_s: float = DEFAULT_FLUSH_TIMEOUT_S,
        background_flusher: bool = True,
    ) -> None:
        self._background_flusher = background_flusher
        self.root = root.rstrip("/") or "/"
        self.fs: VolumeFS = fs if fs is not None else OsFS()
        self._backpressure_timeout_s = backpressure_timeout_s
        self._flush_timeout_s = flush_timeout_s
        self._lock = threading.Lock()
        self._open: dict[str, Volume] = {}
        self.fs.mkdir(self.root)
        for entry in self.fs.listdir(self.root):
            if entry.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                log.info(
                    "removing leftover %s/%s from an interrupted create or delete", root, entry
                )
                self.fs.rmtree(f"{self.root}/{entry}")

    # ---- queries -------------------------------------------------------------------------

    def _dir(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self, name: str) -> bool:
        check_name(name)
        return self.fs.exists(f"{self._dir(name)}/{VOLUME_FILE}")

    def names(self) -> list[str]:
        return [
            e
            for e in self.fs.listdir(self.root)
            if not e.startswith(".") and self.fs.exists(f"{self.root}/{e}/{VOLUME_FILE}")
        ]

    def info(self, name: str) -> VolumeInfo:
        """Describe a volume from its superblock, without opening (or recovering) it."""
        check_name(name)
        with self._lock:
            vol = self._open.get(name)
        if vol is not None and not vol.closed:
            return VolumeInfo(
                name=vol.name,
                uuid=vol.uuid,
                size_bytes=vol.size_bytes,
                epoch=vol.epoch,
                role=vol.role,
                wal_size_bytes=vol.wal_size_bytes,
                allocated_bytes=vol.allocated_bytes(),
                snapshot_count=len(vol.list_snapshots()),
                created_ns=vol.created_ns,
            )
        path = f"{self._dir(name)}/{VOLUME_FILE}"
        if not self.fs.exists(path):
            raise VolumeNotFoundError(self._not_found(name))
        f = self.fs.open(path)
        try:
            sb = sbmod.decode(
                f.pread(sbmod.SUPERBLOCK_BYTES, 0), path=path, volume=name, file_size=f.size()
            )
            allocated = f.allocated_bytes()
        finally:
            f.close()
        snaps = [
            e
            for e in self.fs.listdir(self._dir(name))
            if e.startswith(SNAPSHOT_PREFIX) and e.endswith(SNAPSHOT_SUFFIX)
        ]
        return VolumeInfo(
            name=sb.name,
            uuid=sb.uuid,
            size_bytes=sb.size_bytes,
            epoch=sb.epoch,
            role=sb.role,
            wal_size_bytes=sb.wal_size,
            allocated_bytes=allocated,
            snapshot_count=len(snaps),
            created_ns=sb.created_ns,
        )

    def list(self) -> list[VolumeInfo]:
        return [self.info(n) for n in self.names()]

    def free_bytes(self) -> int:
        return self.fs.free_bytes(self.root)

    def _not_found(self, name: str) -> str:
        return f"no volume {name!r} in {self.root}; list volumes with `blockyard volume list`"

    # ---- lifecycle -----------------------------------------------------------------------

    def create(
        self,
        name: str,
        size_bytes: int,
        *,
        wal_size_bytes: int | None = None,
        volume_uuid: uuidlib.UUID | None = None,
    ) -> Volume:
        """Create and open a new volume (all zeros). Durable on return."""
        check_name(name)
        _check_size(size_bytes)
        wal_size = default_wal_size(size_bytes) if wal_size_bytes is None else wal_size_bytes
        if not MIN_WAL_SIZE_BYTES <= wal_size <= MAX_WAL_SIZE_BYTES or wal_size % BLOCK_SIZE:
            raise InvalidSizeError(
                f"WAL size {wal_size} must be a multiple of {BLOCK_SIZE} between "
                f"{MIN_WAL_SIZE_BYTES} and {MAX_WAL_SIZE_BYTES} bytes"
            )
        with self._lock:
            if self.fs.exists(self._dir(name)):
                raise VolumeExistsError(
                    f"volume {name!r} already exists in {self.root}; delete it first or pick "
                    "another name"
                )
            tmp = self._make_volume_dir(name, size_bytes, wal_size, volume_uuid or uuidlib.uuid4())
            self.fs.rename(tmp, self._dir(name))
        return self.open(name)

    def _make_volume_dir(
        self, name: str, size_bytes: int, wal_size: int, volume_uuid: uuidlib.UUID
    ) -> str:
        tmp = f"{self.root}/{_TMP_PREFIX}{name}-{secrets.token_hex(4)}"
        self.fs.mkdir(tmp)
        data_offset = sbmod.data_offset_for(wal_size)
        f = self.fs.open(f"{tmp}/{VOLUME_FILE}", create=True)
        try:
            f.truncate(data_offset + size_bytes)
            # WAL appends must never hit ENOSPC, so the region is reserved up front — with real
            # zeros rather than fallocate: overwriting written extents is about 3x cheaper per
            # append than converting unwritten ones (measured on ext4), and appends are the hot
            # path.
            f.write_zeros(sbmod.WAL_OFFSET, wal_size)
            sb = sbmod.Superblock(
                uuid=volume_uuid,
                name=name,
                size_bytes=size_bytes,
                epoch=0,
                role=Role.NONE,
                wal_offset=sbmod.WAL_OFFSET,
                wal_size=wal_size,
                data_offset=data_offset,
                checkpoint_lsn=1,
                checkpoint_pos=0,
                snapshot_seq=0,
                created_ns=time.time_ns(),
            )
            f.pwritev([sb.encode()], 0)
            f.fdatasync()
        except BaseException:
            f.close()
            self.fs.rmtree(tmp)
            raise
        f.close()
        return tmp

    def open(self, name: str) -> Volume:
        """Open (and recover) a volume. Opening one already open in this store is refused."""
        check_name(name)
        with self._lock:
            if name in self._open:
                raise VolumeBusyError(
                    f"volume {name!r} is already open in this process; use that handle"
                )
            if not self.fs.exists(f"{self._dir(name)}/{VOLUME_FILE}"):
                raise VolumeNotFoundError(self._not_found(name))
            vol = Volume.open(
                self.fs,
                self._dir(name),
                backpressure_timeout_s=self._backpressure_timeout_s,
                flush_timeout_s=self._flush_timeout_s,
                on_close=self._forget,
                background_flusher=self._background_flusher,
            )
            self._open[name] = vol
            return vol

    def _forget(self, vol: Volume) -> None:
        with self._lock:
            if self._open.get(vol.name) is vol:
                del self._open[vol.name]

    def delete(self, name: str) -> None:
        """Remove a volume and every file it owns. Idempotent: a missing volume is fine."""
        check_name(name)
        with self._lock:
            if name in self._open:
                raise VolumeBusyError(
                    f"volume {name!r} is open; close it (or stop serving it) before deleting"
                )
            d = self._dir(name)
            if not self.fs.exists(d):
                return
            f = None
            if self.fs.exists(f"{d}/{VOLUME_FILE}"):
                f = self.fs.open(f"{d}/{VOLUME_FILE}")
                try:
                    f.lock_exclusive()
                except BaseException:
                    f.close()
                    raise
            try:
                trash = f"{self.root}/{_TRASH_PREFIX}{name}-{secrets.token_hex(4)}"
                self.fs.rename(d, trash)
            finally:
                if f is not None:
                    f.close()
            self.fs.rmtree(trash)

    def clone(self, source: Volume, snapshot: str, name: str) -> Volume:
        """Create volume ``name`` holding ``source``'s snapshot contents; durable on return.

        Copies only the blocks that may be non-zero (allocated extents and snapshot deltas);
        the clone is independent of the source afterwards.
        """
        check_name(name)
        snap = source.get_snapshot(snapshot)
        with self._lock:
            if self.fs.exists(self._dir(name)):
                raise VolumeExistsError(
                    f"volume {name!r} already exists in {self.root}; pick another name"
                )
            wal_size = default_wal_size(snap.size_bytes)
            tmp = self._make_volume_dir(name, snap.size_bytes, wal_size, uuidlib.uuid4())
            try:
                self._copy_snapshot(source, snapshot, tmp, wal_size)
            except BaseException:
                self.fs.rmtree(tmp)
                raise
            self.fs.rename(tmp, self._dir(name))
        return self.open(name)

    def _copy_snapshot(self, source: Volume, snapshot: str, tmp: str, wal_size: int) -> None:
        data_offset = sbmod.data_offset_for(wal_size)
        chunk_blocks = (1 << 20) // BLOCK_SIZE
        per_block = BLOCK_SIZE // LOGICAL_BLOCK_SIZE
        zero = bytes(BLOCK_SIZE * chunk_blocks)
        f = self.fs.open(f"{tmp}/{VOLUME_FILE}")
        try:
            for first, count in source.snapshot_extents(snapshot):
                for b in range(first, first + count, chunk_blocks):
                    n = min(chunk_blocks, first + count - b)
                    lbas = n * per_block
                    assert lbas <= MAX_TRANSFER_BLOCKS
                    data = source.read_snapshot(snapshot, b * per_block, lbas)
                    if data != zero[: len(data)]:
                        f.pwritev([data], data_offset + b * BLOCK_SIZE)
            f.fdatasync()
        finally:
            f.close()

    def close_all(self) -> None:
        with self._lock:
            vols = list(self._open.values())
        for v in vols:
            v.close()
