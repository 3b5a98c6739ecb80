"""Write-ahead log records and their recovery scan.

The WAL is a circular region of ``wal_size`` bytes. A record is a 64-byte header followed by its
payload, padded to a whole number of 512-byte sectors, and never straddles the region's end: a
``WRAP`` marker sends the reader back to position 0.

Header layout (little-endian)::

    0  magic         u32  0x3157_4C42 ("BLW1")
    4  crc32c        u32  over header[8:64] + payload, seeded with the volume's seed
    8  kind          u8   WRITE / ZERO / WRAP
    9  flags         u8
    10 reserved      u16
    12 payload_len   u32
    16 lsn           u64
    24 epoch         u64
    32 durable_hint  u64  every LSN ≤ this was on stable storage when the record was written
    40 block         u64  first physical (4 KiB) block
    48 block_count   u32
    52 header_crc    u32  crc32c over header[8:52], seeded: the header alone is genuine
    56 generation    u32  the primary incarnation that wrote the record (0 before replication)
    60 reserved      4x

The checksum seed is derived from the volume UUID and the superblock's WAL salt, so a volume
image stored *inside* another volume can never be mistaken for the outer volume's records, and
changing the salt (a replica whose log is replaced, see ``Volume.reset_log``) makes every record
of the old log invisible at once.

``epoch`` and ``generation`` together name the history segment a record belongs to: the epoch
changes when the master promotes a new primary, the generation (a random non-zero u32) each
time a primary opens or is promoted. Replicas store the primary's records with both unchanged,
so "record n of segment (epoch, generation)" means the same bytes on every copy.

A record's header is checked on its own too: a header that passes ``header_crc`` was written
by this volume even if its payload was torn. Recovery restarts LSN numbering above every such
header, so the remains of a torn record can never be completed by a later record's pieces into
something that looks valid.

``durable_hint`` is how recovery tells a torn tail from real damage: a record that fails its
checksum is the end of the log, unless a later intact record says it was already durable — then
the bytes rotted after they were synced, and that is reported as corruption.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import crc32c

from blockyard.engine.fileio import IoFile
from blockyard.engine.limits import BLOCK_SIZE, SECTOR_SIZE
from blockyard.errors import CorruptionError

MAGIC = 0x31574C42
HEADER_BYTES = 64
HEADER = struct.Struct("<IIBBHIQQQQIII4x")
assert HEADER.size == HEADER_BYTES
#: Header bytes covered by the checksum (everything after magic and crc).
_CRC_FROM = 8
_HEADER_CRC_AT = 52
#: Reading the WAL for recovery happens in chunks of this size (bounded memory).
SCAN_CHUNK_BYTES = 4 << 20


class Kind(enum.IntEnum):
    WRITE = 1
    ZERO = 2
    WRAP = 3


@dataclass(frozen=True, slots=True)
class RecordHeader:
    kind: Kind
    payload_len: int
    lsn: int
    epoch: int
    durable_hint: int
    block: int
    block_count: int
    generation: int = 0


def seed_for(volume_uuid: bytes, salt: int = 0) -> int:
    """The checksum seed of a volume's WAL records. Salt 0 keeps the seed of volumes made
    before salts existed."""
    if salt == 0:
        return int(crc32c.crc32c(volume_uuid))
    return int(crc32c.crc32c(volume_uuid + salt.to_bytes(4, "little")))


def record_bytes(payload_len: int) -> int:
    """On-disk length of a record: header + payload rounded up to whole sectors."""
    n = HEADER_BYTES + payload_len
    return (n + SECTOR_SIZE - 1) // SECTOR_SIZE * SECTOR_SIZE


_U32 = struct.Struct("<I")
_pack_header_fields = HEADER.pack_into
_pack_u32 = _U32.pack_into
_crc = crc32c.crc32c


def pack_header(
    buf: bytearray,
    seed: int,
    kind: Kind,
    lsn: int,
    epoch: int,
    durable_hint: int,
    block: int,
    block_count: int,
    payload: bytes | memoryview | None,
    view: memoryview | None = None,
    generation: int = 0,
) -> None:
    """Fill ``buf`` (64 bytes, reused by the caller) with a checksummed header.

    Hot path: ``view`` is the caller's cached ``memoryview(buf)``, so nothing is allocated.
    """
    if view is None:
        view = memoryview(buf)
    payload_len = len(payload) if payload is not None else 0
    _pack_header_fields(
        buf,
        0,
        MAGIC,
        0,
        kind,
        0,
        0,
        payload_len,
        lsn,
        epoch,
        durable_hint,
        block,
        block_count,
        0,
        generation,
    )
    _pack_u32(buf, _HEADER_CRC_AT, _crc(view[_CRC_FROM:_HEADER_CRC_AT], seed))
    crc = _crc(view[_CRC_FROM:], seed)
    if payload is not None:
        crc = _crc(payload, crc)
    _pack_u32(buf, 4, crc)


def header_ok(raw: bytes | memoryview, seed: int) -> bool:
    """Whether the header alone is one this volume wrote (payload not checked)."""
    (stored,) = struct.unpack_from("<I", raw, _HEADER_CRC_AT)
    return bool(crc32c.crc32c(memoryview(raw)[_CRC_FROM:_HEADER_CRC_AT], seed) == stored)


def parse_header(raw: bytes | memoryview, wal_size: int, block_limit: int) -> RecordHeader | None:
    """Structure-check a header (not its checksum). None when it cannot be a record of ours."""
    (magic, _crc, kind, _flags, _r, payload_len, lsn, epoch, hint, block, count, _hcrc, gen) = (
        HEADER.unpack_from(raw, 0)
    )
    if magic != MAGIC or kind not in Kind._value2member_map_:
        return None
    k = Kind(kind)
    if k is Kind.WRITE:
        if payload_len != count * BLOCK_SIZE or count == 0:
            return None
    elif payload_len != 0:
        return None
    if k is not Kind.WRAP and (count == 0 or block + count > block_limit):
        return None
    if record_bytes(payload_len) > wal_size:
        return None
    return RecordHeader(k, payload_len, lsn, epoch, hint, block, count, gen)


def checksum_ok(raw_header: bytes | memoryview, payload: bytes | memoryview, seed: int) -> bool:
    (stored,) = struct.unpack_from("<I", raw_header, 4)
    crc = crc32c.crc32c(memoryview(raw_header)[_CRC_FROM:HEADER_BYTES], seed)
    if len(payload):
        crc = crc32c.crc32c(payload, crc)
    return bool(crc == stored)


@dataclass(frozen=True, slots=True)
class ReplayedRecord:
    header: RecordHeader
    pos: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class ScanResult:
    records: list[ReplayedRecord]
    #: Where the log ends: the next record goes here.
    end_pos: int
    #: The LSN the next record would have had.
    end_lsn: int
    #: The highest LSN of any intact record anywhere in the region (old laps included).
    max_seen_lsn: int
    #: LSN -> WAL position of every genuine header at or below the end of the log, anywhere in
    #: the region: records already checkpointed but still physically present, which a
    #: returning replica may still be sent (payloads are checksummed when read).
    genuine: dict[int, int] = field(default_factory=dict)


class WalScanner:
    """Recovery: replay from the checkpoint, then check the rest of the region for damage."""

    def __init__(
        self,
        file: IoFile,
        *,
        volume: str,
        wal_offset: int,
        wal_size: int,
        seed: int,
        block_limit: int,
    ) -> None:
        self._file = file
        self._volume = volume
        self._wal_offset = wal_offset
        self._wal_size = wal_size
        self._seed = seed
        self._block_limit = block_limit

    def _read(self, pos: int, length: int) -> bytes:
        return self._file.pread(length, self._wal_offset + pos)

    def _record_at(self, pos: int) -> tuple[RecordHeader, bytes] | None:
        if pos + HEADER_BYTES > self._wal_size:
            return None
        raw = self._read(pos, HEADER_BYTES)
        hdr = parse_header(raw, self._wal_size, self._block_limit)
        if hdr is None:
            return None
        if pos + record_bytes(hdr.payload_len) > self._wal_size:
            return None
        payload = self._read(pos + HEADER_BYTES, hdr.payload_len) if hdr.payload_len else b""
        if not checksum_ok(raw, payload, self._seed):
            return None
        return hdr, payload

    def scan(self, checkpoint_lsn: int, checkpoint_pos: int) -> ScanResult:
        records: list[ReplayedRecord] = []
        pos, expected = checkpoint_pos, checkpoint_lsn
        consumed = 0
        # A valid log from the checkpoint never holds more than one region's worth of bytes.
        while consumed < self._wal_size:
            found = self._record_at(pos)
            if found is None or found[0].lsn != expected:
                break
            hdr, payload = found
            if hdr.kind is Kind.WRAP:
                if pos == 0:
                    break
                consumed += self._wal_size - pos
                pos = 0
                continue
            records.append(ReplayedRecord(hdr, pos, payload))
            length = record_bytes(hdr.payload_len)
            consumed += length
            pos = (pos + length) % self._wal_size
            expected += 1
        genuine: dict[int, int] = {}
        max_seen = self._check_rest(pos, expected, genuine)
        for rec in records:
            genuine[rec.header.lsn] = rec.pos
        return ScanResult(records, pos, expected, max(max_seen, expected - 1), genuine)

    def records_after(self, after_lsn: int, last_lsn: int) -> set[tuple[int, int]] | None:
        """The (block, block_count) of every intact WRITE/ZERO record with an LSN in
        ``(after_lsn, last_lsn]`` anywhere in the region; None unless every one of those LSNs
        was found intact."""
        runs: set[tuple[int, int]] = set()
        seen: set[int] = set()
        for pos in self._candidates():
            found = self._record_at(pos)
            if found is None:
                continue
            hdr, _payload = found
            if hdr.kind is Kind.WRAP or not after_lsn < hdr.lsn <= last_lsn:
                continue
            seen.add(hdr.lsn)
            runs.add((hdr.block, hdr.block_count))
        if len(seen) != last_lsn - after_lsn:
            return None
        return runs

    def _candidates(self) -> Iterator[int]:
        """Every sector-aligned position whose first bytes carry our magic."""
        magic = struct.pack("<I", MAGIC)
        for chunk_start in range(0, self._wal_size, SCAN_CHUNK_BYTES):
            chunk = self._read(chunk_start, min(SCAN_CHUNK_BYTES, self._wal_size - chunk_start))
            i = chunk.find(magic)
            while i != -1:
                if i % SECTOR_SIZE == 0:
                    yield chunk_start + i
                    i = chunk.find(magic, i + SECTOR_SIZE)
                else:
                    i = chunk.find(magic, i + SECTOR_SIZE - i % SECTOR_SIZE)

    def _check_rest(self, stop_pos: int, stop_lsn: int, genuine: dict[int, int]) -> int:
        """Raise if an intact later record proves the record at ``stop_pos`` was durable.

        Returns the highest LSN of any genuine header in the region, so the caller can restart
        numbering above every stale record that might still sit in the region. Fills
        ``genuine`` with the position of every genuine WRITE/ZERO header below ``stop_lsn``.
        """
        max_seen = 0
        for pos in self._candidates():
            if pos + HEADER_BYTES > self._wal_size:
                continue
            raw = self._read(pos, HEADER_BYTES)
            hdr = parse_header(raw, self._wal_size, self._block_limit)
            if hdr is None or not header_ok(raw, self._seed):
                continue
            # A genuine header counts even when its payload was torn: its LSN must never be
            # handed out again, and its hint is true whether or not the payload landed.
            max_seen = max(max_seen, hdr.lsn)
            if hdr.lsn < stop_lsn and hdr.kind is not Kind.WRAP:
                genuine[hdr.lsn] = pos
            if hdr.lsn > stop_lsn and hdr.durable_hint >= stop_lsn:
                raise CorruptionError(
                    f"WAL record LSN {stop_lsn} is damaged, but record LSN {hdr.lsn} at WAL "
                    f"position {pos} shows it was durable (durable through LSN "
                    f"{hdr.durable_hint}); acknowledged data would be lost — restore from a "
                    "replica or a backup",
                    volume=self._volume,
                    path=self._file.path,
                    offset=self._wal_offset + stop_pos,
                )
        return max_seen
