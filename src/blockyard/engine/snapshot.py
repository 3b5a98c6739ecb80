"""Snapshot delta files: the copy-on-write store of blocks a snapshot must keep.

A snapshot is O(1) to create: an empty delta file. Before the flusher overwrites (or punches) a
data-region block for the first time after the newest snapshot, it copies the old block into
that snapshot's delta. Reading snapshot *S* at block *b* takes the first delta holding *b* among
*S* and every newer snapshot, else the live data region.

File layout: a 512-byte header sector (padded to 4 KiB), then fixed-size entries of one 512-byte
header sector plus one 4 KiB data block::

    header: magic 8s "BLKYSNP1", version u32, seq u64, volume uuid 16s, snapshot uuid 16s,
            size_bytes u64, created_ns u64, name_len u16, name 256s, crc32c u32 at 508
    entry:  magic u32, crc32c u32 (over entry header[8:512] — includes data_crc), block u64,
            synced_count u64, flags u32 (ZERO: the block was all zeros, no data stored),
            data_crc u32

Ordering is what makes it crash-safe: entries are fdatasync'ed before the data-region block
they preserve is overwritten. A torn entry at the tail belongs to a batch whose overwrites never
happened, so it is dropped; a damaged entry that a later entry's ``synced_count`` shows was
durable is corruption and is reported.
"""

from __future__ import annotations

import struct
import threading
import uuid as uuidlib
from dataclasses import dataclass

import crc32c

from blockyard.engine.fileio import IoFile
from blockyard.engine.limits import BLOCK_SIZE, SECTOR_SIZE
from blockyard.errors import CorruptionError

MAGIC = b"BLKYSNP1"
FORMAT_VERSION = 1
ENTRY_MAGIC = 0x31504E53
HEADER_AREA_BYTES = 4096
ENTRY_BYTES = SECTOR_SIZE + BLOCK_SIZE
FLAG_ZERO = 1

_HDR = struct.Struct("<8sIQ16s16sQQH256s")
_ENTRY = struct.Struct("<IIQQII")
_HDR_CRC_AT = SECTOR_SIZE - 4
_ZERO_BLOCK = bytes(BLOCK_SIZE)


@dataclass(frozen=True, slots=True)
class SnapshotHeader:
    seq: int
    volume_uuid: uuidlib.UUID
    snapshot_uuid: uuidlib.UUID
    name: str
    size_bytes: int
    created_ns: int

    def encode(self) -> bytes:
        buf = bytearray(HEADER_AREA_BYTES)
        name = self.name.encode()
        _HDR.pack_into(
            buf,
            0,
            MAGIC,
            FORMAT_VERSION,
            self.seq,
            self.volume_uuid.bytes,
            self.snapshot_uuid.bytes,
            self.size_bytes,
            self.created_ns,
            len(name),
            name,
        )
        struct.pack_into("<I", buf, _HDR_CRC_AT, crc32c.crc32c(bytes(buf[:_HDR_CRC_AT])))
        return bytes(buf)


