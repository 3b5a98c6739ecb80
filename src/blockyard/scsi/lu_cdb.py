"""CDB decoding the logical unit's modules share: where the plain READ and WRITE CDBs (SBC-4
§5) keep their LBA and TRANSFER LENGTH, as the table ``try_execute``'s handlers are built from;
the LBA of a CDB for the report of a device error; and the signature of a command handler."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

from blockyard.scsi.constants import Op
from blockyard.scsi.nexus import Nexus
from blockyard.scsi.sense import ScsiResult

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_LBA10 = struct.Struct(">xxIxH")  # LBA at byte 2, group at 6, length at 7
_LBA12 = struct.Struct(">xxII")
_LBA16 = struct.Struct(">xxQI")

#: A command handler: the nexus, the CDB and the Data-Out cut to the length the CDB asks for.
Handler = Callable[[Nexus, memoryview, memoryview], ScsiResult]


def _cdb6_span(cdb: memoryview) -> tuple[int, int]:
    return ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3], cdb[4] or 256


def _span10(cdb: memoryview) -> tuple[int, int]:
    lba, blocks = _LBA10.unpack_from(cdb)
    return lba, blocks


def _span12(cdb: memoryview) -> tuple[int, int]:
    lba, blocks = _LBA12.unpack_from(cdb)
    return lba, blocks


def _span16(cdb: memoryview) -> tuple[int, int]:
    lba, blocks = _LBA16.unpack_from(cdb)
    return lba, blocks


#: The plain READ and WRITE CDBs (SBC-4 §5): how to find their blocks, whether they write, and
#: their FUA bit in CDB byte 1 (none in WRITE (6), whose byte 1 holds LBA bits).
_FUA: Final = 0x08
PLAIN_RW: Final[dict[int, tuple[Callable[[memoryview], tuple[int, int]], bool, int]]] = {
    Op.READ_6: (_cdb6_span, False, 0),
    Op.WRITE_6: (_cdb6_span, True, 0),
    Op.READ_10: (_span10, False, 0),
    Op.WRITE_10: (_span10, True, _FUA),
    Op.READ_12: (_span12, False, 0),
    Op.WRITE_12: (_span12, True, _FUA),
    Op.READ_16: (_span16, False, 0),
    Op.WRITE_16: (_span16, True, _FUA),
}


def cdb_lba(cdb: memoryview) -> int | None:
    """The LBA field where the READ/WRITE family keeps it, for the report of a device error;
    None when the CDB is too short to hold one."""
    size = len(cdb)
    op = cdb[0]
    if op < 0x20 and size >= 4:
        return ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
    if op >= 0x80 and op < 0xA0 and size >= 10:
        return int(_U64.unpack_from(cdb, 2)[0])
    if size >= 6:
        return int(_U32.unpack_from(cdb, 2)[0])
    return None
