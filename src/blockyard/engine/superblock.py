"""The superblock: one 512-byte sector at offset 0 of the volume file.

Layout (little-endian), checksummed with CRC32C over bytes [0, 508)::

    0   magic               8s   b"BLKYVOL1"
    8   format_version      u32
    12  header_bytes        u32  (512)
    16  uuid                16s
    32  size_bytes          u64
    40  logical_block_size  u32  (512)
    44  physical_block_size u32  (4096)
    48  epoch               u64
    56  role                u8   (+3 pad)
    60  generation          u32  incarnation of the volume as a primary (random, 0 = none yet)
    64  wal_offset          u64
    72  wal_size            u64
    80  data_offset         u64
    88  checkpoint_lsn      u64  first LSN not yet applied to the data region
    96  checkpoint_pos      u64  WAL-relative position of that record
    104 snapshot_seq        u64  last snapshot sequence number handed out
    112 created_ns          u64
    120 name_len            u16
    122 name                256s (UTF-8)
    378 wal_salt            u32  mixed into the WAL checksum seed; a new salt retires the old log
    508 crc32c              u32

Fields added after the first release (generation, wal_salt) sit in bytes that were written as
zeros before, so older volumes read them as 0 — the values that keep their old meaning.

Why one sector and no A/B copies: a sector write is atomic under the failure model we test
(power loss tears writes only at 512-byte boundaries), so an update is either all old or all new.
A checksum failure is therefore real damage, reported as such, never silently rolled back.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from dataclasses import dataclass, replace

import crc32c

from blockyard.engine.epoch import Role
from blockyard.engine.limits import (
    BLOCK_SIZE,
    LOGICAL_BLOCK_SIZE,
    MAX_VOLUME_SIZE_BYTES,
    MAX_WAL_SIZE_BYTES,
    MIN_VOLUME_SIZE_BYTES,
    MIN_WAL_SIZE_BYTES,
    SECTOR_SIZE,
)
from blockyard.errors import CorruptionError

MAGIC = b"BLKYVOL1"
FORMAT_VERSION = 1
SUPERBLOCK_BYTES = SECTOR_SIZE
#: The WAL starts after a reserved 4 KiB header area.
WAL_OFFSET = 4096
#: The data region starts on a 1 MiB boundary so data blocks stay aligned for any device.
DATA_ALIGN_BYTES = 1 << 20
NAME_FIELD_BYTES = 256

_FMT = struct.Struct("<8sII16sQIIQB3xIQQQQQQQH256sI")
_CRC_OFFSET = SUPERBLOCK_BYTES - 4
assert _FMT.size <= _CRC_OFFSET


@dataclass(frozen=True, slots=True)
class Superblock:
    uuid: uuidlib.UUID
    name: str
    size_bytes: int
    epoch: int
    role: Role
    wal_offset: int
    wal_size: int
    data_offset: int
    checkpoint_lsn: int
    checkpoint_pos: int
    snapshot_seq: int
    created_ns: int
    generation: int = 0
    wal_salt: int = 0
    logical_block_size: int = LOGICAL_BLOCK_SIZE
    physical_block_size: int = BLOCK_SIZE

    def with_(self, **changes: object) -> Superblock:
        return replace(self, **changes)  # type: ignore[arg-type]

    def encode(self) -> bytes:
        name = self.name.encode()
        buf = bytearray(SUPERBLOCK_BYTES)
        _FMT.pack_into(
            buf,
            0,
            MAGIC,
            FORMAT_VERSION,
            SUPERBLOCK_BYTES,
            self.uuid.bytes,
            self.size_bytes,
            self.logical_block_size,
            self.physical_block_size,
            self.epoch,
            int(self.role),
            self.generation,
            self.wal_offset,
            self.wal_size,
            self.data_offset,
            self.checkpoint_lsn,
            self.checkpoint_pos,
            self.snapshot_seq,
            self.created_ns,
            len(name),
            name,
            self.wal_salt,
        )
        struct.pack_into("<I", buf, _CRC_OFFSET, crc32c.crc32c(bytes(buf[:_CRC_OFFSET])))
        return bytes(buf)


def data_offset_for(wal_size: int) -> int:
    end = WAL_OFFSET + wal_size
    return (end + DATA_ALIGN_BYTES - 1) // DATA_ALIGN_BYTES * DATA_ALIGN_BYTES


def decode(raw: bytes, *, path: str, volume: str, file_size: int) -> Superblock:
    """Parse and fully validate a superblock; any inconsistency is a ``CorruptionError``."""

    def corrupt(what: str, offset: int = 0) -> CorruptionError:
        return CorruptionError(
            f"superblock {what}; the volume cannot be opened safely — restore it from a replica "
            "or a backup",
            volume=volume,
            path=path,
            offset=offset,
        )

    if len(raw) < SUPERBLOCK_BYTES:
        raise corrupt(f"is truncated ({len(raw)} of {SUPERBLOCK_BYTES} bytes)")
    (stored_crc,) = struct.unpack_from("<I", raw, _CRC_OFFSET)
    if raw[:8] != MAGIC:
        raise corrupt(f"has a bad magic {raw[:8]!r}")
    if crc32c.crc32c(raw[:_CRC_OFFSET]) != stored_crc:
        raise corrupt("fails its checksum", _CRC_OFFSET)
    (
        _magic,
        version,
        header_bytes,
        uuid_raw,
        size_bytes,
        lbs,
        pbs,
        epoch,
        role,
        generation,
        wal_offset,
        wal_size,
        data_offset,
        checkpoint_lsn,
        checkpoint_pos,
        snapshot_seq,
        created_ns,
        name_len,
        name_raw,
        wal_salt,
    ) = _FMT.unpack_from(raw, 0)
    if version != FORMAT_VERSION:
        raise corrupt(f"has format version {version}; this build reads {FORMAT_VERSION}", 8)
    # Bounds on every field before any is used to size or address anything.
    if header_bytes != SUPERBLOCK_BYTES or lbs != LOGICAL_BLOCK_SIZE or pbs != BLOCK_SIZE:
        raise corrupt(f"has unsupported geometry ({header_bytes}/{lbs}/{pbs})", 12)
    if not (MIN_VOLUME_SIZE_BYTES <= size_bytes <= MAX_VOLUME_SIZE_BYTES) or size_bytes % pbs:
        raise corrupt(f"has an invalid size {size_bytes}", 32)
    if not (MIN_WAL_SIZE_BYTES <= wal_size <= MAX_WAL_SIZE_BYTES) or wal_size % BLOCK_SIZE:
        raise corrupt(f"has an invalid WAL size {wal_size}", 72)
    if wal_offset != WAL_OFFSET or data_offset != data_offset_for(wal_size):
        raise corrupt("has an inconsistent WAL/data layout", 64)
    if checkpoint_pos >= wal_size or checkpoint_pos % SECTOR_SIZE:
        raise corrupt(f"has an invalid checkpoint position {checkpoint_pos}", 96)
    if role not in Role._value2member_map_:
        raise corrupt(f"has an unknown role {role}", 56)
    if name_len > NAME_FIELD_BYTES:
        raise corrupt(f"has an invalid name length {name_len}", 120)
    if file_size < data_offset:
        raise corrupt(f"describes a data region at {data_offset} past the file end {file_size}")
    try:
        name = bytes(name_raw[:name_len]).decode()
    except UnicodeDecodeError:
        raise corrupt("has a name that is not UTF-8", 122) from None
    return Superblock(
        uuid=uuidlib.UUID(bytes=uuid_raw),
        name=name,
        size_bytes=size_bytes,
        epoch=epoch,
        role=Role(role),
        wal_offset=wal_offset,
        wal_size=wal_size,
        data_offset=data_offset,
        checkpoint_lsn=checkpoint_lsn,
        checkpoint_pos=checkpoint_pos,
        snapshot_seq=snapshot_seq,
        created_ns=created_ns,
        generation=generation,
        wal_salt=wal_salt,
    )
