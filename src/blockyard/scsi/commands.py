"""The command table: what each supported CDB looks like, moves and may do.

One :class:`CommandSpec` per (operation code, service action) carries the CDB usage bitmap
that REPORT SUPPORTED OPERATION CODES reports *and* that :func:`validate_cdb` enforces, so
the two cannot disagree. :func:`inspect` is the cheap pre-execution look the transport takes
on arrival to learn the direction and the Data-Out length to solicit.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from blockyard.scsi.constants import (
    INVALID_COMMAND_OPERATION_CODE,
    INVALID_FIELD_IN_CDB,
    Op,
    SenseKey,
)
from blockyard.scsi.identity import MAX_COMPARE_AND_WRITE_BLOCKS, UNMAP_PARAM_LEN_MAX
from blockyard.scsi.modepages import MODE_SELECT_PARAM_LEN_MAX
from blockyard.scsi.pr import PR_OUT_PARAM_LEN_MAX
from blockyard.scsi.sense import (
    CommandError,
    FieldPointer,
    ScsiResult,
    cdb_error,
    check_condition,
    illegal,
)


class Direction(IntEnum):
    NONE = 0
    READ = 1  # data-in
    WRITE = 2  # data-out


class PrClass(IntEnum):
    """How a command fares against reservations (SPC-4 §5.12.1 Table 58, SBC-4 Table 13)."""

    ALWAYS = 0  # allowed even under an SPC-2 reservation held elsewhere
    NOT_SPC2 = 1  # allowed under every persistent reservation, conflicts with RESERVE(6)
    READ = 2
    WRITE = 3
    SELF = 4  # RESERVE/RELEASE: the handler applies the rules


class AluaClass(IntEnum):
    """Which asymmetric access states admit a command (SPC-4 §5.15.2.4)."""

    ANY = 0  # INQUIRY, REPORT LUNS, RTPG, REQUEST SENSE, REPORT SUPPORTED ...
    STANDBY = 1  # also in standby: MODE SENSE/SELECT, PERSISTENT RESERVE IN/OUT
    ACTIVE = 2


# Lengths a transfer helper returns: (data-out bytes to solicit, data-in allocation length).
Xfer = Callable[[bytes | memoryview, int, int], tuple[int, int]]


@dataclass(frozen=True, slots=True)
class CommandSpec:
    opcode: int
    service_action: int | None
    name: str
    usage: bytes
    direction: Direction
    xfer: Xfer
    pr_class: PrClass
    alua_class: AluaClass
    reports_ua: bool = True
    accept_mask: int = 0
    reject_mask: int = 0

    @property
    def cdb_length(self) -> int:
        return len(self.usage)


def _spec(
    opcode: int,
    sa: int | None,
    name: str,
    usage: tuple[int, ...],
    direction: Direction,
    xfer: Xfer,
    pr: PrClass,
    alua: AluaClass,
    *,
    reports_ua: bool = True,
) -> CommandSpec:
    accept = bytearray(usage)
    accept[0] = 0xFF
    if sa is not None:
        accept[1] |= 0x1F
    mask_all = (1 << (8 * len(usage))) - 1
    accept_int = int.from_bytes(accept, "big")
    return CommandSpec(
        opcode,
        sa,
        name,
        bytes(usage),
        direction,
        xfer,
        pr,
        alua,
        reports_ua,
        accept_int,
        mask_all & ~accept_int,
    )


_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def _none(cdb: bytes | memoryview, lbs: int, mtb: int) -> tuple[int, int]:
    return 0, 0


def _blocks_checked(blocks: int, byte: int, mtb: int) -> int:
    if blocks > mtb:
        raise cdb_error(byte)
    return blocks


def _rw6_blocks(cdb: bytes | memoryview) -> int:
    # SBC-4 §5.15: READ (6)/WRITE (6) TRANSFER LENGTH 0 means 256 blocks.
    return cdb[4] or 256


def _read6(cdb: bytes | memoryview, lbs: int, mtb: int) -> tuple[int, int]:
    return 0, _blocks_checked(_rw6_blocks(cdb), 4, mtb) * lbs


def _write6(cdb: bytes | memoryview, lbs: int, mtb: int) -> tuple[int, int]:
    return _blocks_checked(_rw6_blocks(cdb), 4, mtb) * lbs, 0


def _read10(cdb: bytes | memoryview, lbs: int, mtb: int) -> tuple[int, int]:
    return 0, _blocks_checked(_U16.unpack_from(cdb, 7)[0], 7, mtb) * lbs


def _write10(cdb: bytes | memoryview, lbs: int, mtb: int) -> tuple[int, int]:
    return _blocks_checked(_U16.unpack_from(cdb, 7)[0], 7, mtb) * lbs, 0


def _read12(cdb: bytes | memoryview, lbs: int, mtb: int) -> tuple[int, int]:
    return 0, _blocks_checked(_U32.unpack_from(cdb, 6)[0], 6, mtb) * lbs


def _write12(cdb: bytes | memoryview, lbs: int, mtb: int) -> tuple[int, int]:
    return _blocks_checked(_U32.unpack_from(cdb, 6)[0], 6, mtb) * lbs, 0


def _read16(cdb: bytes | memoryview, lbs: int, mtb: int) -> tuple[int, int]:
    return 0, _blocks_checked(_U32.unpack_from(cdb, 10)[0], 10, mtb) * lbs


def _write16(cdb: bytes | memoryview, lbs: int, mtb: int) -> tuple[int, int]:
    return _blocks_checked(_U32.unpack_from(cdb, 10)[0], 10, mtb) * lbs, 0


def _verify_out(blocks: int, byte: int, cdb: bytes | memoryview, lbs: int, mtb: int) -> int:
    # SBC-4 §5.33 Table 95: BYTCHK 00b no data, 01b TRANSFER LENGTH blocks, 11b one block.
    bytchk = (cdb[1] >> 1) & 0x03
    if bytchk == 0b10:
        raise cdb_error(1, 2)
    if bytchk == 0b00:
        return 0
    _blocks_checked(blocks, byte, mtb)
    if bytchk == 0b11:
        return lbs if blocks else 0
    return blocks * lbs


def _verify10(cdb: bytes | memoryview, lbs: int, mtb: int) -> tuple[int, int]:
    return _verify_out(_U16.unpack_from(cdb, 7)[0], 7, cdb, lbs, mtb), 0


def _verify12(cdb: bytes | memoryview, lbs: int, mtb: int) -> tuple[int, int]:
    return _verify_out(_U32.unpack_from(cdb, 6)[0], 6, cdb, lbs, mtb), 0


def _verify16(cdb: bytes | memoryview, lbs: int, mtb: int) -> tuple[int, int]:
    return _verify_out(_U32.unpack_from(cdb, 10)[0], 10, cdb, lbs, mtb), 0


def _write_same10(cdb: bytes | memoryview, lbs: int, mtb: int) -> tuple[int, int]:
    return lbs, 0


def _write_same16(cdb: bytes | memoryview, lbs: int, mtb: int) -> tuple[int, int]:
    # SBC-4 §5.50: NDOB=1 means no Data-Out buffer.
    return (0 if cdb[1] & 0x01 else lbs), 0


def _compare_and_write(cdb: bytes | memoryview, lbs: int, mtb: int) -> tuple[int, int]:
    blocks = cdb[13]
    if blocks > MAX_COMPARE_AND_WRITE_BLOCKS:
        raise cdb_error(13)
    return 2 * blocks * lbs, 0


def _param_len(offset: int, width: int, cap: int) -> Xfer:
    def xfer(cdb: bytes | memoryview, lbs: int, mtb: int) -> tuple[int, int]:
        length = int.from_bytes(cdb[offset : offset + width], "big")
        if length > cap:
            raise cdb_error(offset)
        return length, 0

    return xfer


def _alloc_len(offset: int, width: int) -> Xfer:
    def xfer(cdb: bytes | memoryview, lbs: int, mtb: int) -> tuple[int, int]:
        return 0, int.from_bytes(cdb[offset : offset + width], "big")

    return xfer


def _rc10(cdb: bytes | memoryview, lbs: int, mtb: int) -> tuple[int, int]:
    return 0, 8


_D, _R, _W = Direction.NONE, Direction.READ, Direction.WRITE
_A, _N, _PR, _PW, _S = PrClass.ALWAYS, PrClass.NOT_SPC2, PrClass.READ, PrClass.WRITE, PrClass.SELF
_ANY, _SB, _ACT = AluaClass.ANY, AluaClass.STANDBY, AluaClass.ACTIVE
_LBA4 = (0xFF,) * 4
_LBA8 = (0xFF,) * 8

COMMANDS: Final[tuple[CommandSpec, ...]] = (
    # SPC-4 §6.47 TEST UNIT READY
    _spec(Op.TEST_UNIT_READY, None, "TEST UNIT READY", (0x00, 0, 0, 0, 0, 0), _D, _none, _N, _ACT),
    # SPC-4 §6.39 REQUEST SENSE (DESC=1 is refused: fixed format only)
    _spec(
        Op.REQUEST_SENSE,
        None,
        "REQUEST SENSE",
        (0x03, 0, 0, 0, 0xFF, 0),
        _R,
        _alloc_len(4, 1),
        _A,
        _ANY,
        reports_ua=False,
    ),
    # SBC-4 §5.15 READ (6), §5.38 WRITE (6)
    _spec(Op.READ_6, None, "READ(6)", (0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0), _R, _read6, _PR, _ACT),
    _spec(Op.WRITE_6, None, "WRITE(6)", (0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0), _W, _write6, _PW, _ACT),
    # SPC-4 §6.6 INQUIRY (CMDDT is obsolete and refused)
    _spec(
        Op.INQUIRY,
        None,
        "INQUIRY",
        (0x12, 0x01, 0xFF, 0xFF, 0xFF, 0),
        _R,
        _alloc_len(3, 2),
        _A,
        _ANY,
        reports_ua=False,
    ),
    # SPC-4 §6.9 MODE SELECT (6): PF accepted, SP refused by the usage bitmap
    _spec(
        Op.MODE_SELECT_6,
        None,
        "MODE SELECT(6)",
        (0x15, 0x10, 0, 0, 0xFF, 0),
        _W,
        _param_len(4, 1, MODE_SELECT_PARAM_LEN_MAX),
        _PW,
        _SB,
    ),
    # SPC-2 §7.21 RESERVE (6), §7.17 RELEASE (6); third-party forms are refused
    _spec(Op.RESERVE_6, None, "RESERVE(6)", (0x16, 0, 0, 0, 0, 0), _D, _none, _S, _ACT),
    _spec(Op.RELEASE_6, None, "RELEASE(6)", (0x17, 0, 0, 0, 0, 0), _D, _none, _S, _ACT),
    # SPC-4 §6.11 MODE SENSE (6)
    _spec(
        Op.MODE_SENSE_6,
        None,
        "MODE SENSE(6)",
        (0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0),
        _R,
        _alloc_len(4, 1),
        _PR,
        _SB,
    ),
    # SBC-4 §5.25 START STOP UNIT
    _spec(
        Op.START_STOP_UNIT,
        None,
        "START STOP UNIT",
        (0x1B, 0x01, 0, 0x0F, 0xF7, 0),
        _D,
        _none,
        _PW,
        _ACT,
    ),
    # SPC-4 §6.13 / SBC-4 §5.14 PREVENT ALLOW MEDIUM REMOVAL
    _spec(
        Op.PREVENT_ALLOW_MEDIUM_REMOVAL,
        None,
        "PREVENT ALLOW MEDIUM REMOVAL",
        (0x1E, 0, 0, 0, 0x03, 0),
        _D,
        _none,
        _PW,
        _ACT,
    ),
    # SBC-4 §5.20 READ CAPACITY (10)
    _spec(
        Op.READ_CAPACITY_10,
        None,
        "READ CAPACITY(10)",
        (0x25, 0, *_LBA4, 0, 0, 0x01, 0),
        _R,
        _rc10,
        _N,
        _ACT,
    ),
    # SBC-4 §5.16 READ (10): DPO and FUA; RDPROTECT refused (no protection information)
    _spec(
        Op.READ_10,
        None,
        "READ(10)",
        (0x28, 0x18, *_LBA4, 0x1F, 0xFF, 0xFF, 0),
        _R,
        _read10,
        _PR,
        _ACT,
    ),
    # SBC-4 §5.39 WRITE (10)
    _spec(
        Op.WRITE_10,
        None,
        "WRITE(10)",
        (0x2A, 0x18, *_LBA4, 0x1F, 0xFF, 0xFF, 0),
        _W,
        _write10,
        _PW,
        _ACT,
    ),
    # SBC-4 §5.43 WRITE AND VERIFY (10)
    _spec(
        Op.WRITE_AND_VERIFY_10,
        None,
        "WRITE AND VERIFY(10)",
        (0x2E, 0x12, *_LBA4, 0x1F, 0xFF, 0xFF, 0),
        _W,
        _write10,
        _PW,
        _ACT,
    ),
    # SBC-4 §5.33 VERIFY (10)
    _spec(
        Op.VERIFY_10,
        None,
        "VERIFY(10)",
        (0x2F, 0x16, *_LBA4, 0x1F, 0xFF, 0xFF, 0),
        _W,
        _verify10,
        _PR,
        _ACT,
    ),
    # SBC-4 §5.11 PRE-FETCH (10)
    _spec(
        Op.PRE_FETCH_10,
        None,
        "PRE-FETCH(10)",
        (0x34, 0x02, *_LBA4, 0x1F, 0xFF, 0xFF, 0),
        _D,
        _none,
        _PR,
        _ACT,
    ),
    # SBC-4 §5.26 SYNCHRONIZE CACHE (10)
    _spec(
        Op.SYNCHRONIZE_CACHE_10,
        None,
        "SYNCHRONIZE CACHE(10)",
        (0x35, 0x06, *_LBA4, 0x1F, 0xFF, 0xFF, 0),
        _D,
        _none,
        _PW,
        _ACT,
    ),
    # SBC-4 §5.49 WRITE SAME (10): UNMAP; ANCHOR refused (ANC_SUP=0)
    _spec(
        Op.WRITE_SAME_10,
        None,
        "WRITE SAME(10)",
        (0x41, 0x08, *_LBA4, 0x1F, 0xFF, 0xFF, 0),
        _W,
        _write_same10,
        _PW,
        _ACT,
    ),
    # SBC-4 §5.32 UNMAP
    _spec(
        Op.UNMAP,
        None,
        "UNMAP",
        (0x42, 0, 0, 0, 0, 0, 0x1F, 0xFF, 0xFF, 0),
        _W,
        _param_len(7, 2, UNMAP_PARAM_LEN_MAX),
        _PW,
        _ACT,
    ),
    # SPC-4 §6.10 MODE SELECT (10)
    _spec(
        Op.MODE_SELECT_10,
        None,
        "MODE SELECT(10)",
        (0x55, 0x10, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0),
        _W,
        _param_len(7, 2, MODE_SELECT_PARAM_LEN_MAX),
        _PW,
        _SB,
    ),
    # SPC-2 §7.22 RESERVE (10), §7.18 RELEASE (10)
    _spec(
        Op.RESERVE_10, None, "RESERVE(10)", (0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0), _D, _none, _S, _ACT
    ),
    _spec(
        Op.RELEASE_10, None, "RELEASE(10)", (0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0), _D, _none, _S, _ACT
    ),
    # SPC-4 §6.12 MODE SENSE (10)
    _spec(
        Op.MODE_SENSE_10,
        None,
        "MODE SENSE(10)",
        (0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0),
        _R,
        _alloc_len(7, 2),
        _PR,
        _SB,
    ),
    # SPC-4 §6.15 PERSISTENT RESERVE IN (service actions 00h-03h)
    *(
        _spec(
            Op.PERSISTENT_RESERVE_IN,
            sa,
            f"PERSISTENT RESERVE IN/{sa:02X}h",
            (0x5E, sa, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0),
            _R,
            _alloc_len(7, 2),
            _N,
            _SB,
        )
        for sa in range(4)
    ),
    # SPC-4 §6.16 PERSISTENT RESERVE OUT (service actions 00h-07h)
    *(
        _spec(
            Op.PERSISTENT_RESERVE_OUT,
            sa,
            f"PERSISTENT RESERVE OUT/{sa:02X}h",
            (0x5F, sa, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0),
            _W,
            _param_len(5, 4, PR_OUT_PARAM_LEN_MAX),
            _N,
            _SB,
        )
        for sa in range(8)
    ),
    # SBC-4 §5.18 READ (16)
    _spec(
        Op.READ_16, None, "READ(16)", (0x88, 0x18, *_LBA8, *_LBA4, 0x1F, 0), _R, _read16, _PR, _ACT
    ),
    # SBC-4 §5.3 COMPARE AND WRITE
    _spec(
        Op.COMPARE_AND_WRITE,
        None,
        "COMPARE AND WRITE",
        (0x89, 0x18, *_LBA8, 0, 0, 0, 0xFF, 0x1F, 0),
        _W,
        _compare_and_write,
        _PW,
        _ACT,
    ),
    # SBC-4 §5.41 WRITE (16)
    _spec(
        Op.WRITE_16,
        None,
        "WRITE(16)",
        (0x8A, 0x18, *_LBA8, *_LBA4, 0x1F, 0),
        _W,
        _write16,
        _PW,
        _ACT,
    ),
    # SBC-4 §5.45 WRITE AND VERIFY (16)
    _spec(
        Op.WRITE_AND_VERIFY_16,
        None,
        "WRITE AND VERIFY(16)",
        (0x8E, 0x12, *_LBA8, *_LBA4, 0x1F, 0),
        _W,
        _write16,
        _PW,
        _ACT,
    ),
    # SBC-4 §5.35 VERIFY (16)
    _spec(
        Op.VERIFY_16,
        None,
        "VERIFY(16)",
        (0x8F, 0x16, *_LBA8, *_LBA4, 0x1F, 0),
        _W,
        _verify16,
        _PR,
        _ACT,
    ),
    # SBC-4 §5.12 PRE-FETCH (16)
    _spec(
        Op.PRE_FETCH_16,
        None,
        "PRE-FETCH(16)",
        (0x90, 0x02, *_LBA8, *_LBA4, 0x1F, 0),
        _D,
        _none,
        _PR,
        _ACT,
    ),
    # SBC-4 §5.27 SYNCHRONIZE CACHE (16)
    _spec(
        Op.SYNCHRONIZE_CACHE_16,
        None,
        "SYNCHRONIZE CACHE(16)",
        (0x91, 0x06, *_LBA8, *_LBA4, 0x1F, 0),
        _D,
        _none,
        _PW,
        _ACT,
    ),
    # SBC-4 §5.50 WRITE SAME (16): UNMAP and NDOB; ANCHOR refused
    _spec(
        Op.WRITE_SAME_16,
        None,
        "WRITE SAME(16)",
        (0x93, 0x09, *_LBA8, *_LBA4, 0x1F, 0),
        _W,
        _write_same16,
        _PW,
        _ACT,
    ),
    # SBC-4 §5.21 READ CAPACITY (16)
    _spec(
        Op.SERVICE_ACTION_IN_16,
        0x10,
        "READ CAPACITY(16)",
        (0x9E, 0x10, *_LBA8, 0xFF, 0xFF, 0xFF, 0xFF, 0x01, 0),
        _R,
        _alloc_len(10, 4),
        _N,
        _ACT,
    ),
    # SBC-4 §5.8 GET LBA STATUS
    _spec(
        Op.SERVICE_ACTION_IN_16,
        0x12,
        "GET LBA STATUS",
        (0x9E, 0x12, *_LBA8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0),
        _R,
        _alloc_len(10, 4),
        _PR,
        _ACT,
    ),
    # SPC-4 §6.33 REPORT LUNS
    _spec(
        Op.REPORT_LUNS,
        None,
        "REPORT LUNS",
        (0xA0, 0, 0xFF, 0, 0, 0, *_LBA4, 0, 0),
        _R,
        _alloc_len(6, 4),
        _A,
        _ANY,
        reports_ua=False,
    ),
    # SPC-4 §6.37 REPORT TARGET PORT GROUPS
    _spec(
        Op.MAINTENANCE_IN,
        0x0A,
        "REPORT TARGET PORT GROUPS",
        (0xA3, 0xEA, 0, 0, 0, 0, *_LBA4, 0, 0),
        _R,
        _alloc_len(6, 4),
        _A,
        _ANY,
    ),
    # SPC-4 §6.35 REPORT SUPPORTED OPERATION CODES
    _spec(
        Op.MAINTENANCE_IN,
        0x0C,
        "REPORT SUPPORTED OPERATION CODES",
        (0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, *_LBA4, 0, 0),
        _R,
        _alloc_len(6, 4),
        _A,
        _ANY,
    ),
    # SPC-4 §6.36 REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS
    _spec(
        Op.MAINTENANCE_IN,
        0x0D,
        "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS",
        (0xA3, 0x0D, 0x80, 0, 0, 0, *_LBA4, 0, 0),
        _R,
        _alloc_len(6, 4),
        _A,
        _ANY,
    ),
    # SBC-4 §5.17 READ (12), §5.40 WRITE (12), §5.44 WRITE AND VERIFY (12), §5.34 VERIFY (12)
    _spec(
        Op.READ_12, None, "READ(12)", (0xA8, 0x18, *_LBA4, *_LBA4, 0x1F, 0), _R, _read12, _PR, _ACT
    ),
    _spec(
        Op.WRITE_12,
        None,
        "WRITE(12)",
        (0xAA, 0x18, *_LBA4, *_LBA4, 0x1F, 0),
        _W,
        _write12,
        _PW,
        _ACT,
    ),
    _spec(
        Op.WRITE_AND_VERIFY_12,
        None,
        "WRITE AND VERIFY(12)",
        (0xAE, 0x12, *_LBA4, *_LBA4, 0x1F, 0),
        _W,
        _write12,
        _PW,
        _ACT,
    ),
    _spec(
        Op.VERIFY_12,
        None,
        "VERIFY(12)",
        (0xAF, 0x16, *_LBA4, *_LBA4, 0x1F, 0),
        _W,
        _verify12,
        _PR,
        _ACT,
    ),
)

#: Operation codes whose service action lives in byte 1 (bits 4:0).
SA_OPCODES: Final = frozenset(c.opcode for c in COMMANDS if c.service_action is not None)


def _build_tables() -> tuple[list[CommandSpec | None], dict[tuple[int, int], CommandSpec]]:
    plain: list[CommandSpec | None] = [None] * 256
    by_sa: dict[tuple[int, int], CommandSpec] = {}
    for spec in COMMANDS:
        if spec.service_action is None:
            plain[spec.opcode] = spec
        else:
            by_sa[(spec.opcode, spec.service_action)] = spec
    return plain, by_sa


PLAIN_TABLE, SA_TABLE = _build_tables()

INVALID_OPCODE_RESULT: Final = check_condition(
    SenseKey.ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE
)


def lookup(cdb: bytes | memoryview) -> CommandSpec:
    """The spec for ``cdb``, or CommandError with the sense SPC-4 §6.35 clients expect."""
    if not cdb:
        raise CommandError(INVALID_OPCODE_RESULT)
    opcode = cdb[0]
    spec = PLAIN_TABLE[opcode]
    if spec is not None:
        return spec
    if opcode in SA_OPCODES:
        if len(cdb) < 2:
            raise cdb_error(1)
        found = SA_TABLE.get((opcode, cdb[1] & 0x1F))
        if found is None:
            # An unknown service action of a known opcode points at the SA field (byte 1).
            raise cdb_error(1, 4)
        return found
    raise CommandError(INVALID_OPCODE_RESULT)


def validate_cdb(spec: CommandSpec, cdb: bytes | memoryview) -> None:
    """Refuse short CDBs and any bit set outside the spec's CDB usage bitmap."""
    length = len(spec.usage)
    if len(cdb) < length:
        raise illegal(INVALID_FIELD_IN_CDB)
    bad = int.from_bytes(cdb[:length], "big") & spec.reject_mask
    if bad:
        top = bad.bit_length() - 1
        byte = length - 1 - top // 8
        raise CommandError(
            check_condition(
                SenseKey.ILLEGAL_REQUEST,
                INVALID_FIELD_IN_CDB,
                field=FieldPointer(byte, top % 8, in_cdb=True),
            )
        )


