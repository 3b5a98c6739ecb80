"""Initiator-side SCSI, sans-IO: CDB builders, parameter-data parsers and the one place that
decides what a command outcome means (done, retry, fail over, or which error to raise).

Only the commands the initiator sends are here; numbers come from
:mod:`blockyard.scsi.constants`, which the target side uses too.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final

from blockyard.attach.initiator.errors import ScsiStatusError
from blockyard.errors import (
    BlockyardError,
    InvalidArgumentError,
    NoSpaceError,
    OutOfRangeError,
)
from blockyard.scsi.alua import AccessState
from blockyard.scsi.constants import (
    ASYMMETRIC_ACCESS_STATE_CHANGED,
    CAPACITY_DATA_HAS_CHANGED,
    LBA_OUT_OF_RANGE,
    LU_NOT_ACCESSIBLE_STANDBY,
    LU_NOT_ACCESSIBLE_TRANSITION,
    LU_NOT_ACCESSIBLE_UNAVAILABLE,
    MI_REPORT_TARGET_PORT_GROUPS,
    SAI_GET_LBA_STATUS,
    SAI_READ_CAPACITY_16,
    SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
    Op,
    SenseKey,
    Status,
)

# SBC-4 §5.16 / §5.20 / §5.32: bits in CDB byte 1.
FUA_BIT: Final = 0x08  # SBC-4 §5.40 WRITE (16) FUA
WRITE_SAME_UNMAP_BIT: Final = 0x08  # SBC-4 §5.50 WRITE SAME (16) UNMAP
EVPD_BIT: Final = 0x01  # SPC-4 §6.6.1 INQUIRY EVPD
RTPG_EXTENDED_FORMAT: Final = 0x01  # SPC-4 §6.37 PARAMETER DATA FORMAT 001b

READ_CAPACITY_16_LENGTH: Final = 32  # SBC-4 §5.21.2 parameter data
VPD_ALLOCATION_LENGTH: Final = 1024  # larger than any VPD page a blockyard target sends
RTPG_ALLOCATION_LENGTH: Final = 4096  # 64 groups x (8 + 4 x ports) stays well below
GET_LBA_STATUS_ALLOCATION_LENGTH: Final = 24  # header + one descriptor (SBC-4 §5.8.2)
UNMAP_HEADER_LENGTH: Final = 8  # SBC-4 §5.32.2
UNMAP_DESCRIPTOR_LENGTH: Final = 16  # SBC-4 §5.32.2

VPD_DEVICE_IDENTIFICATION: Final = 0x83  # SPC-4 §7.8.6
VPD_BLOCK_LIMITS: Final = 0xB0  # SBC-4 §6.6.4
DESIGNATOR_NAA: Final = 0x3  # SPC-4 §7.8.6.1 Table 461
DESIGNATOR_RELATIVE_TARGET_PORT: Final = 0x4
DESIGNATOR_TARGET_PORT_GROUP: Final = 0x5
ASSOCIATION_LU: Final = 0x0
ASSOCIATION_TARGET_PORT: Final = 0x1

# SPC-4 §4.5.1: sense data response codes.
_FIXED_FORMATS = (0x70, 0x71)
_DESCRIPTOR_FORMATS = (0x72, 0x73)

_U32 = struct.Struct(">I")


# --- CDBs ------------------------------------------------------------------------------------


def read16(lba: int, blocks: int) -> bytes:
    """READ (16), SBC-4 §5.16."""
    return struct.pack(">BBQIBB", Op.READ_16, 0, lba, blocks, 0, 0)


def write16(lba: int, blocks: int, *, fua: bool = False) -> bytes:
    """WRITE (16), SBC-4 §5.40; FUA makes the write durable before completion."""
    return struct.pack(">BBQIBB", Op.WRITE_16, FUA_BIT if fua else 0, lba, blocks, 0, 0)


def synchronize_cache16() -> bytes:
    """SYNCHRONIZE CACHE (16) of the whole medium (LBA 0, NUMBER OF BLOCKS 0), SBC-4 §5.27."""
    return struct.pack(">BBQIBB", Op.SYNCHRONIZE_CACHE_16, 0, 0, 0, 0, 0)


def write_same16(lba: int, blocks: int, *, unmap: bool) -> bytes:
    """WRITE SAME (16) with one logical block of Data-Out, SBC-4 §5.50."""
    flags = WRITE_SAME_UNMAP_BIT if unmap else 0
    return struct.pack(">BBQIBB", Op.WRITE_SAME_16, flags, lba, blocks, 0, 0)


def unmap(parameter_list_length: int) -> bytes:
    """UNMAP, SBC-4 §5.32 (the parameter list travels as Data-Out)."""
    return struct.pack(">BB4xBHB", Op.UNMAP, 0, 0, parameter_list_length, 0)


def unmap_parameter_list(ranges: Sequence[tuple[int, int]]) -> bytes:
    """UNMAP parameter data for ``(lba, block_count)`` ranges, SBC-4 §5.32.2."""
    descriptors = b"".join(struct.pack(">QI4x", lba, count) for lba, count in ranges)
    header = struct.pack(">HH4x", len(descriptors) + UNMAP_HEADER_LENGTH - 2, len(descriptors))
    return header + descriptors


def read_capacity16() -> bytes:
    """READ CAPACITY (16), SBC-4 §5.21."""
    return struct.pack(
        ">BBQIBB", Op.SERVICE_ACTION_IN_16, SAI_READ_CAPACITY_16, 0, READ_CAPACITY_16_LENGTH, 0, 0
    )


def get_lba_status(lba: int) -> bytes:
    """GET LBA STATUS for one descriptor starting at ``lba``, SBC-4 §5.8."""
    return struct.pack(
        ">BBQIBB",
        Op.SERVICE_ACTION_IN_16,
        SAI_GET_LBA_STATUS,
        lba,
        GET_LBA_STATUS_ALLOCATION_LENGTH,
        0,
        0,
    )


def inquiry_vpd(page: int, allocation_length: int = VPD_ALLOCATION_LENGTH) -> bytes:
    """INQUIRY with EVPD=1 for ``page``, SPC-4 §6.6."""
    return struct.pack(">BBBHB", Op.INQUIRY, EVPD_BIT, page, allocation_length, 0)


def report_target_port_groups(allocation_length: int = RTPG_ALLOCATION_LENGTH) -> bytes:
    """REPORT TARGET PORT GROUPS, extended header format, SPC-4 §6.37."""
    return struct.pack(
        ">BBxxxxIBB",
        Op.MAINTENANCE_IN,
        (RTPG_EXTENDED_FORMAT << 5) | MI_REPORT_TARGET_PORT_GROUPS,
        allocation_length,
        0,
        0,
    )


def test_unit_ready() -> bytes:
    """TEST UNIT READY, SPC-4 §6.47."""
    return bytes(6)


# --- parameter data --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Capacity:
    """READ CAPACITY (16) data (SBC-4 §5.21.2)."""

    block_count: int
    logical_block_size: int
    physical_block_size: int
    thin_provisioned: bool  # LBPME
    unmapped_reads_zero: bool  # LBPRZ


def parse_capacity16(data: bytes) -> Capacity:
    if len(data) < 12:
        raise ScsiStatusError(
            f"READ CAPACITY (16) returned {len(data)} bytes, fewer than 12",
            status=Status.GOOD,
        )
    last_lba, block_size = struct.unpack_from(">QI", data)
    exponent = data[13] & 0x0F if len(data) > 13 else 0
    flags = data[14] if len(data) > 14 else 0
    if block_size == 0 or block_size & (block_size - 1):
        raise ScsiStatusError(
            f"target reports a logical block size of {block_size}", status=Status.GOOD
        )
    return Capacity(
        block_count=last_lba + 1,
        logical_block_size=block_size,
        physical_block_size=block_size << exponent,
        thin_provisioned=bool(flags & 0x80),
        unmapped_reads_zero=bool(flags & 0x40),
    )


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """What VPD page 83h says about the logical unit and the port answering (SPC-4 §7.8.6).

    ``naa`` is the hex NAA designator of the logical unit (the same through every path of one
    volume); ``target_port_group`` and ``relative_target_port`` identify this path's port.
    """

    naa: str | None
    target_port_group: int | None
    relative_target_port: int | None


def parse_device_identification(page: bytes) -> DeviceIdentity:
    """Parse VPD page 83h; unknown designators are skipped, truncated ones end the walk."""
    naa: str | None = None
    group: int | None = None
    port: int | None = None
    if len(page) < 4 or page[1] != VPD_DEVICE_IDENTIFICATION:
        return DeviceIdentity(None, None, None)
    end = min(len(page), 4 + int.from_bytes(page[2:4], "big"))
    offset = 4
    while offset + 4 <= end:
        kind = page[offset + 1] & 0x0F
        association = (page[offset + 1] >> 4) & 0x03
        length = page[offset + 3]
        value = page[offset + 4 : offset + 4 + length]
        if len(value) < length:
            break
        if association == ASSOCIATION_LU and kind == DESIGNATOR_NAA and naa is None:
            naa = value.hex()
        elif association == ASSOCIATION_TARGET_PORT and len(value) >= 4:
            if kind == DESIGNATOR_TARGET_PORT_GROUP:
                group = int.from_bytes(value[2:4], "big")
            elif kind == DESIGNATOR_RELATIVE_TARGET_PORT:
                port = int.from_bytes(value[2:4], "big")
        offset += 4 + length
    return DeviceIdentity(naa, group, port)


@dataclass(frozen=True, slots=True)
class BlockLimits:
    """VPD page B0h (SBC-4 §6.6.4); 0 means "no limit reported"."""

    max_transfer_blocks: int = 0
    max_unmap_blocks: int = 0
    max_unmap_descriptors: int = 0
    max_write_same_blocks: int = 0


def parse_block_limits(page: bytes) -> BlockLimits:
    if len(page) < 16 or page[1] != VPD_BLOCK_LIMITS:
        return BlockLimits()
    max_transfer = _U32.unpack_from(page, 8)[0]
    unmap_blocks = _U32.unpack_from(page, 20)[0] if len(page) >= 24 else 0
    unmap_desc = _U32.unpack_from(page, 24)[0] if len(page) >= 28 else 0
    write_same = struct.unpack_from(">Q", page, 36)[0] if len(page) >= 44 else 0
    return BlockLimits(max_transfer, unmap_blocks, unmap_desc, write_same)


@dataclass(frozen=True, slots=True)
class PortGroup:
    """One target port group descriptor of REPORT TARGET PORT GROUPS (SPC-4 §6.37)."""

    group_id: int
    state: AccessState | int
    preferred: bool
    relative_ports: tuple[int, ...]


def parse_rtpg(data: bytes) -> list[PortGroup]:
    """Parse RTPG data in either header format; truncated descriptors end the walk."""
    if len(data) < 4:
        return []
    length = _U32.unpack_from(data, 0)[0]
    offset = 4
    if len(data) >= 8 and (data[4] >> 4) & 0x07 == RTPG_EXTENDED_FORMAT:
        offset = 8
    end = min(len(data), 4 + length)
    groups: list[PortGroup] = []
    while offset + 8 <= end:
        first = data[offset]
        group_id = int.from_bytes(data[offset + 2 : offset + 4], "big")
        count = data[offset + 7]
        ports_end = offset + 8 + 4 * count
        if ports_end > end:
            break
        ports = tuple(
            int.from_bytes(data[p + 2 : p + 4], "big") for p in range(offset + 8, ports_end, 4)
        )
        raw_state = first & 0x0F
        state: AccessState | int = (
            AccessState(raw_state) if raw_state in AccessState._value2member_map_ else raw_state
        )
        groups.append(PortGroup(group_id, state, bool(first & 0x80), ports))
        offset = ports_end
    return groups


def parse_lba_status(data: bytes, lba: int) -> tuple[int, int, bool] | None:
    """First GET LBA STATUS descriptor as ``(lba, block_count, mapped)``; None when absent or
    when it does not describe ``lba`` (SBC-4 §5.8.2)."""
    if len(data) < 24:
        return None
    start, count, provisioning = struct.unpack_from(">QIB", data, 8)
    if count == 0 or not start <= lba < start + count:
        return None
    # SBC-4 §5.8.2 PROVISIONING STATUS: 0 mapped (or unknown), 1 deallocated, 2 anchored.
    return start, count, (provisioning & 0x0F) == 0


# --- outcomes --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sense:
    key: int
    asc: int
    ascq: int

    @property
    def asc_pair(self) -> tuple[int, int]:
        return (self.asc, self.ascq)


def parse_sense(sense: bytes) -> Sense | None:
    """Sense key, ASC and ASCQ of fixed or descriptor format sense data (SPC-4 §4.5)."""
    if not sense:
        return None
    code = sense[0] & 0x7F
    if code in _FIXED_FORMATS and len(sense) >= 14:
        return Sense(sense[2] & 0x0F, sense[12], sense[13])
    if code in _DESCRIPTOR_FORMATS and len(sense) >= 4:
        return Sense(sense[1] & 0x0F, sense[2], sense[3])
    if code in _FIXED_FORMATS and len(sense) >= 3:
        return Sense(sense[2] & 0x0F, 0, 0)
    return None


class Disposition(Enum):
    """What to do with a finished command."""

    DONE = "done"
    #: Transient on this path: re-issue here after a short pause (UNIT ATTENTION, BUSY, ...).
    RETRY = "retry"
    #: The unit attention says capacity or ALUA states changed: refresh, then re-issue.
    RETRY_REFRESH = "retry_refresh"
    #: This path cannot serve I/O now (ALUA standby/unavailable/transitioning): re-check
    #: REPORT TARGET PORT GROUPS and re-issue on the active path.
    FAILOVER = "failover"
    #: Final error; raise :func:`outcome_error`.
    FAIL = "fail"


#: SPC-4 §5.15.2.4: the NOT READY codes of ports that cannot serve I/O in their ALUA state.
ALUA_NOT_READY: Final = frozenset(
    {LU_NOT_ACCESSIBLE_TRANSITION, LU_NOT_ACCESSIBLE_STANDBY, LU_NOT_ACCESSIBLE_UNAVAILABLE}
)


def classify(status: int, sense: Sense | None) -> Disposition:
    """The one decision of what a SCSI status means to the initiator.

    - UNIT ATTENTION, BUSY, TASK SET FULL, ABORTED COMMAND: transient, re-issue (SAM-5 §5.3).
      Unit attentions for changed capacity or ALUA states also refresh what we cached.
    - NOT READY 04/0A, 04/0B, 04/0C: the port's ALUA state forbids I/O; go to another path.
    - everything else that is not GOOD: final.
    """
    if status in (Status.GOOD, Status.CONDITION_MET):
        return Disposition.DONE
    if status in (Status.BUSY, Status.TASK_SET_FULL, Status.TASK_ABORTED):
        return Disposition.RETRY
    if status != Status.CHECK_CONDITION or sense is None:
        return Disposition.FAIL
    if sense.key == SenseKey.UNIT_ATTENTION:
        if sense.asc_pair in (ASYMMETRIC_ACCESS_STATE_CHANGED, CAPACITY_DATA_HAS_CHANGED):
            return Disposition.RETRY_REFRESH
        return Disposition.RETRY
    if sense.key == SenseKey.ABORTED_COMMAND:
        return Disposition.RETRY
    if sense.key == SenseKey.NOT_READY and sense.asc_pair in ALUA_NOT_READY:
        return Disposition.FAILOVER
    if sense.key in (SenseKey.NO_SENSE, SenseKey.RECOVERED_ERROR):
        return Disposition.DONE
    return Disposition.FAIL


def outcome_error(
    command: str, status: int, sense: Sense | None, lba: int | None
) -> BlockyardError:
    """The blockyard error for a final SCSI failure (the inverse of
    :func:`blockyard.scsi.errmap.error_to_result`, so a remote volume fails like a local one)."""
    where = f"{command} at LBA {lba}" if lba is not None else command
    if sense is None:
        return ScsiStatusError(
            f"{where} failed with SCSI status {status:#04x}; check the target's log",
            status=status,
        )
    text = f"sense {sense.key:x}/{sense.asc:02x}/{sense.ascq:02x}"
    if sense.key == SenseKey.ILLEGAL_REQUEST:
        if sense.asc_pair == LBA_OUT_OF_RANGE:
            return OutOfRangeError(f"{where} reaches past the end of the volume ({text})")
        return InvalidArgumentError(f"{where} was refused by the target as invalid ({text})")
    if (
        sense.key == SenseKey.DATA_PROTECT
        and sense.asc_pair == SPACE_ALLOCATION_FAILED_WRITE_PROTECT
    ):
        return NoSpaceError(f"{where}: the volume server is out of space ({text}); free space")
    return ScsiStatusError(
        f"{where} failed on the target ({text}); check the volume server's log",
        status=status,
        sense_key=sense.key,
        asc=sense.asc,
        ascq=sense.ascq,
    )
