"""The SCSI PDUs of RFC 7143: SCSI Command (§11.3), SCSI Response (§11.4), Data-Out and Data-In
(§11.7) and R2T (§11.8), with their flag bits and codes, the SCSI Command's AHS (§11.2.2) and
the SCSI Response's sense segment (§11.4.7.2).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from blockyard.blockdev import BytesLike
from blockyard.iscsi.errors import LocalProtocolError, PduFormatError, RejectReason
from blockyard.iscsi.pdu_header import (
    _PAD,
    FINAL_BIT,
    IMMEDIATE_BIT,
    RESERVED_TAG,
    Opcode,
    _lengths,
)

CDB_IN_BHS = 16  # RFC 7143 §11.3.5: the BHS holds the first 16 CDB bytes
MAX_CDB_LENGTH = 260  # SPC-4 §4.2.5: a variable-length CDB is at most 260 bytes

AHS_TYPE_EXTENDED_CDB = 1  # RFC 7143 §11.2.2.2
AHS_TYPE_BIDI_READ_LENGTH = 2  # RFC 7143 §11.2.2.2
_BIDI_READ_AHS_LENGTH = 5  # RFC 7143 §11.2.2.4: AHSLength is 0x0005 (reserved byte + 4 bytes)

# SCSI Command flags, RFC 7143 §11.3.1
SCSI_CMD_READ = 0x40
SCSI_CMD_WRITE = 0x20
SCSI_CMD_ATTR_MASK = 0x07

# SCSI Response flags, RFC 7143 §11.4.1 and §11.4.5
SCSI_RSP_BIDI_OVERFLOW = 0x10  # o bit
SCSI_RSP_BIDI_UNDERFLOW = 0x08  # u bit
SCSI_RSP_OVERFLOW = 0x04  # O bit
SCSI_RSP_UNDERFLOW = 0x02  # U bit

# SCSI Data-In flags, RFC 7143 §11.7.1 - §11.7.4
DATA_IN_ACK = 0x40  # A bit
DATA_IN_OVERFLOW = 0x04  # O bit
DATA_IN_UNDERFLOW = 0x02  # U bit
DATA_IN_STATUS = 0x01  # S bit


class TaskAttribute(IntEnum):
    """SCSI Command ATTR values, RFC 7143 §11.3.1.4."""

    UNTAGGED = 0
    SIMPLE = 1
    ORDERED = 2
    HEAD_OF_QUEUE = 3
    ACA = 4


class ScsiResponseCode(IntEnum):
    """SCSI Response "Response" field, RFC 7143 §11.4.3."""

    COMMAND_COMPLETED_AT_TARGET = 0x00
    TARGET_FAILURE = 0x01


# BHS layouts, following the byte diagram of each cited section (see pdu_header._lengths).
# They are defined here, in the module that packs them, and not imported: CPython 3.11 compiles
# ``_X.pack(...)`` as a method call only on a name that is not imported into the module.
_SCSI_COMMAND = struct.Struct(">BB2xIQIIII16s")  # RFC 7143 §11.3
_DATA_OUT = struct.Struct(">BB2xIQII4xI4xII4x")  # RFC 7143 §11.7
_SCSI_RESPONSE = struct.Struct(">BBBBI8xIIIIIIII")  # RFC 7143 §11.4
_DATA_IN = struct.Struct(">BBxBIQIIIIIIII")  # RFC 7143 §11.7
_R2T = struct.Struct(">BB2xIQIIIIIIII")  # RFC 7143 §11.8
#: The same layouts, public for the target's per-command fast path, which packs and unpacks
#: them directly instead of going through the dataclasses (RFC 7143 §11.3, §11.4, §11.7).
#: SCSI_COMMAND_FIELDS stops before the CDB: opcode, flags, lengths, LUN, ITT, EDTL, CmdSN,
#: ExpStatSN.
SCSI_COMMAND_FIELDS = struct.Struct(">BB2xIQIIII")
SCSI_RESPONSE_BHS = _SCSI_RESPONSE
DATA_IN_BHS = _DATA_IN
_AHS_HEADER = struct.Struct(">HBx")  # RFC 7143 §11.2.2: AHSLength, AHSType, reserved/specific
_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class ScsiCommand:
    """SCSI Command, RFC 7143 §11.3.

    ``cdb`` is the whole CDB: up to 16 bytes travel in the BHS (zero-padded to 16 on the wire, so
    a decoded CDB is at least 16 bytes long), the rest in an Extended CDB AHS.
    ``bidi_read_expected_length`` is the Bidirectional Read Expected Data Transfer Length AHS
    (RFC 7143 §11.2.2.4), None when absent.
    """

    opcode: ClassVar[Opcode] = Opcode.SCSI_COMMAND
    itt: int = 0
    cdb: bytes = bytes(CDB_IN_BHS)
    lun: int = 0
    expected_data_transfer_length: int = 0
    cmd_sn: int = 0
    exp_stat_sn: int = 0
    final: bool = True
    read: bool = False
    write: bool = False
    task_attr: int = TaskAttribute.SIMPLE
    immediate: bool = False
    bidi_read_expected_length: int | None = None
    data: BytesLike = b""

    @property
    def edtl(self) -> int:
        """Short spec name for ``expected_data_transfer_length``."""
        return self.expected_data_transfer_length

    def ahs_bytes(self) -> bytes:
        parts: list[bytes] = []
        if len(self.cdb) > CDB_IN_BHS:
            extra = self.cdb[CDB_IN_BHS:]
            if len(self.cdb) > MAX_CDB_LENGTH:
                raise LocalProtocolError(
                    f"CDB of {len(self.cdb)} bytes exceeds {MAX_CDB_LENGTH} (SPC-4 §4.2.5)"
                )
            # AHSLength counts the reserved byte too: CDB length - 15 (RFC 7143 §11.2.2.3).
            parts.append(_AHS_HEADER.pack(len(extra) + 1, AHS_TYPE_EXTENDED_CDB))
            parts.append(extra)
            parts.append(_PAD[-len(extra) & 3])
        if self.bidi_read_expected_length is not None:
            parts.append(_AHS_HEADER.pack(_BIDI_READ_AHS_LENGTH, AHS_TYPE_BIDI_READ_LENGTH))
            parts.append(_U32.pack(self.bidi_read_expected_length))
        return b"".join(parts)

    def encode_bhs(self, total_ahs_words: int, data_length: int) -> bytes:
        if not self.cdb:
            raise LocalProtocolError("a SCSI Command needs a CDB of at least 1 byte")
        if not 0 <= self.task_attr <= SCSI_CMD_ATTR_MASK:
            raise LocalProtocolError(f"task attribute {self.task_attr} is not 3 bits")
        flags = (
            (FINAL_BIT if self.final else 0)
            | (SCSI_CMD_READ if self.read else 0)
            | (SCSI_CMD_WRITE if self.write else 0)
            | self.task_attr
        )
        return _SCSI_COMMAND.pack(
            Opcode.SCSI_COMMAND | (IMMEDIATE_BIT if self.immediate else 0),
            flags,
            _lengths(total_ahs_words, data_length),
            self.lun,
            self.itt,
            self.expected_data_transfer_length,
            self.cmd_sn,
            self.exp_stat_sn,
            self.cdb[:CDB_IN_BHS],
        )


@dataclass(frozen=True, slots=True)
class DataOut:
    """SCSI Data-Out, RFC 7143 §11.7. ``ttt`` is RESERVED_TAG for unsolicited data."""

    opcode: ClassVar[Opcode] = Opcode.SCSI_DATA_OUT
    itt: int = 0
    ttt: int = RESERVED_TAG
    lun: int = 0
    exp_stat_sn: int = 0
    data_sn: int = 0
    buffer_offset: int = 0
    final: bool = False
    data: BytesLike = b""

    def encode_bhs(self, total_ahs_words: int, data_length: int) -> bytes:
        return _DATA_OUT.pack(
            Opcode.SCSI_DATA_OUT,
            FINAL_BIT if self.final else 0,
            _lengths(total_ahs_words, data_length),
            self.lun,
            self.itt,
            self.ttt,
            self.exp_stat_sn,
            self.data_sn,
            self.buffer_offset,
        )


@dataclass(frozen=True, slots=True)
class ScsiResponse:
    """SCSI Response, RFC 7143 §11.4. ``data`` is the sense segment (see :func:`sense_segment`)."""

    opcode: ClassVar[Opcode] = Opcode.SCSI_RESPONSE
    itt: int = 0
    status: int = 0
    response: int = ScsiResponseCode.COMMAND_COMPLETED_AT_TARGET
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    exp_data_sn: int = 0
    snack_tag: int = 0
    residual_overflow: bool = False
    residual_underflow: bool = False
    bidi_read_residual_overflow: bool = False
    bidi_read_residual_underflow: bool = False
    residual_count: int = 0
    bidi_read_residual_count: int = 0
    data: BytesLike = b""

    def encode_bhs(self, total_ahs_words: int, data_length: int) -> bytes:
        if self.residual_overflow and self.residual_underflow:
            raise LocalProtocolError("O and U are mutually exclusive (RFC 7143 §11.4.1)")
        if self.bidi_read_residual_overflow and self.bidi_read_residual_underflow:
            raise LocalProtocolError("o and u are mutually exclusive (RFC 7143 §11.4.1)")
        flags = (
            FINAL_BIT
            | (SCSI_RSP_BIDI_OVERFLOW if self.bidi_read_residual_overflow else 0)
            | (SCSI_RSP_BIDI_UNDERFLOW if self.bidi_read_residual_underflow else 0)
            | (SCSI_RSP_OVERFLOW if self.residual_overflow else 0)
            | (SCSI_RSP_UNDERFLOW if self.residual_underflow else 0)
        )
        return _SCSI_RESPONSE.pack(
            Opcode.SCSI_RESPONSE,
            flags,
            self.response,
            self.status,
            _lengths(total_ahs_words, data_length),
            self.itt,
            self.snack_tag,
            self.stat_sn,
            self.exp_cmd_sn,
            self.max_cmd_sn,
            self.exp_data_sn,
            self.bidi_read_residual_count,
            self.residual_count,
        )


@dataclass(frozen=True, slots=True)
class DataIn:
    """SCSI Data-In, RFC 7143 §11.7. With ``status_present`` (S bit) it also ends the command."""

    opcode: ClassVar[Opcode] = Opcode.SCSI_DATA_IN
    itt: int = 0
    ttt: int = RESERVED_TAG
    lun: int = 0
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    data_sn: int = 0
    buffer_offset: int = 0
    residual_count: int = 0
    status: int = 0
    final: bool = False
    acknowledge: bool = False
    status_present: bool = False
    residual_overflow: bool = False
    residual_underflow: bool = False
    data: BytesLike = b""

    def encode_bhs(self, total_ahs_words: int, data_length: int) -> bytes:
        if self.status_present and not self.final:
            raise LocalProtocolError("S=1 requires F=1 in Data-In (RFC 7143 §11.7.4)")
        if self.residual_overflow and self.residual_underflow:
            raise LocalProtocolError("O and U are mutually exclusive (RFC 7143 §11.7.5)")
        flags = (
            (FINAL_BIT if self.final else 0)
            | (DATA_IN_ACK if self.acknowledge else 0)
            | (DATA_IN_OVERFLOW if self.residual_overflow else 0)
            | (DATA_IN_UNDERFLOW if self.residual_underflow else 0)
            | (DATA_IN_STATUS if self.status_present else 0)
        )
        return _DATA_IN.pack(
            Opcode.SCSI_DATA_IN,
            flags,
            self.status,
            _lengths(total_ahs_words, data_length),
            self.lun,
            self.itt,
            self.ttt,
            self.stat_sn,
            self.exp_cmd_sn,
            self.max_cmd_sn,
            self.data_sn,
            self.buffer_offset,
            self.residual_count,
        )


@dataclass(frozen=True, slots=True)
class R2T:
    """Ready To Transfer, RFC 7143 §11.8."""

    opcode: ClassVar[Opcode] = Opcode.R2T
    itt: int = 0
    ttt: int = 0
    lun: int = 0
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    r2t_sn: int = 0
    buffer_offset: int = 0
    desired_data_transfer_length: int = 0
    data: BytesLike = b""

    def encode_bhs(self, total_ahs_words: int, data_length: int) -> bytes:
        return _R2T.pack(
            Opcode.R2T,
            FINAL_BIT,
            _lengths(total_ahs_words, data_length),
            self.lun,
            self.itt,
            self.ttt,
            self.stat_sn,
            self.exp_cmd_sn,
            self.max_cmd_sn,
            self.r2t_sn,
            self.buffer_offset,
            self.desired_data_transfer_length,
        )


def sense_segment(sense_data: bytes, response_data: bytes = b"") -> bytes:
    """SCSI Response data segment: SenseLength (2 bytes), sense data, response data.

    RFC 7143 §11.4.7.2.
    """
    if len(sense_data) > 0xFFFF:
        raise LocalProtocolError(f"sense data of {len(sense_data)} bytes exceeds 65535")
    return len(sense_data).to_bytes(2, "big") + sense_data + response_data


def parse_sense_segment(segment: BytesLike) -> bytes:
    """Return the sense data of a SCSI Response data segment (RFC 7143 §11.4.7.2)."""
    if len(segment) == 0:
        return b""
    if len(segment) < 2:
        raise PduFormatError(
            "SCSI Response data segment is shorter than its SenseLength field",
            reject_reason=RejectReason.INVALID_PDU_FIELD,
        )
    sense_length = int.from_bytes(segment[:2], "big")
    if sense_length + 2 > len(segment):
        raise PduFormatError(
            f"SenseLength {sense_length} runs past the {len(segment)}-byte data segment",
            reject_reason=RejectReason.INVALID_PDU_FIELD,
        )
    return bytes(segment[2 : 2 + sense_length])
