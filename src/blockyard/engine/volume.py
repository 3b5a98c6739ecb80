"""A volume: one file holding a superblock, a circular WAL and a data region.

Durability contract
-------------------
- ``write()`` returning means the data is in the WAL (in the OS page cache): every later read
  sees it, and it survives the process crashing. It survives *power loss* only once a
  ``flush()`` that started after it has returned, or at once when written with ``fua=True``.
- ``flush()`` is a barrier: every write, unmap and grow acknowledged before it was called is on
  stable storage when it returns. Concurrent flushes share one ``fdatasync`` (group commit).
- ``unmap()``/``write_zeroes()`` follow the same rule as writes: visible at once, durable after
  the next flush.
- Snapshot create/delete, grow, epoch and role changes are durable when they return.
- Power loss never makes a block return bytes that were never written to it, and never loses
  a flushed write; opening the file afterwards replays the WAL (see :mod:`.wal`).

Thread safety
-------------
Every public method is thread-safe. Writers are serialised on one lock (the WAL is a single
append point); reads of clean blocks take no lock. A background flusher thread applies WAL
records to the data region and advances the checkpoint so WAL space is reused.

Lock order: ``_apply_lock`` (data region, deltas, superblock writes) before ``_lock`` (WAL
head, dirty map, pending records). Never the other way round.
"""

from __future__ import annotations

import logging
import threading
import uuid as uuidlib
from collections import deque
from dataclasses import dataclass
from typing import Final

from blockyard.engine import superblock as sbmod
from blockyard.engine import wal
from blockyard.engine.checkpoint import Checkpointer
from blockyard.engine.epoch import Role, check_epoch_advance, check_role_transition
from blockyard.engine.fileio import IoFile, VolumeFS
from blockyard.engine.group_commit import GroupCommit
from blockyard.engine.history import History, new_generation
from blockyard.engine.limits import (
    BLOCK_SIZE,
    CLOSE_TIMEOUT_S,
    DEFAULT_BACKPRESSURE_TIMEOUT_S,
    DEFAULT_FLUSH_TIMEOUT_S,
    FLUSH_HIGH_WATERMARK,
    LOGICAL_BLOCK_SIZE,
    MAX_RECORD_PAYLOAD_BYTES,
    MAX_TRANSFER_BLOCKS,
    MAX_VOLUME_SIZE_BYTES,
    SECTOR_SIZE,
    WAL_UNMAP_MAX_BLOCKS,
)
from blockyard.engine.read_path import ReadPath
from blockyard.engine.replica_sink import ReplicaSink
from blockyard.engine.replication_source import ReplicationSource
from blockyard.engine.snapshot import DeltaFile
from blockyard.engine.snapshot_ops import (
    SNAPSHOT_PREFIX,
    SNAPSHOT_SUFFIX,
    SnapshotInfo,
    SnapshotOps,
)
from blockyard.engine.write_path import WritePath
from blockyard.errors import (
    BlockyardError,
    BlockyardTimeoutError,
    EpochAheadError,
    InvalidSizeError,
    NotPrimaryError,
    OutOfRangeError,
    ShrinkRefusedError,
    StaleEpochError,
    TransferTooLargeError,
    VolumeClosedError,
    VolumeFailedError,
    WalTruncatedError,
)

log = logging.getLogger(__name__)

__all__ = ["SNAPSHOT_PREFIX", "SNAPSHOT_SUFFIX", "SnapshotInfo", "Volume", "WalRecord"]

VOLUME_FILE = "volume.blk"
_PAD = bytes(SECTOR_SIZE)
#: Sector padding views by length, so the hot write path slices nothing.
_PADS = [memoryview(_PAD)[:n] for n in range(SECTOR_SIZE)]
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_BLOCK_SHIFT = 12
#: Lock-free reads retry this often when a checkpoint runs underneath, then take the lock.
_READ_RETRIES = 3
_MAX_IO_BYTES = MAX_TRANSFER_BLOCKS * LOGICAL_BLOCK_SIZE
_WRITE = wal.Kind.WRITE
#: A range record's block count is a u32 on disk.
_RANGE_RECORD_MAX_BLOCKS = 1 << 30
_LBA_SHIFT = 9
#: Per-record bookkeeping, oldest first; see ``Volume._log``.
_Entry = tuple[int, wal.Kind, int, int, memoryview | None, int, int, int, int]
#: Indices into an ``_Entry``.
E_LSN: Final = 0
E_KIND: Final = 1
E_BLOCK: Final = 2
E_COUNT: Final = 3
E_PAYLOAD: Final = 4
E_EPOCH: Final = 5
E_CONSUMED: Final = 6
E_GEN: Final = 7
E_POS: Final = 8
#: Dirty-map entry: (lsn, data) — data None means the block reads as zeros (unmapped).
_DirtyEntry = tuple[int, memoryview | None]