@dataclass(frozen=True, slots=True)
class CommandInfo:
    """What the transport needs before execution.

    ``data_out_bytes`` is exactly what to solicit; ``data_in_bytes`` is the most the command
    can return. When ``error`` is set the CDB is refused as is: solicit nothing and call
    ``execute`` anyway (it may report a pending unit attention instead).
    """

    direction: Direction
    data_out_bytes: int
    data_in_bytes: int
    name: str
    error: ScsiResult | None = None


def inspect(
    cdb: bytes | memoryview, logical_block_size: int, max_transfer_blocks: int
) -> CommandInfo:
    """Decode the transfer of ``cdb`` without touching any state. Never raises."""
    try:
        spec = lookup(cdb)
        validate_cdb(spec, cdb)
        out_bytes, in_bytes = spec.xfer(cdb, logical_block_size, max_transfer_blocks)
    except CommandError as err:
        return CommandInfo(Direction.NONE, 0, 0, "invalid", err.result)
    direction = spec.direction
    if direction == Direction.WRITE and out_bytes == 0:
        direction = Direction.NONE
    return CommandInfo(direction, out_bytes, in_bytes, spec.name)


# SPC-4 §6.35.3 timeouts descriptor: nominal and recommended command timeouts, seconds.
NOMINAL_TIMEOUT_S: Final = 30
RECOMMENDED_TIMEOUT_S: Final = 60
_TIMEOUTS = struct.Struct(">HxBII")


