"""The missed-write bitmap: which blocks of a volume a replica may not hold (DRBD-style).

One file per (volume, replica) in the volume's directory, ``replica-<id>.bitmap``. A set bit
means "this block changed after ``base_lsn`` and the replica may not have the change". The
primary sets bits when it must release WAL records a replica has not acknowledged (the replica
is disconnected or lagging past the retention bound), and clears them as a resync durably
delivers the blocks. A delta resync sends exactly the set bits; a full rebuild sets every bit
first, so a rebuild is a resync too, and both resume where they stopped after a crash of
either side (the bits still set are the work left).

Granularity: one bit per 4 KiB block while that keeps the bitmap within
:data:`MAX_BITMAP_BYTES` (32 MiB: volumes up to 1 TiB); larger volumes double the blocks per
bit until it fits (a 16 TiB volume: 64 KiB per bit). Coarser bits only resend more.

Layout::

    0       header, one 512-byte sector, CRC32C-checked (magic, version, volume UUID,
            active, base_lsn, grain_blocks, block_count, replica id; at 256 floor_lsn;
            crc)
    4096    page CRC table: one u32 CRC32C per 4 KiB bitmap page (room for the largest bitmap)
    36864   the bitmap, in 4 KiB pages (bit b of byte i = block group i*8+b)

The floor: a bitmap knows only what was released while it existed. ``floor_lsn`` is the LSN up
to which it knows nothing (records at or below it may have been released before this primary
tracked the replica: a primary promoted from replica, or one that did not track the replica
before); every record after it is in the primary's WAL, in the bitmap, or acknowledged by the
replica. A replica whose records agree with the primary's only up to below the floor is
rebuilt in full. Once the replica is in sync the floor drops to 0 (everything up to what it
acknowledged is on it, and everything after is held or marked). A file from before the floor
existed reads floor 0 (the old claim: it knows everything).

Crash safety: bits are persisted (pages, then the CRC table, then ``fdatasync``) before the WAL
space holding the records they stand for is reused. A page whose CRC does not match (torn by a
crash, or rotted) is read as all ones: the replica is sent more, never less.
"""

from __future__ import annotations

import logging
import struct
import threading
import uuid as uuidlib
from collections.abc import Iterator
from typing import Final

import crc32c

from blockyard.engine.fileio import IoFile, VolumeFS
from blockyard.errors import CorruptionError

log = logging.getLogger(__name__)

