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
import time
import uuid as uuidlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from blockyard.blockdev import BytesLike, LbaStatus
from blockyard.engine import superblock as sbmod
from blockyard.engine import wal
from blockyard.engine.epoch import Role, check_epoch_advance, check_role_transition
from blockyard.engine.fileio import IoFile, VolumeFS
from blockyard.engine.limits import (
    BLOCK_SIZE,
    CHECKPOINT_RETRY_S,
    CLOSE_TIMEOUT_S,
    DEFAULT_BACKPRESSURE_TIMEOUT_S,
    DEFAULT_FLUSH_TIMEOUT_S,
    FLUSH_HIGH_WATERMARK,
    FLUSH_IDLE_INTERVAL_S,
    GROUP_COMMIT_DELAY_MAX_S,
    LOGICAL_BLOCK_SIZE,
    MAX_RECORD_PAYLOAD_BYTES,
    MAX_TRANSFER_BLOCKS,
    MAX_VOLUME_SIZE_BYTES,
    SECTOR_SIZE,
    SECTORS_PER_BLOCK,
    SNAPSHOT_MAX_COUNT,
    WAL_UNMAP_MAX_BLOCKS,
    WRITE_SAME_CHUNK_BYTES,
)
from blockyard.engine.names import check_name
from blockyard.engine.snapshot import DeltaFile, SnapshotHeader
from blockyard.errors import (
    BlockyardError,
    BlockyardTimeoutError,
    EpochAheadError,
    FlushTimeoutError,
    InvalidSizeError,
    MisalignedError,
    OutOfRangeError,
    ShrinkRefusedError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    StaleEpochError,
    TransferTooLargeError,
    VolumeClosedError,
    VolumeFailedError,
    WalFullTimeoutError,
    WalTruncatedError,
)
from blockyard.fileutil import IOV_MAX

log = logging.getLogger(__name__)

VOLUME_FILE = "volume.blk"
SNAPSHOT_PREFIX = "snap-"
SNAPSHOT_SUFFIX = ".cow"
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
#: Per-record bookkeeping: lsn, kind, block, block_count, payload, epoch, consumed WAL bytes.
_Pending = tuple[int, wal.Kind, int, int, memoryview | None, int, int]
#: Dirty-map entry: (lsn, data) — data None means the block reads as zeros (unmapped).
_DirtyEntry = tuple[int, memoryview | None]


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    name: str
    seq: int
    uuid: uuidlib.UUID
    size_bytes: int
    created_ns: int
    #: Blocks this snapshot's delta holds (what it costs beyond the live volume).
    delta_blocks: int


@dataclass(frozen=True, slots=True)
class WalRecord:
    """One replicable change: what replication ships for "everything after LSN n"."""

    lsn: int
    epoch: int
    kind: wal.Kind
    lba: int
    block_count: int
    data: bytes | None


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


def snapshot_file_name(seq: int) -> str:
    return f"{SNAPSHOT_PREFIX}{seq:08d}{SNAPSHOT_SUFFIX}"