def _timeouts() -> bytes:
    return _TIMEOUTS.pack(0x0A, 0, NOMINAL_TIMEOUT_S, RECOMMENDED_TIMEOUT_S)


def report_supported_opcodes(cdb: bytes | memoryview) -> bytes:
    """REPORT SUPPORTED OPERATION CODES parameter data (SPC-4 §6.35), before truncation."""
    rctd = bool(cdb[2] & 0x80)
    options = cdb[2] & 0x07
    req_op = cdb[3]
    req_sa = _U16.unpack_from(cdb, 4)[0]
    if options == 0b000:
        body = bytearray()
        for spec in COMMANDS:
            flags = (0x02 if rctd else 0) | (0x01 if spec.service_action is not None else 0)
            body += struct.pack(
                ">BxHxBH", spec.opcode, spec.service_action or 0, flags, len(spec.usage)
            )
            if rctd:
                body += _timeouts()
        return _U32.pack(len(body)) + bytes(body)
    if options == 0b001:
        if req_op in SA_OPCODES:
            raise cdb_error(3)
        spec_or_none = PLAIN_TABLE[req_op]
    elif options == 0b010:
        if req_op not in SA_OPCODES:
            raise cdb_error(3)
        spec_or_none = SA_TABLE.get((req_op, req_sa & 0x1F)) if req_sa <= 0x1F else None
    else:
        raise cdb_error(2, 2)
    if spec_or_none is None:
        # SUPPORT 001b: not supported; no CDB usage data follows.
        return bytes([0, 0x01, 0, 0])
    support = (0x80 if rctd else 0) | 0x03
    data = bytes([0, support]) + _U16.pack(len(spec_or_none.usage)) + spec_or_none.usage
    return data + (_timeouts() if rctd else b"")


__all__ = [
    "COMMANDS",
    "AluaClass",
    "CommandInfo",
    "CommandSpec",
    "Direction",
    "PrClass",
    "inspect",
    "lookup",
    "report_supported_opcodes",
    "validate_cdb",
]
