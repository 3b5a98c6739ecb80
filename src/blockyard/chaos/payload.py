"""Self-describing sector payloads: every 512-byte logical block the chaos workload writes
names its volume, its write and the LBA it was written for, under a CRC32C, so any read can be
attributed to exactly one write — or shown to be torn, misplaced or invented.

Layout (little endian, 32-byte header, then a fill derived from the header so a block spliced
from two writes fails the check):

    magic "BYCH" | volume u32 | lba u64 | write id u64 | flags u32 | crc32c u32

``lba`` is the block's own address, except for WRITE SAME, whose one block of Data-Out is
written unchanged to every block of the range (SBC-4 §5.50): there it is the range's first
LBA and ``flags`` has :data:`FLAG_SAME`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import crc32c

#: SBC-4 logical block size of every blockyard LU.
SECTOR_BYTES: Final = 512
MAGIC: Final = b"BYCH"
FLAG_SAME: Final = 1
_HEADER: Final = struct.Struct("<4sIQQII")
_CRC_AT: Final = _HEADER.size - 4
_FILL: Final = struct.Struct("<QII")
_FILL_REPEAT: Final = (SECTOR_BYTES - _HEADER.size) // _FILL.size
ZERO_SECTOR: Final = bytes(SECTOR_BYTES)


@dataclass(frozen=True, slots=True)
class Stamp:
    """What a well-formed sector says about itself."""

    volume: int
    lba: int
    write_id: int
    same: bool


class CorruptSector(ValueError):
    """A sector that is neither all zeros nor a payload this harness wrote intact."""


def sector(volume: int, lba: int, write_id: int, *, same: bool = False) -> bytes:
    """One sector of write ``write_id`` at ``lba`` of ``volume``."""
    flags = FLAG_SAME if same else 0
    body = bytearray(SECTOR_BYTES)
    _HEADER.pack_into(body, 0, MAGIC, volume, lba, write_id, flags, 0)
    body[_HEADER.size :] = _FILL.pack(write_id, volume, lba & 0xFFFFFFFF) * _FILL_REPEAT
    struct.pack_into("<I", body, _CRC_AT, crc32c.crc32c(body))
    return bytes(body)


def sectors(volume: int, lba: int, count: int, write_id: int) -> bytes:
    """The Data-Out of a ``count``-block write at ``lba``: each block stamped with its own LBA."""
    return b"".join(sector(volume, lba + i, write_id) for i in range(count))


def parse(data: bytes | memoryview) -> Stamp | None:
    """The stamp of one sector; None for an all-zero sector. Raises :class:`CorruptSector` for
    anything else (a bad magic or checksum, a fill that does not match its header)."""
    raw = bytes(data)
    if raw == ZERO_SECTOR:
        return None
    if len(raw) != SECTOR_BYTES:
        raise CorruptSector(f"{len(raw)} bytes, not a {SECTOR_BYTES}-byte sector")
    magic, volume, lba, write_id, flags, crc = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise CorruptSector(f"no payload magic (starts {raw[:8].hex()})")
    blank = bytearray(raw)
    struct.pack_into("<I", blank, _CRC_AT, 0)
    if crc32c.crc32c(blank) != crc:
        raise CorruptSector(f"checksum mismatch (claims write {write_id} at LBA {lba})")
    same = bool(flags & FLAG_SAME)
    if raw != sector(volume, lba, write_id, same=same):
        raise CorruptSector(f"fill does not match its header (write {write_id} at LBA {lba})")
    return Stamp(volume, lba, write_id, same)