MAGIC: Final = b"BYBITMP1"
FORMAT_VERSION: Final = 1
#: The most one bitmap takes on disk and in memory.
MAX_BITMAP_BYTES: Final = 32 << 20
PAGE_BYTES: Final = 4096
_HEADER_BYTES: Final = 512
_CRC_TABLE_OFFSET: Final = 4096
#: Longest replica id stored (ids are addresses or names).
MAX_REPLICA_ID_BYTES: Final = 200
_HDR = struct.Struct("<8sI16sB3xQIQH200s")
#: floor_lsn, after the fields above (older files hold zeros there: floor 0).
_FLOOR = struct.Struct("<Q")
_FLOOR_AT: Final = 256
#: The floor of a bitmap whose real floor is not written yet: "knows nothing", so a crash
#: before it is makes that replica rebuild in full.
UNKNOWN_FLOOR: Final = (1 << 63) - 1
_HDR_CRC_AT: Final = _HEADER_BYTES - 4
_ALL_ONES_PAGE: Final = b"\xff" * PAGE_BYTES
#: The CRC table has room for the largest bitmap, so pages never move when the volume grows.
_DATA_OFFSET: Final = _CRC_TABLE_OFFSET + (MAX_BITMAP_BYTES // PAGE_BYTES) * 4
#: More blocks than the largest volume has (16 TiB of 4 KiB blocks): a bound on the header.
_MAX_BLOCKS: Final = 1 << 32


BITMAP_PREFIX: Final = "replica-"
BITMAP_SUFFIX: Final = ".bitmap"


def bitmap_file_name(replica_id: str) -> str:
    """File name for ``replica_id``: readable, and safe whatever characters the id holds."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in replica_id)[:64]
    digest = f"{crc32c.crc32c(replica_id.encode()):08x}"
    return f"{BITMAP_PREFIX}{safe}-{digest}{BITMAP_SUFFIX}"


def grain_for(block_count: int) -> int:
    """Blocks per bit: 1 while the bitmap fits :data:`MAX_BITMAP_BYTES`, else a power of two."""
    grain = 1
    while (block_count + grain - 1) // grain > MAX_BITMAP_BYTES * 8:
        grain *= 2
    return grain


class MissedBitmap:
    """One replica's bitmap. Thread-safe (one lock); :meth:`persist` does I/O."""

    def __init__(
        self,
        file: IoFile,
        *,
        volume: str,
        volume_uuid: uuidlib.UUID,
        replica_id: str,
        block_count: int,
    ) -> None:
        self._file = file
        self._volume = volume
        self._uuid = volume_uuid
        self.replica_id = replica_id
        self._lock = threading.Lock()
        self.grain = grain_for(block_count)
        self.block_count = block_count
        self._bits = bytearray(self._bytes_for(block_count))
        self._dirty_pages: set[int] = set()
        self._header_dirty = True
        #: During a resync pass: bits marked again after the pass began (their blocks changed
        #: again and may not reach the replica by the pass): progress must not clear them.
        self._remarked: bytearray | None = None
        self.active = False
        self.base_lsn = 0
        #: See the module docstring.
        self.floor_lsn = 0
        #: This process created the file (it did not exist).
        self.created = False
        self._set_count = 0

    def _bytes_for(self, block_count: int, grain: int | None = None) -> int:
        grain = self.grain if grain is None else grain
        groups = (block_count + grain - 1) // grain
        nbytes = (groups + 7) // 8
        return max(PAGE_BYTES, (nbytes + PAGE_BYTES - 1) // PAGE_BYTES * PAGE_BYTES)

    # ---- open / create --------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        fs: VolumeFS,
        directory: str,
        *,
        volume: str,
        volume_uuid: uuidlib.UUID,
        replica_id: str,
        block_count: int,
        floor_lsn: int = UNKNOWN_FLOOR,
    ) -> MissedBitmap:
        """Load the replica's bitmap, or create an inactive one with ``floor_lsn``."""
        if len(replica_id.encode()) > MAX_REPLICA_ID_BYTES or not replica_id:
            raise ValueError(f"replica id must be 1..{MAX_REPLICA_ID_BYTES} bytes")
        path = f"{directory}/{bitmap_file_name(replica_id)}"
        exists = fs.exists(path)
        f = fs.open(path, create=not exists)
        try:
            bm = cls(
                f,
                volume=volume,
                volume_uuid=volume_uuid,
                replica_id=replica_id,
                block_count=block_count,
            )
            if exists:
                bm._load()
            else:
                bm.created = True
                bm.floor_lsn = floor_lsn
                # Every page gets its CRC now; an unwritten page would read as damaged.
                bm._dirty_pages = set(range(len(bm._bits) // PAGE_BYTES))
                bm.persist()
        except BaseException:
            f.close()
            raise
        return bm

    def _corrupt(self, what: str) -> CorruptionError:
        return CorruptionError(
            f"missed-write bitmap for replica {self.replica_id!r} {what}; delete the file to "
            "make that replica rebuild in full",
            volume=self._volume,
            path=self._file.path,
            offset=0,
        )

    def _load(self) -> None:
        raw = self._file.pread(_HEADER_BYTES, 0)
        (stored,) = struct.unpack_from("<I", raw, _HDR_CRC_AT)
        if raw[:8] != MAGIC or crc32c.crc32c(raw[:_HDR_CRC_AT]) != stored:
            raise self._corrupt("has a damaged header")
        (_m, version, uuid_raw, active, base_lsn, grain, block_count, id_len, id_raw) = (
            _HDR.unpack_from(raw, 0)
        )
        if version != FORMAT_VERSION or uuid_raw != self._uuid.bytes:
            raise self._corrupt("belongs to another volume or format")
        if id_len > MAX_REPLICA_ID_BYTES or bytes(id_raw[:id_len]) != self.replica_id.encode():
            raise self._corrupt("names another replica")
        if grain < 1 or grain & (grain - 1) or not 0 < block_count <= _MAX_BLOCKS:
            raise self._corrupt("has invalid geometry")
        stored_bytes = self._bytes_for(block_count, grain)
        if stored_bytes > MAX_BITMAP_BYTES:
            raise self._corrupt("is larger than any bitmap this build writes")
        self.active = bool(active)
        self.base_lsn = base_lsn
        (self.floor_lsn,) = _FLOOR.unpack_from(raw, _FLOOR_AT)
        stored_grain, stored_blocks = grain, block_count
        pages = stored_bytes // PAGE_BYTES
        table = self._file.pread(pages * 4, _CRC_TABLE_OFFSET)
        old = bytearray(stored_bytes)
        bad = 0
        for p in range(pages):
            page = self._file.pread(PAGE_BYTES, _DATA_OFFSET + p * PAGE_BYTES)
            (want,) = struct.unpack_from("<I", table, p * 4)
            if crc32c.crc32c(page) != want:
                # Torn by a crash or rotted: resend everything the page covers.
                page = _ALL_ONES_PAGE
                bad += 1
            old[p * PAGE_BYTES : (p + 1) * PAGE_BYTES] = page
        if bad and self.active:
            log.warning(
                "volume %s: %d pages of replica %s's missed-write bitmap failed their "
                "checksum; resending every block they cover",
                self._volume,
                bad,
                self.replica_id,
            )
        # Carry the stored bits over to the current geometry (the volume may have grown).
        if stored_grain == self.grain and stored_blocks <= self.block_count:
            self._bits[: len(old)] = old
        else:
            for group in _iter_set(old, (stored_blocks + stored_grain - 1) // stored_grain):
                first = group * stored_grain
                self._set_blocks_locked(first, min(stored_grain, self.block_count - first))
        self._set_count = sum(bin(b).count("1") for b in self._bits) if self.active else 0
        if not self.active:
            self._bits[:] = bytes(len(self._bits))
        self._dirty_pages = set(range(len(self._bits) // PAGE_BYTES))
        self._header_dirty = True

    # ---- bits -----------------------------------------------------------------------------

    def activate(self, base_lsn: int) -> None:
        """Start recording: the replica holds every change up to ``base_lsn``. A no-op when
        already active (the older base stays: the bits cover everything since it)."""
        with self._lock:
            if self.active:
                return
            self.active = True
            self.base_lsn = base_lsn
            self._header_dirty = True

    def mark(self, block: int, count: int) -> None:
        """Record that blocks ``[block, block+count)`` changed (activates if needed is the
        caller's business: marks on an inactive bitmap are kept)."""
        if count <= 0:
            return
        with self._lock:
            self._set_blocks_locked(block, count)
            if self._remarked is not None:
                self._set_remarked_locked(block, count)

    def _set_remarked_locked(self, block: int, count: int) -> None:
        remarked = self._remarked
        assert remarked is not None
        end = min(block + count, self.block_count)
        for g in range(block // self.grain, (end - 1) // self.grain + 1 if end > block else 0):
            remarked[g >> 3] |= 1 << (g & 7)

    def begin_pass(self) -> None:
        """A resync pass starts: from now on a mark also protects its bits from
        :meth:`clear_pass` (see there)."""
        with self._lock:
            self._remarked = bytearray(len(self._bits))

    def end_pass(self) -> None:
        with self._lock:
            self._remarked = None

    def clear_pass(self, block: int, count: int) -> int:
        """Like :meth:`clear` for what a resync pass delivered: bits marked again since the
        pass began stay set (the replica may not hold those changes yet; the next pass sends
        them). Returns how many blocks were cleared."""
        with self._lock:
            remarked = self._remarked
            if remarked is None:
                return self._clear_locked(block, count, None)
            return self._clear_locked(block, count, remarked)

    def set_floor(self, lsn: int) -> None:
        """What the bitmap knows nothing about now ends at ``lsn`` (see the module
        docstring); persisted with the next :meth:`persist`."""
        with self._lock:
            if lsn != self.floor_lsn:
                self.floor_lsn = lsn
                self._header_dirty = True

    def mark_all(self) -> None:
        """Every block: a full rebuild."""
        with self._lock:
            self._set_blocks_locked(0, self.block_count)
            if self._remarked is not None:
                self._set_remarked_locked(0, self.block_count)

    def _set_blocks_locked(self, block: int, count: int) -> None:
        end = min(block + count, self.block_count)
        if block >= end:
            return
        g0, g1 = block // self.grain, (end - 1) // self.grain
        bits = self._bits
        for g in range(g0, g1 + 1):
            i, m = g >> 3, 1 << (g & 7)
            if not bits[i] & m:
                bits[i] |= m
                self._set_count += 1
                self._dirty_pages.add(i // PAGE_BYTES)

    def clear(self, block: int, count: int) -> int:
        """The replica durably holds blocks ``[block, block+count)`` as of now. Only whole bit
        groups inside the range are cleared. Returns how many blocks were cleared."""
        with self._lock:
            return self._clear_locked(block, count, None)

    def _clear_locked(self, block: int, count: int, keep: bytearray | None) -> int:
        cleared = 0
        end = min(block + count, self.block_count)
        g0 = (block + self.grain - 1) // self.grain
        g1 = end // self.grain if end < self.block_count else (end + self.grain - 1) // self.grain
        bits = self._bits
        for g in range(g0, g1):
            i, m = g >> 3, 1 << (g & 7)
            if bits[i] & m and not (keep is not None and keep[i] & m):
                bits[i] &= ~m
                self._set_count -= 1
                self._dirty_pages.add(i // PAGE_BYTES)
                cleared += self.grain
        return cleared

    def deactivate(self) -> None:
        """The replica is in sync again: nothing is missing."""
        with self._lock:
            if any(self._bits):
                self._dirty_pages.update(
                    p
                    for p in range(len(self._bits) // PAGE_BYTES)
                    if any(self._bits[p * PAGE_BYTES : (p + 1) * PAGE_BYTES])
                )
                self._bits[:] = bytes(len(self._bits))
            self._set_count = 0
            self.active = False
            self.base_lsn = 0
            self._header_dirty = True

    @property
    def set_blocks(self) -> int:
        """Blocks covered by set bits (an upper bound on what a resync sends)."""
        return self._set_count * self.grain

    def runs(self, start_block: int = 0) -> Iterator[tuple[int, int]]:
        """Runs ``(block, count)`` of set bits from ``start_block`` on, in block units, in
        order. Reads a consistent-enough view: bits set while iterating may be missed (their
        changes are shipped live) and bits cleared may still be yielded (resent, harmless)."""
        groups = (self.block_count + self.grain - 1) // self.grain
        g = start_block // self.grain
        bits = self._bits
        while g < groups:
            i = g >> 3
            if not bits[i] and not g & 7:
                # Skip empty bytes quickly; bytes.find on a bytearray slice would copy.
                j = i
                while j < len(bits) and not bits[j]:
                    j += 1
                g = j << 3
                continue
            if bits[i] & (1 << (g & 7)):
                first = g
                while g < groups and bits[g >> 3] & (1 << (g & 7)):
                    g += 1
                block = first * self.grain
                yield block, min(g * self.grain, self.block_count) - block
            else:
                g += 1

    def resize(self, block_count: int) -> None:
        """The volume grew: cover the new blocks (unset). The grain grows if it must, each new
        bit covering whatever its old bits did."""
        with self._lock:
            if block_count <= self.block_count:
                return
            grain = grain_for(block_count)
            if grain != self.grain:
                old, old_grain = self._bits, self.grain
                groups = (self.block_count + old_grain - 1) // old_grain
                self.grain = grain
                self._bits = bytearray(self._bytes_for(block_count))
                self._set_count = 0
                for g in _iter_set(old, groups):
                    self._set_blocks_locked(g * old_grain, old_grain)
            else:
                need = self._bytes_for(block_count)
                if need > len(self._bits):
                    self._bits.extend(bytes(need - len(self._bits)))
            self._dirty_pages.update(range(len(self._bits) // PAGE_BYTES))
            self.block_count = block_count
            self._header_dirty = True

    # ---- persistence ----------------------------------------------------------------------

    def _encode_header(self) -> bytes:
        rid = self.replica_id.encode()
        buf = bytearray(_HEADER_BYTES)
        _HDR.pack_into(
            buf,
            0,
            MAGIC,
            FORMAT_VERSION,
            self._uuid.bytes,
            int(self.active),
            self.base_lsn,
            self.grain,
            self.block_count,
            len(rid),
            rid,
        )
        _FLOOR.pack_into(buf, _FLOOR_AT, self.floor_lsn)
        struct.pack_into("<I", buf, _HDR_CRC_AT, crc32c.crc32c(bytes(buf[:_HDR_CRC_AT])))
        return bytes(buf)

    def persist(self) -> None:
        """Write changed pages, their CRCs and the header, then ``fdatasync``. Durable on
        return; raises the file layer's errors (the caller must not release WAL space then)."""
        with self._lock:
            pages = sorted(self._dirty_pages)
            images = [(p, bytes(self._bits[p * PAGE_BYTES : (p + 1) * PAGE_BYTES])) for p in pages]
            header = self._encode_header() if self._header_dirty else None
            self._dirty_pages.clear()
            self._header_dirty = False
        try:
            for p, img in images:
                self._file.pwrite(img, _DATA_OFFSET + p * PAGE_BYTES)
                self._file.pwrite(struct.pack("<I", crc32c.crc32c(img)), _CRC_TABLE_OFFSET + p * 4)
            if header is not None:
                self._file.pwrite(header, 0)
            self._file.fdatasync()
        except BaseException:
            with self._lock:
                self._dirty_pages.update(p for p, _ in images)
                self._header_dirty = self._header_dirty or header is not None
            raise

    def close(self) -> None:
        self._file.close()

    @property
    def path(self) -> str:
        return self._file.path


def _iter_set(bits: bytes | bytearray, groups: int) -> Iterator[int]:
    for i, byte in enumerate(bits):
        if not byte:
            continue
        for b in range(8):
            g = i * 8 + b
            if g < groups and byte & (1 << b):
                yield g