@dataclass(frozen=True, slots=True)
class WalRecord:
    """One replicable change: what replication ships for "everything after LSN n".

    ``lba``/``block_count`` are in 512-byte logical blocks (``block``/``blocks`` in 4 KiB
    physical blocks, the unit of the WAL and of the replication wire). ``data`` is None for a
    ZERO record (the blocks read as zeros)."""

    lsn: int
    epoch: int
    kind: wal.Kind
    lba: int
    block_count: int
    data: bytes | memoryview | None
    generation: int = 0

    @property
    def block(self) -> int:
        return self.lba >> 3

    @property
    def blocks(self) -> int:
        return self.block_count >> 3


@dataclass(slots=True)
class VolumeStats:
    flush_calls: int = 0
    #: fdatasync calls issued for flush()/FUA barriers (group commit shares them).
    flush_syncs: int = 0
    #: fdatasync calls issued by the background flusher for checkpoints.
    checkpoint_syncs: int = 0
    checkpoints: int = 0
    #: Checkpoints that released WAL space without an fdatasync (nothing in them was flushed).
    lazy_checkpoints: int = 0
    backpressure_waits: int = 0
    wal_records: int = 0


class Volume(
    ReadPath, WritePath, Checkpointer, GroupCommit, SnapshotOps, ReplicationSource, ReplicaSink
):
    """An open volume. Create and open volumes through :class:`blockyard.engine.VolumeStore`."""

    def __init__(
        self,
        *,
        fs: VolumeFS,
        directory: str,
        file: IoFile,
        sb: sbmod.Superblock,
        deltas: list[DeltaFile],
        backpressure_timeout_s: float = DEFAULT_BACKPRESSURE_TIMEOUT_S,
        flush_timeout_s: float = DEFAULT_FLUSH_TIMEOUT_S,
        on_close: object = None,
        background_flusher: bool = True,
    ) -> None:
        self._fs = fs
        self._background = background_flusher
        self._dir = directory
        self._file = file
        self._sb = sb
        self._deltas = deltas
        self._name = sb.name
        self._seed = wal.seed_for(sb.uuid.bytes, sb.wal_salt)
        self._wal_offset = sb.wal_offset
        self._wal_size = sb.wal_size
        self._data_offset = sb.data_offset
        self._lba_count = sb.size_bytes >> _LBA_SHIFT
        self._block_limit = sb.size_bytes >> _BLOCK_SHIFT
        self._max_payload = min(MAX_RECORD_PAYLOAD_BYTES, (self._wal_size // 4) & ~(BLOCK_SIZE - 1))
        self._high_water = int(self._wal_size * FLUSH_HIGH_WATERMARK)
        self._backpressure_timeout_s = backpressure_timeout_s
        self._flush_timeout_s = flush_timeout_s
        self._on_close = on_close

        self._lock = threading.RLock()
        self._space_cv = threading.Condition(self._lock)
        self._apply_lock = threading.Lock()
        self._sync_cv = threading.Condition(threading.Lock())

        self._head = sb.checkpoint_pos
        self._used = 0
        self._gap = 0
        self._next_lsn = sb.checkpoint_lsn
        self._last_lsn = sb.checkpoint_lsn - 1
        self._durable_lsn = sb.checkpoint_lsn - 1
        #: Every record whose WAL space is not yet released, oldest first. The first
        #: ``_n_applied`` are in the data region already and only retained for replication
        #: feeds (see :class:`~blockyard.engine.replication_source.ReplicationSource`); the
        #: rest are pending: in the dirty map, waiting for the flusher.
        self._log: deque[_Entry] = deque()
        self._n_applied = 0
        #: WAL bytes of pending records (what the flusher's high-water mark looks at).
        self._pending_bytes = 0
        self._generation = sb.generation
        self._history = History()
        self._role_refuses_writes = sb.role in (Role.REPLICA, Role.REBUILDING)
        self._init_replication_source()
        self._dmap: dict[int, _DirtyEntry] = {}
        #: Odd while the data region is being changed; readers compare it before and after.
        self._apply_gen = 0
        self._write_seq = 0
        self._synced_seq = 0
        self._sync_running = False
        self._sync_waiters = 0
        self._sync_shared = False
        self._sync_delaying = False
        self._last_joined = 0
        self._last_sync_s = 0.0
        self._hdr = bytearray(wal.HEADER_BYTES)
        self._hdr_view = memoryview(self._hdr)
        self._wake_sent = False
        self.stats = VolumeStats()

        self._closed = False
        self._stopping = False
        #: Set for good when the file failed to persist data (see :meth:`_take_offline`).
        self._offline: VolumeFailedError | None = None
        self._failure: BlockyardError | None = None
        self._wake = threading.Event()
        self._flusher = threading.Thread(
            target=self._flusher_main, name=f"flusher-{self._name}", daemon=True
        )

    # ---- lifecycle ------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        fs: VolumeFS,
        directory: str,
        *,
        backpressure_timeout_s: float = DEFAULT_BACKPRESSURE_TIMEOUT_S,
        flush_timeout_s: float = DEFAULT_FLUSH_TIMEOUT_S,
        on_close: object = None,
        background_flusher: bool = True,
    ) -> Volume:
        """Open and recover a volume directory: replay the WAL, then checkpoint everything.

        With ``background_flusher=False`` checkpoints run inline in the writing thread when the
        WAL fills; the volume must then be used from one thread only. Tools and deterministic
        crash tests use that mode.
        """
        file = fs.open(f"{directory}/{VOLUME_FILE}")
        try:
            file.lock_exclusive()
            volume_name = directory.rstrip("/").rsplit("/", 1)[-1]
            sb = sbmod.decode(
                file.pread(sbmod.SUPERBLOCK_BYTES, 0),
                path=file.path,
                volume=volume_name,
                file_size=file.size(),
            )
            if file.size() < sb.data_offset + sb.size_bytes:
                # Grow extends the file before the superblock records the size, so this only
                # means a sparse tail was never materialised: extending it reads as zeros.
                file.truncate(sb.data_offset + sb.size_bytes)
            deltas = _load_deltas(fs, directory, sb)
        except BaseException:
            file.close()
            raise
        vol = cls(
            fs=fs,
            directory=directory,
            file=file,
            sb=sb,
            deltas=deltas,
            backpressure_timeout_s=backpressure_timeout_s,
            flush_timeout_s=flush_timeout_s,
            on_close=on_close,
            background_flusher=background_flusher,
        )
        try:
            vol._history = History.load(fs, directory, volume=vol._name)
            vol._recover()
        except BaseException:
            vol._close_files()
            raise
        if background_flusher:
            vol._flusher.start()
        return vol

    def _recover(self) -> None:
        sb = self._sb
        scanner = wal.WalScanner(
            self._file,
            volume=self._name,
            wal_offset=self._wal_offset,
            wal_size=self._wal_size,
            seed=self._seed,
            block_limit=self._block_limit,
        )
        result = scanner.scan(sb.checkpoint_lsn, sb.checkpoint_pos)
        if result.records:
            log.info(
                "volume %s: replaying %d WAL records from LSN %d",
                self._name,
                len(result.records),
                sb.checkpoint_lsn,
            )
        images: dict[int, memoryview | None] = {}
        for rec in result.records:
            hdr = rec.header
            if hdr.kind is wal.Kind.WRITE:
                mv = memoryview(rec.payload)
                for i in range(hdr.block_count):
                    images[hdr.block + i] = mv[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
            elif hdr.block_count > WAL_UNMAP_MAX_BLOCKS:
                # A range record: everything logged before it is applied first, in LSN order.
                self._apply_images(images)
                images = {}
                self._zero_blocks(hdr.block, hdr.block + hdr.block_count)
            else:
                for i in range(hdr.block_count):
                    images[hdr.block + i] = None
        if images:
            self._apply_images(images)
        end_lsn = result.end_lsn
        if sb.role in (Role.REPLICA, Role.REBUILDING):
            # A replica continues the primary's numbering: the next record it takes is the one
            # after the last it holds. (A stale record at that LSN in the region has the same
            # bytes if it belongs to the same history; if not, the primary finds out at the
            # handshake and the log is replaced with a new salt.)
            next_lsn = end_lsn
            generation = sb.generation
            if self._history.truncate(end_lsn - 1):
                # Segments learnt durably whose records a power loss took.
                self._history.save(self._fs, self._dir)
        else:
            # Number new records above every LSN still present anywhere in the region, so a
            # stale record from before this crash can never be mistaken for a future one. What
            # this incarnation writes is a new segment of the history: records a replica got
            # from before the crash past ``end_lsn - 1`` may have been lost here.
            next_lsn = result.max_seen_lsn + 1
            generation = new_generation()
            self._history.begin(sb.epoch, generation, next_lsn, close_at=end_lsn - 1)
            self._history.save(self._fs, self._dir)
        self._file.fdatasync()
        sb = sb.with_(checkpoint_lsn=next_lsn, checkpoint_pos=result.end_pos, generation=generation)
        self._write_superblock(sb)
        self._file.fdatasync()
        self._sb = sb
        self._generation = generation
        self._head = result.end_pos
        self._next_lsn = next_lsn
        self._last_lsn = next_lsn - 1
        self._durable_lsn = next_lsn - 1
        self._adopt_retained(result, end_lsn)

    def close(self) -> None:
        """Checkpoint everything, sync, and release the file. Idempotent."""
        if self._closed:
            return
        self._stopping = True
        self._wake.set()
        if self._background:
            self._flusher.join(CLOSE_TIMEOUT_S)
        if self._flusher.is_alive():
            raise BlockyardTimeoutError(
                f"volume {self._name!r}: the flusher did not stop within {CLOSE_TIMEOUT_S} s; "
                "the underlying storage may be hung"
            )
        try:
            if self._offline is None:
                self._checkpoint()
                self._sync_file()
        finally:
            self._closed = True
            if self._offline is not None:
                # Pages whose write-back failed may sit clean in the cache with bytes the disk
                # never got; drop them so the next open recovers from the disk's truth.
                self._file.drop_cache()
            self._close_files()
            if callable(self._on_close):
                self._on_close(self)

    def _close_files(self) -> None:
        for d in self._deltas:
            d.close()
        for tracker in self._trackers.values():
            tracker.bitmap.close()
        self._trackers.clear()
        self._file.close()

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- geometry and identity -----------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def directory(self) -> str:
        return self._dir

    @property
    def uuid(self) -> uuidlib.UUID:
        return self._sb.uuid

    @property
    def size_bytes(self) -> int:
        return self._sb.size_bytes

    @property
    def logical_block_size(self) -> int:
        return LOGICAL_BLOCK_SIZE

    @property
    def physical_block_size(self) -> int:
        return BLOCK_SIZE

    @property
    def block_count(self) -> int:
        return self._lba_count

    @property
    def max_transfer_blocks(self) -> int:
        return MAX_TRANSFER_BLOCKS

    @property
    def epoch(self) -> int:
        return self._sb.epoch

    @property
    def role(self) -> Role:
        return self._sb.role

    @property
    def created_ns(self) -> int:
        return self._sb.created_ns

    @property
    def wal_size_bytes(self) -> int:
        return self._wal_size

    @property
    def last_lsn(self) -> int:
        return self._last_lsn

    @property
    def durable_lsn(self) -> int:
        return self._durable_lsn

    @property
    def checkpoint_lsn(self) -> int:
        """First LSN not yet applied to the data region."""
        return self._sb.checkpoint_lsn

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def generation(self) -> int:
        """The incarnation writing this volume's records (see :mod:`.history`)."""
        return self._generation

    @property
    def history(self) -> History:
        """A copy of the volume's write history (segments of (epoch, generation))."""
        with self._lock:
            return History(self._history.segments)

    def _save_history(self) -> None:
        self._history.save(self._fs, self._dir)

    def _refuse_write(self) -> None:
        raise NotPrimaryError(
            f"volume {self._name!r} is a {self._sb.role.name.lower()} copy: it takes writes "
            "only from its primary's replication stream; write through the primary"
        )

    def allocated_bytes(self) -> int:
        return self._file.allocated_bytes() + sum(d.file.allocated_bytes() for d in self._deltas)

    # ---- argument checks -----------------------------------------------------------------

    def _check_range(self, lba: int, block_count: int, *, cap: bool = True) -> None:
        if cap and block_count > MAX_TRANSFER_BLOCKS:
            raise TransferTooLargeError(
                f"volume {self._name!r}: {block_count} blocks in one request exceeds the cap of "
                f"{MAX_TRANSFER_BLOCKS} ({MAX_TRANSFER_BLOCKS * LOGICAL_BLOCK_SIZE} bytes); "
                "split the request"
            )
        if lba < 0 or block_count < 0 or lba + block_count > self._lba_count:
            raise OutOfRangeError(
                f"volume {self._name!r}: blocks [{lba}, {lba + block_count}) are outside the "
                f"volume's {self._lba_count} blocks of {LOGICAL_BLOCK_SIZE} bytes"
            )

    def _check_usable(self) -> None:
        if self._offline is not None:
            raise VolumeFailedError(str(self._offline)) from self._offline.__cause__
        if self._closed or self._stopping:
            raise VolumeClosedError(f"volume {self._name!r} is closed; open it again")

    def _take_offline(self, exc: BlockyardError, what: str) -> None:
        """The volume file failed to persist data: stop for good (sticky).

        After a failed ``fdatasync`` Linux may mark the unwritten pages clean, so a later sync
        that succeeds would not carry them and a flush acknowledged then could be a lie. Every
        later operation fails with :class:`VolumeFailedError` until the volume is reopened,
        which recovers from the disk (the WAL still holds everything since the last durable
        checkpoint; writes not covered by a completed flush may be lost, as the contract
        allows)."""
        if self._offline is None:
            err = VolumeFailedError(
                f"volume {self._name!r} was taken offline: {what} failed ({exc}); no later "
                "flush can be trusted. Fix the device or free space, then reopen the volume "
                "(restart the volume server)"
            )
            err.__cause__ = exc
            self._offline = err
            log.error("%s", err)
        self._stopping = True
        self._wake.set()
        with self._lock:
            self._space_cv.notify_all()
        with self._sync_cv:
            self._sync_cv.notify_all()

    def _sync_file(self) -> None:
        """``fdatasync`` the volume file; a failure takes the volume offline (sticky)."""
        if self._offline is not None:
            self._check_usable()
        try:
            self._file.fdatasync()
        except BlockyardError as exc:
            self._take_offline(exc, "fdatasync")
            raise

    @property
    def offline(self) -> bool:
        """True once a failed sync took the volume offline; reopen it to recover."""
        return self._offline is not None

    def _check_epoch(self, epoch: int | None) -> None:
        if epoch is None:
            return
        current = self._sb.epoch
        if epoch < current:
            raise StaleEpochError(
                f"volume {self._name!r} is at epoch {current}; a write from epoch {epoch} is "
                "from a deposed primary and is refused",
                volume_epoch=current,
                request_epoch=epoch,
            )
        if epoch > current:
            raise EpochAheadError(
                f"volume {self._name!r} is at epoch {current} but the write carries epoch "
                f"{epoch}; assign the new epoch to the volume first"
            )

    # ---- size, epoch, role ---------------------------------------------------------------

    def grow(self, new_size_bytes: int) -> None:
        """Grow online; durable on return. Same size is a no-op; smaller is refused."""
        self._check_usable()
        current = self._sb.size_bytes
        if new_size_bytes < current:
            raise ShrinkRefusedError(
                f"volume {self._name!r} is {current} bytes; shrinking to {new_size_bytes} would "
                "cut off data the filesystem may use. Create a smaller volume and copy instead"
            )
        if new_size_bytes % BLOCK_SIZE or new_size_bytes > MAX_VOLUME_SIZE_BYTES:
            raise InvalidSizeError(
                f"new size {new_size_bytes} must be a multiple of {BLOCK_SIZE} and at most "
                f"{MAX_VOLUME_SIZE_BYTES} bytes"
            )
        if new_size_bytes == current:
            return
        with self._apply_lock:
            self._file.truncate(self._data_offset + new_size_bytes)
            self._tracked_fdatasync()
            sb = self._sb.with_(size_bytes=new_size_bytes)
            self._write_superblock(sb)
            self._tracked_fdatasync()
            with self._lock:
                self._sb = sb
                self._block_limit = new_size_bytes >> _BLOCK_SHIFT
                self._lba_count = new_size_bytes >> _LBA_SHIFT
                bitmaps = [t.bitmap for t in self._trackers.values()]
            for bitmap in bitmaps:
                bitmap.resize(new_size_bytes >> _BLOCK_SHIFT)
                bitmap.persist()

    def set_epoch(self, epoch: int) -> None:
        """Move the epoch forward (or keep it); durable on return."""
        self._check_usable()
        with self._apply_lock:
            check_epoch_advance(self._name, self._sb.epoch, epoch)
            if epoch == self._sb.epoch:
                return
            self._store_superblock(self._sb.with_(epoch=epoch))

    def set_role(self, role: Role, epoch: int | None = None) -> None:
        """Change role (and optionally epoch) atomically; durable on return.

        Becoming primary starts a new history segment (a new generation) at the next LSN, so
        a replica holding records past this point from another history is told apart."""
        self._check_usable()
        with self._apply_lock:
            new_epoch = self._sb.epoch if epoch is None else epoch
            check_role_transition(self._name, self._sb.role, role, self._sb.epoch, new_epoch)
            if role == self._sb.role and new_epoch == self._sb.epoch:
                return
            sb = self._sb.with_(role=role, epoch=new_epoch)
            if role is Role.PRIMARY and (
                self._sb.role is not Role.PRIMARY or new_epoch != self._sb.epoch
            ):
                with self._lock:
                    generation = new_generation()
                    self._history.begin(
                        new_epoch, generation, self._next_lsn, close_at=self._last_lsn
                    )
                self._save_history()
                sb = sb.with_(generation=generation)
            self._store_superblock(sb)
            if role is not Role.PRIMARY:
                self.untrack_all_replicas()

    def _store_superblock(self, sb: sbmod.Superblock) -> None:
        """Persist a superblock change. Caller holds ``_apply_lock``."""
        self._write_superblock(sb)
        self._tracked_fdatasync()
        with self._lock:
            self._sb = sb
            self._generation = sb.generation
            self._role_refuses_writes = sb.role in (Role.REPLICA, Role.REBUILDING)

    # ---- replication feed ----------------------------------------------------------------

    def wal_records(self, since_lsn: int) -> list[WalRecord]:
        """Every change with LSN > ``since_lsn`` still held in the WAL, in LSN order.

        Raises ``WalTruncatedError`` when some of them were already checkpointed away (the
        caller then needs a full rebuild).
        """
        with self._lock:
            oldest = self._log[0][E_LSN] if self._log else self._next_lsn
            if since_lsn < oldest - 1 and since_lsn < self._last_lsn:
                raise WalTruncatedError(
                    f"volume {self._name!r}: records after LSN {since_lsn} are needed but the "
                    f"WAL starts at LSN {oldest}; rebuild the replica in full"
                )
            entries = [e for e in self._log if e[E_LSN] > since_lsn]
        return [self._to_record(e) for e in entries]


def _load_deltas(fs: VolumeFS, directory: str, sb: sbmod.Superblock) -> list[DeltaFile]:
    deltas: list[DeltaFile] = []
    try:
        for entry in fs.listdir(directory):
            path = f"{directory}/{entry}"
            if entry.startswith(SNAPSHOT_PREFIX) and entry.endswith(f"{SNAPSHOT_SUFFIX}.tmp"):
                # A snapshot whose creation did not finish: it was never acknowledged.
                fs.remove(path)
            elif entry.startswith(SNAPSHOT_PREFIX) and entry.endswith(SNAPSHOT_SUFFIX):
                deltas.append(DeltaFile.load(fs.open(path), sb.name))
    except BaseException:
        for d in deltas:
            d.close()
        raise
    deltas.sort(key=lambda d: d.header.seq)
    return deltas
