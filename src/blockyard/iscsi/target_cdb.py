"""What the target reads from a LUN field or a CDB by itself, without the logical unit: the
first-level LUN, the blocks a READ/WRITE-like command touches (for command ordering), and a
WRITE shortened to the data the initiator will send. Pure functions and their tables.
"""

from __future__ import annotations

import struct

from blockyard.scsi.constants import Op

#: WRITE / WRITE AND VERIFY TRANSFER LENGTH field (offset, width) per opcode (SBC-4 §5).
_TRANSFER_LENGTH_FIELDS: dict[int, tuple[int, int]] = {
    Op.WRITE_10: (7, 2),
    Op.WRITE_12: (6, 4),
    Op.WRITE_16: (10, 4),
    Op.WRITE_AND_VERIFY_10: (7, 2),
    Op.WRITE_AND_VERIFY_12: (6, 4),
    Op.WRITE_AND_VERIFY_16: (10, 4),
}
#: Where an outstanding command's blocks are, for the fast path's overlap rule (see
#: _fast_command): (struct, LBA offset, length offset) of the READ, WRITE, VERIFY and WRITE AND
#: VERIFY CDBs (SBC-4 §5); 6-byte CDBs are decoded by hand (21-bit LBA, 0 means 256 blocks).
_SPAN_FIELDS: dict[int, tuple[struct.Struct, struct.Struct]] = {
    int(op): fields
    for ops, fields in (
        (
            (Op.READ_10, Op.WRITE_10, Op.VERIFY_10, Op.WRITE_AND_VERIFY_10),
            (struct.Struct(">xxI"), struct.Struct(">7xH")),
        ),
        (
            (Op.READ_12, Op.WRITE_12, Op.VERIFY_12, Op.WRITE_AND_VERIFY_12),
            (struct.Struct(">xxI"), struct.Struct(">6xI")),
        ),
        (
            (Op.READ_16, Op.WRITE_16, Op.VERIFY_16, Op.WRITE_AND_VERIFY_16),
            (struct.Struct(">xxQ"), struct.Struct(">10xI")),
        ),
    )
    for op in ops
}
_SPAN_CDB6_OPS = frozenset({int(Op.READ_6), int(Op.WRITE_6)})
#: Outstanding commands that neither read nor change the blocks a fast command touches.
_TRANSPARENT_OPS = frozenset({int(Op.SYNCHRONIZE_CACHE_10), int(Op.SYNCHRONIZE_CACHE_16)})


def _decode_lun(lun: int) -> int | None:
    """SAM-5 §4.7: the first level of a peripheral (00b) or flat (01b) LUN; None otherwise."""
    if lun & 0x0000FFFFFFFFFFFF:
        return None
    first = lun >> 48
    method = first >> 14
    if method == 0:
        return first & 0xFF if not first & 0x3F00 else None
    if method == 1:
        return first & 0x3FFF
    return None


def _overlaps(spans: dict[int, tuple[int, int]], start: int, end: int) -> bool:
    """Whether any span shares a block with [start, end)."""
    return any(first < end and start < stop for first, stop in spans.values())


def _span_of(cdb: bytes) -> tuple[int, int] | None:
    """The blocks [start, end) a READ, WRITE, VERIFY or WRITE AND VERIFY CDB touches; None for
    any other command (or a CDB too short to say)."""
    opcode = cdb[0] if cdb else -1
    fields = _SPAN_FIELDS.get(opcode)
    if fields is not None:
        lba_field, length_field = fields
        if len(cdb) < length_field.size:
            return None
        lba = int(lba_field.unpack_from(cdb)[0])
        return lba, lba + int(length_field.unpack_from(cdb)[0])
    if opcode in _SPAN_CDB6_OPS and len(cdb) >= 6:
        lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
        return lba, lba + (cdb[4] or 256)
    return None


def _truncate_write(cdb: bytes, edtl: int, needed: int) -> tuple[bytes, int] | None:
    """Shorten a WRITE's TRANSFER LENGTH to the whole blocks that fit in EDTL; returns the new
    CDB and its Data-Out length, or None for commands that cannot be shortened."""
    place = _TRANSFER_LENGTH_FIELDS.get(cdb[0])
    if place is None:
        return None
    offset, width = place
    if len(cdb) < offset + width:
        return None
    blocks = int.from_bytes(cdb[offset : offset + width], "big")
    if blocks == 0 or needed % blocks:
        return None
    block_size = needed // blocks
    keep = edtl // block_size
    out = bytearray(cdb)
    out[offset : offset + width] = keep.to_bytes(width, "big")
    return bytes(out), keep * block_size