class Volume:
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
        self._seed = wal.seed_for(sb.uuid.bytes)
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
        self._pending: deque[_Pending] = deque()
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
        # Number new records above every LSN still present anywhere in the region, so a stale
        # record from before this crash can never be mistaken for a future one.
        next_lsn = result.max_seen_lsn + 1
        self._file.fdatasync()
        sb = sb.with_(checkpoint_lsn=next_lsn, checkpoint_pos=result.end_pos)
        self._write_superblock(sb)
        self._file.fdatasync()
        self._sb = sb
        self._head = result.end_pos
        self._next_lsn = next_lsn
        self._last_lsn = next_lsn - 1
        self._durable_lsn = next_lsn - 1

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

    # ---- reads ---------------------------------------------------------------------------

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

    def _read_parts(self, start: int, length: int) -> Iterator[bytes | memoryview]:
        """Yield the newest bytes of [start, start+length): WAL overlay over the data region."""
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
                    yield self._file.pread(s - run_start, self._data_offset + run_start)
                data = ent[1]
                if data is None:
                    yield _ZERO_BLOCK[: e - s]
                else:
                    yield data[s - bstart : e - bstart]
                run_start = e
            b += 1
        if end > run_start:
            yield self._file.pread(end - run_start, self._data_offset + run_start)

    def _read_block(self, block: int) -> bytes:
        ent = self._dmap.get(block)
        if ent is not None:
            return _ZERO_BLOCK if ent[1] is None else bytes(ent[1])
        return self._file.pread(BLOCK_SIZE, self._data_offset + (block << _BLOCK_SHIFT))

    # ---- writes --------------------------------------------------------------------------

    def write(
        self, lba: int, data: BytesLike, *, fua: bool = False, epoch: int | None = None
    ) -> None:
        """Log ``data`` at ``lba``. Visible to reads on return; durable on return if ``fua``.

        ``epoch``, when given, must equal the volume's epoch (fencing for replication).
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
            return
        start = lba << _LBA_SHIFT
        with self._lock:
            if self._closed or self._stopping:
                self._check_usable()
            if epoch is not None:
                self._check_epoch(epoch)
            if not (start | length) & (BLOCK_SIZE - 1):
                # The common case: whole blocks. One owned copy of the caller's buffer, which
                # the dirty map and the flusher share until the checkpoint.
                if length <= self._max_payload:
                    self._append(
                        _WRITE,
                        start >> _BLOCK_SHIFT,
                        length >> _BLOCK_SHIFT,
                        memoryview(bytes(data)),
                    )
                else:
                    self._append_blocks(start >> _BLOCK_SHIFT, memoryview(bytes(data)))
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
        if fua:
            self._sync_until(seq)

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
        """Append one record at the WAL head. Caller holds ``_lock``."""
        payload_len = 0 if payload is None else len(payload)
        length = wal.record_bytes(payload_len)
        wal_size = self._wal_size
        tail_room = wal_size - self._head
        need = length if tail_room >= length else length + tail_room
        if self._used + need > wal_size:
            self._wait_space(need)
            tail_room = wal_size - self._head
        lsn = self._next_lsn
        epoch = self._sb.epoch
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
        )
        pad = length - wal.HEADER_BYTES - payload_len
        off = self._wal_offset + self._head
        if payload is None:
            self._file.pwritev([hdr], off)
        elif pad:
            self._file.pwritev([hdr, payload, _PADS[pad]], off)
        else:
            self._file.pwritev([hdr, payload], off)
        consumed = length + self._gap
        self._gap = 0
        self._pending.append((lsn, kind, block, block_count, payload, epoch, consumed))
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
        if self._used >= self._high_water and not self._wake_sent:
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

    def unmap(self, lba: int, block_count: int) -> None:
        """Deallocate blocks; they read as zeros at once and are durable after the next flush.

        Sub-4 KiB edges are zero-written; small whole-block ranges are logged; large ranges
        drain the WAL and punch holes in the data region directly (O(extents), not O(blocks)).
        """
        self._check_range(lba, block_count, cap=False)
        if block_count == 0:
            return
        self._check_usable()
        start = lba << _LBA_SHIFT
        end = (lba + block_count) << _LBA_SHIFT
        first_full = (start + BLOCK_SIZE - 1) >> _BLOCK_SHIFT
        end_full = end >> _BLOCK_SHIFT
        if first_full >= end_full:
            self._write_zero_bytes(start, end)
            return
        if start < first_full << _BLOCK_SHIFT:
            self._write_zero_bytes(start, first_full << _BLOCK_SHIFT)
        if end > end_full << _BLOCK_SHIFT:
            self._write_zero_bytes(end_full << _BLOCK_SHIFT, end)
        if end_full - first_full <= WAL_UNMAP_MAX_BLOCKS:
            with self._lock:
                self._check_usable()
                self._append(wal.Kind.ZERO, first_full, end_full - first_full, None)
        else:
            self._zero_range_direct(first_full, end_full)

    def _write_zero_bytes(self, start: int, end: int) -> None:
        self.write(start >> _LBA_SHIFT, bytes(end - start))

    def write_zeroes(self, lba: int, block_count: int) -> None:
        """Zero a range. Blocks are deallocated: they read as zeros (LBPRZ) and use no space."""
        self.unmap(lba, block_count)

    def write_same(self, lba: int, block_count: int, pattern: BytesLike) -> None:
        """Write one logical block's ``pattern`` to every block of the range."""
        if len(pattern) != LOGICAL_BLOCK_SIZE:
            raise MisalignedError(
                f"write-same pattern must be exactly {LOGICAL_BLOCK_SIZE} bytes, got {len(pattern)}"
            )
        self._check_range(lba, block_count, cap=False)
        if not any(pattern):
            self.write_zeroes(lba, block_count)
            return
        per_chunk = WRITE_SAME_CHUNK_BYTES >> _LBA_SHIFT
        chunk = bytes(pattern) * min(per_chunk, block_count)
        done = 0
        while done < block_count:
            n = min(per_chunk, block_count - done)
            self.write(lba + done, chunk[: n << _LBA_SHIFT])
            done += n

    def _zero_range_direct(self, first: int, end: int) -> None:
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

    # ---- durability ----------------------------------------------------------------------

    def flush(self, timeout_s: float | None = None) -> None:
        """Durability barrier (SYNCHRONIZE CACHE). Concurrent callers share one fdatasync."""
        self._check_usable()
        with self._sync_cv:
            self.stats.flush_calls += 1
        self._sync_until(self._write_seq, timeout_s)

    def _sync_until(self, target: int, timeout_s: float | None = None) -> None:
        """Group commit: the first caller without a sync in flight leads one fdatasync that
        covers everyone who arrived before it started; the rest wait for it.

        When the previous sync was shared (other flushers are active), the leader first waits
        until as many siblings as last time have joined, for at most two syncs' duration
        (capped) — the commit_delay / commit_siblings idea from database group commit. A lone
        flusher never waits.
        """
        timeout = self._flush_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        cv = self._sync_cv
        with cv:
            self._sync_waiters += 1
            if self._sync_delaying:
                cv.notify_all()  # a leader gathering siblings counts arrivals
            try:
                while self._synced_seq < target:
                    if self._offline is not None:
                        self._check_usable()
                    if not self._sync_running:
                        self._lead_sync(cv)
                        continue
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise FlushTimeoutError(
                            f"volume {self._name!r}: flush did not complete within {timeout} s; "
                            "the data directory's device is stalled"
                        )
                    cv.wait(remaining)
            finally:
                self._sync_waiters -= 1

    def _lead_sync(self, cv: threading.Condition) -> None:
        """Run one shared fdatasync. Caller holds ``cv`` and found no sync in flight."""
        self._sync_running = True
        if self._sync_shared:
            # Gather as many siblings as joined last time, for at most about two syncs' time.
            deadline = time.monotonic() + min(2 * self._last_sync_s, GROUP_COMMIT_DELAY_MAX_S)
            self._sync_delaying = True
            while self._sync_waiters - 1 < self._last_joined:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                cv.wait(remaining)
            self._sync_delaying = False
        seq, lsn = self._write_seq, self._last_lsn
        joined = self._sync_waiters - 1
        cv.release()
        synced = False
        started = time.monotonic()
        try:
            self._sync_file()
            synced = True
        finally:
            cv.acquire()
            self._sync_running = False
            if synced:
                self._last_sync_s = time.monotonic() - started
                self._sync_shared = joined > 0 or self._sync_waiters > 1
                self._last_joined = joined
                self.stats.flush_syncs += 1
                self._note_synced(seq, lsn)
            cv.notify_all()

    def _note_synced(self, seq: int, lsn: int) -> None:
        """Record that everything written up to (seq, lsn) is durable. Caller holds _sync_cv."""
        self._synced_seq = max(self._synced_seq, seq)
        self._durable_lsn = max(self._durable_lsn, lsn)

    def _tracked_fdatasync(self) -> None:
        """An fdatasync outside the group-commit path that still advances what is durable."""
        seq, lsn = self._write_seq, self._last_lsn
        self._sync_file()
        self.stats.checkpoint_syncs += 1
        with self._sync_cv:
            self._note_synced(seq, lsn)
            self._sync_cv.notify_all()

    # ---- flusher and checkpoint ----------------------------------------------------------

    def _flusher_main(self) -> None:
        last = time.monotonic()
        while True:
            self._wake.wait(FLUSH_IDLE_INTERVAL_S)
            self._wake.clear()
            self._wake_sent = False
            if self._stopping:
                return
            if not self._pending:
                last = time.monotonic()
                continue
            now = time.monotonic()
            if self._used < self._high_water and now - last < 1.0:
                continue
            last = now
            try:
                self._checkpoint()
            except BlockyardError as exc:
                if self._offline is not None:
                    return
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

    def _checkpoint(self) -> None:
        with self._apply_lock:
            self._checkpoint_locked()

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
            if not self._pending:
                return
            batch = list(self._pending)
            end_pos = self._head
        first, upto = batch[0][0], batch[-1][0]
        images: dict[int, memoryview | None] = {}
        for _lsn, kind, block, count, payload, _epoch, _consumed in batch:
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
        batch: list[_Pending],
        images: dict[int, memoryview | None],
        upto: int,
        sb: sbmod.Superblock,
    ) -> None:
        with self._lock:
            freed = 0
            for _ in batch:
                freed += self._pending.popleft()[6]
            self._used -= freed
            dmap = self._dmap
            for b in images:
                ent = dmap.get(b)
                if ent is not None and ent[0] <= upto:
                    del dmap[b]
            self._sb = sb
            self.stats.checkpoints += 1
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

    # ---- provisioning status -------------------------------------------------------------

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

    def set_epoch(self, epoch: int) -> None:
        """Move the epoch forward (or keep it); durable on return."""
        self._check_usable()
        with self._apply_lock:
            check_epoch_advance(self._name, self._sb.epoch, epoch)
            if epoch == self._sb.epoch:
                return
            self._store_superblock(self._sb.with_(epoch=epoch))

    def set_role(self, role: Role, epoch: int | None = None) -> None:
        """Change role (and optionally epoch) atomically; durable on return."""
        self._check_usable()
        with self._apply_lock:
            new_epoch = self._sb.epoch if epoch is None else epoch
            check_role_transition(self._name, self._sb.role, role, self._sb.epoch, new_epoch)
            if role == self._sb.role and new_epoch == self._sb.epoch:
                return
            self._store_superblock(self._sb.with_(role=role, epoch=new_epoch))

    def _store_superblock(self, sb: sbmod.Superblock) -> None:
        """Persist a superblock change. Caller holds ``_apply_lock``."""
        self._write_superblock(sb)
        self._tracked_fdatasync()
        with self._lock:
            self._sb = sb

    # ---- replication feed ----------------------------------------------------------------

    def wal_records(self, since_lsn: int) -> list[WalRecord]:
        """Every change with LSN > ``since_lsn`` still held in the WAL, in LSN order.

        Raises ``WalTruncatedError`` when some of them were already checkpointed away (the
        caller then needs a full rebuild).
        """
        with self._lock:
            pending = list(self._pending)
            checkpoint = self._sb.checkpoint_lsn
        if since_lsn < checkpoint - 1 and since_lsn < self._last_lsn:
            raise WalTruncatedError(
                f"volume {self._name!r}: records after LSN {since_lsn} are needed but the WAL "
                f"starts at LSN {checkpoint}; rebuild the replica in full"
            )
        out: list[WalRecord] = []
        for lsn, kind, block, count, payload, epoch, _consumed in pending:
            if lsn <= since_lsn:
                continue
            out.append(
                WalRecord(
                    lsn=lsn,
                    epoch=epoch,
                    kind=kind,
                    lba=block * SECTORS_PER_BLOCK,
                    block_count=count * SECTORS_PER_BLOCK,
                    data=None if payload is None else bytes(payload),
                )
            )
        return out

    # ---- snapshots -----------------------------------------------------------------------

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