class DeltaFile:
    """One snapshot's delta. Thread-safety: the owning volume serialises all access through its
    apply lock; the in-memory index is only read under that lock."""

    def __init__(self, file: IoFile, header: SnapshotHeader, volume: str) -> None:
        self.file = file
        self.header = header
        self._volume = volume
        self._index: dict[int, int] = {}
        self._zero: set[int] = set()
        self._count = 0
        self._synced_count = 0
        self._lock = threading.Lock()

    @property
    def block_count(self) -> int:
        """Blocks preserved in this delta."""
        return self._count

    @classmethod
    def create(cls, file: IoFile, header: SnapshotHeader, volume: str) -> DeltaFile:
        file.pwritev([header.encode()], 0)
        file.fdatasync()
        return cls(file, header, volume)

    @classmethod
    def load(cls, file: IoFile, volume: str) -> DeltaFile:
        raw = file.pread(HEADER_AREA_BYTES, 0)
        header = _decode_header(raw, path=file.path, volume=volume)
        delta = cls(file, header, volume)
        delta._scan()
        return delta

    def _corrupt(self, what: str, offset: int) -> CorruptionError:
        return CorruptionError(
            f"snapshot {self.header.name!r} delta {what}; the snapshot cannot be trusted — "
            "delete it and take a new one",
            volume=self._volume,
            path=self.file.path,
            offset=offset,
        )

    def _scan(self) -> None:
        size = self.file.size()
        n = max(0, (size - HEADER_AREA_BYTES) // ENTRY_BYTES)
        first_bad = -1
        max_synced = 0
        entries: list[tuple[int, int, int]] = []
        for i in range(n):
            off = HEADER_AREA_BYTES + i * ENTRY_BYTES
            raw = self.file.pread(SECTOR_SIZE, off)
            entry = self._parse_entry(raw)
            if entry is None:
                if first_bad < 0:
                    first_bad = i
                continue
            block, synced, flags = entry
            max_synced = max(max_synced, synced)
            if first_bad >= 0:
                if synced > first_bad:
                    raise self._corrupt(
                        f"entry {first_bad} is damaged but entry {i} shows it was durable",
                        HEADER_AREA_BYTES + first_bad * ENTRY_BYTES,
                    )
                continue
            entries.append((block, i, flags))
        # Entries past the last proven-durable count may be torn inside their data block (the
        # header sector landed, the data did not): check those data checksums now.
        end = first_bad if first_bad >= 0 else n
        for i in range(min(max_synced, end), end):
            if not self._data_ok(i):
                end = i
                break
        for block, i, flags in entries:
            if i < end:
                self._add(block, i, flags)
        self._count = end
        self._synced_count = end
        if end < n:
            # Drop the torn tail: those copies were never durable, so nothing they would have
            # preserved was overwritten yet.
            self.file.truncate(HEADER_AREA_BYTES + end * ENTRY_BYTES)
            self.file.fdatasync()

    def _data_ok(self, index: int) -> bool:
        off = HEADER_AREA_BYTES + index * ENTRY_BYTES
        raw = self.file.pread(ENTRY_BYTES, off)
        _m, _c, _b, _s, flags, data_crc = _ENTRY.unpack_from(raw, 0)
        if flags & FLAG_ZERO:
            return True
        return bool(crc32c.crc32c(raw[SECTOR_SIZE:]) == data_crc)

    def _parse_entry(self, raw: bytes) -> tuple[int, int, int] | None:
        magic, crc, block, synced, flags, _data_crc = _ENTRY.unpack_from(raw, 0)
        if magic != ENTRY_MAGIC or crc32c.crc32c(raw[8:SECTOR_SIZE]) != crc:
            return None
        if block * BLOCK_SIZE >= self.header.size_bytes:
            return None
        return block, synced, flags

    def _add(self, block: int, index: int, flags: int) -> None:
        if block in self._index:
            return
        self._index[block] = index
        if flags & FLAG_ZERO:
            self._zero.add(block)

    def has(self, block: int) -> bool:
        return block in self._index

    def blocks(self) -> list[int]:
        return list(self._index)

    def append(self, items: list[tuple[int, bytes]]) -> None:
        """Preserve old block images; durable when this returns. Blocks already held are skipped
        (replay after a crash re-offers them)."""
        with self._lock:
            bufs: list[bytes] = []
            start = self._count
            added: list[tuple[int, int, int]] = []
            for block, data in items:
                if block in self._index:
                    continue
                zero = data == _ZERO_BLOCK
                flags = FLAG_ZERO if zero else 0
                data_crc = 0 if zero else crc32c.crc32c(data)
                hdr = bytearray(SECTOR_SIZE)
                _ENTRY.pack_into(hdr, 0, ENTRY_MAGIC, 0, block, self._synced_count, flags, data_crc)
                struct.pack_into("<I", hdr, 4, crc32c.crc32c(bytes(hdr[8:])))
                bufs.append(bytes(hdr))
                bufs.append(_ZERO_BLOCK if zero else data)
                added.append((block, start + len(added), flags))
            if not added:
                return
            off = HEADER_AREA_BYTES + start * ENTRY_BYTES
            for i in range(0, len(bufs), 1024):
                chunk = bufs[i : i + 1024]
                self.file.pwritev(chunk, off)
                off += sum(len(b) for b in chunk)
            self.file.fdatasync()
            for block, index, flags in added:
                self._add(block, index, flags)
            self._count = start + len(added)
            self._synced_count = self._count

    def read_block(self, block: int) -> bytes:
        index = self._index[block]
        if block in self._zero:
            return _ZERO_BLOCK
        off = HEADER_AREA_BYTES + index * ENTRY_BYTES
        raw = self.file.pread(ENTRY_BYTES, off)
        _m, _c, _b, _s, _f, data_crc = _ENTRY.unpack_from(raw, 0)
        data = raw[SECTOR_SIZE:]
        if crc32c.crc32c(data) != data_crc:
            raise self._corrupt(f"block {block} fails its checksum", off + SECTOR_SIZE)
        return data

    def close(self) -> None:
        self.file.close()


def _decode_header(raw: bytes, *, path: str, volume: str) -> SnapshotHeader:
    def corrupt(what: str, offset: int = 0) -> CorruptionError:
        return CorruptionError(
            f"snapshot header {what}; delete the snapshot file or restore it from a backup",
            volume=volume,
            path=path,
            offset=offset,
        )

    if len(raw) < SECTOR_SIZE or raw[:8] != MAGIC:
        raise corrupt("has a bad magic")
    (stored,) = struct.unpack_from("<I", raw, _HDR_CRC_AT)
    if crc32c.crc32c(raw[:_HDR_CRC_AT]) != stored:
        raise corrupt("fails its checksum", _HDR_CRC_AT)
    (_m, version, seq, vol_uuid, snap_uuid, size_bytes, created_ns, name_len, name_raw) = (
        _HDR.unpack_from(raw, 0)
    )
    if version != FORMAT_VERSION:
        raise corrupt(f"has format version {version}", 8)
    if name_len > len(name_raw) or size_bytes % BLOCK_SIZE:
        raise corrupt("has invalid fields", 12)
    try:
        name = bytes(name_raw[:name_len]).decode()
    except UnicodeDecodeError:
        raise corrupt("has a name that is not UTF-8") from None
    return SnapshotHeader(
        seq=seq,
        volume_uuid=uuidlib.UUID(bytes=vol_uuid),
        snapshot_uuid=uuidlib.UUID(bytes=snap_uuid),
        name=name,
        size_bytes=size_bytes,
        created_ns=created_ns,
    )
