"""iSCSI PDU types and their wire codec (RFC 7143 §11).

Every PDU is a frozen dataclass named after the spec's PDU, with the spec's field nouns in
snake_case. :func:`encode_pdu_buffers` turns one into a list of buffers ready for ``writev``
(header, data segment, padding, digests) without copying the data segment;
:func:`encode_pdu` joins them. :func:`decode_pdu` turns one complete, digest-checked PDU back
into a dataclass; the streaming framer around it is :class:`blockyard.iscsi.reader.PduReader`.

Numbers on the wire are big-endian (RFC 7143 §11.1), except the CRC32C digests, which are sent
least significant byte first (RFC 7143 Appendix B.4 shows 32 zero bytes as ``aa 36 91 8a``).

Reserved fields are sent as zero and ignored on receipt (RFC 7143 §11.2). The codec checks
what framing and field meaning need; sequence numbers and task state are the session's job.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, TypeAlias

import crc32c

from blockyard.blockdev import BytesLike
from blockyard.iscsi.errors import (
    LocalProtocolError,
    PduFormatError,
    RejectReason,
    UnsupportedOpcodeError,
)

# --- wire constants --------------------------------------------------------------------------

BHS_LENGTH = 48  # RFC 7143 §11.2.1: the Basic Header Segment is always 48 bytes
DIGEST_LENGTH = 4  # RFC 7143 §11.2.3 / §11.2.4: CRC32C header and data digests
MAX_DATA_SEGMENT_LENGTH = (1 << 24) - 1  # RFC 7143 §11.2.1.5: DataSegmentLength is 3 bytes
MAX_TOTAL_AHS_LENGTH = 255 * 4  # RFC 7143 §11.2.1.4: TotalAHSLength counts 4-byte words in 1 byte
RESERVED_TAG = 0xFFFFFFFF  # RFC 7143 §11.2.1.8: ITT/TTT value meaning "no task"
CDB_IN_BHS = 16  # RFC 7143 §11.3.5: the BHS holds the first 16 CDB bytes
MAX_CDB_LENGTH = 260  # SPC-4 §4.2.5: a variable-length CDB is at most 260 bytes

AHS_TYPE_EXTENDED_CDB = 1  # RFC 7143 §11.2.2.2
AHS_TYPE_BIDI_READ_LENGTH = 2  # RFC 7143 §11.2.2.2
_BIDI_READ_AHS_LENGTH = 5  # RFC 7143 §11.2.2.4: AHSLength is 0x0005 (reserved byte + 4 bytes)

OPCODE_MASK = 0x3F  # RFC 7143 §11.2.1.2: low 6 bits of byte 0
IMMEDIATE_BIT = 0x40  # RFC 7143 §11.2.1.1: I bit
FINAL_BIT = 0x80  # RFC 7143 §11.2.1.3: F bit

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

# Login and Text flags, RFC 7143 §11.10.1, §11.10.2, §11.12.1 - §11.12.3
LOGIN_TRANSIT = 0x80  # T bit
CONTINUE_BIT = 0x40  # C bit (Login and Text)

_PAD = (b"", b"\x00", b"\x00\x00", b"\x00\x00\x00")


class Opcode(IntEnum):
    """PDU opcodes, RFC 7143 §11.2.1.2."""

    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    SCSI_DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK_REQUEST = 0x10
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    SCSI_DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


#: Opcodes an initiator sends (RFC 7143 §11.2.1.2); all of 0x00-0x1f travel initiator-to-target.
INITIATOR_OPCODES = frozenset(op for op in Opcode if op < 0x20)
#: Opcodes a target sends; all of 0x20-0x3f travel target-to-initiator.
TARGET_OPCODES = frozenset(op for op in Opcode if op >= 0x20)


class LoginStage(IntEnum):
    """CSG/NSG stage codes, RFC 7143 §11.12.3."""

    SECURITY_NEGOTIATION = 0
    LOGIN_OPERATIONAL_NEGOTIATION = 1
    FULL_FEATURE_PHASE = 3


class TaskAttribute(IntEnum):
    """SCSI Command ATTR values, RFC 7143 §11.3.1.4."""

    UNTAGGED = 0
    SIMPLE = 1
    ORDERED = 2
    HEAD_OF_QUEUE = 3
    ACA = 4


class LogoutReason(IntEnum):
    """Logout Request reason codes, RFC 7143 §11.14.1."""

    CLOSE_SESSION = 0
    CLOSE_CONNECTION = 1
    REMOVE_CONNECTION_FOR_RECOVERY = 2


class LogoutResponseCode(IntEnum):
    """Logout Response codes, RFC 7143 §11.15.1."""

    CLOSED_SUCCESSFULLY = 0
    CID_NOT_FOUND = 1
    RECOVERY_NOT_SUPPORTED = 2
    CLEANUP_FAILED = 3


class TaskManagementFunction(IntEnum):
    """Task Management Function codes, RFC 7143 §11.5.1."""

    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TaskManagementResponseCode(IntEnum):
    """Task Management Function Response codes, RFC 7143 §11.6.1."""

    FUNCTION_COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGNMENT_NOT_SUPPORTED = 4
    FUNCTION_NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    FUNCTION_REJECTED = 255


class ScsiResponseCode(IntEnum):
    """SCSI Response "Response" field, RFC 7143 §11.4.3."""

    COMMAND_COMPLETED_AT_TARGET = 0x00
    TARGET_FAILURE = 0x01


class AsyncEvent(IntEnum):
    """Asynchronous Message events, RFC 7143 §11.9.1."""

    SCSI_ASYNC_EVENT = 0
    LOGOUT_REQUESTED = 1
    CONNECTION_WILL_DROP = 2
    SESSION_WILL_DROP = 3
    RENEGOTIATE = 4
    VENDOR_SPECIFIC = 255


# --- PDU types -------------------------------------------------------------------------------
# Struct layouts follow the byte diagrams of each cited section. "I" at offset 4 packs
# TotalAHSLength (1 byte) and DataSegmentLength (3 bytes) together.

_NOP_OUT = struct.Struct(">BB2xIQIIII16x")  # RFC 7143 §11.18
_SCSI_COMMAND = struct.Struct(">BB2xIQIIII16s")  # RFC 7143 §11.3
_TASK_MGMT_REQUEST = struct.Struct(">BB2xIQIIIIII8x")  # RFC 7143 §11.5
_LOGIN_REQUEST = struct.Struct(">BBBBI6sHIH2xII16x")  # RFC 7143 §11.12
_TEXT_REQUEST = struct.Struct(">BB2xIQIIII16x")  # RFC 7143 §11.10
_DATA_OUT = struct.Struct(">BB2xIQII4xI4xII4x")  # RFC 7143 §11.7
_LOGOUT_REQUEST = struct.Struct(">BB2xI8xIH2xII16x")  # RFC 7143 §11.14
_SNACK_REQUEST = struct.Struct(">BB2xIQII4xI8xII")  # RFC 7143 §11.16
_NOP_IN = struct.Struct(">BB2xIQIIIII12x")  # RFC 7143 §11.19
_SCSI_RESPONSE = struct.Struct(">BBBBI8xIIIIIIII")  # RFC 7143 §11.4
_TASK_MGMT_RESPONSE = struct.Struct(">BBBxI8xI4xIII12x")  # RFC 7143 §11.6
_LOGIN_RESPONSE = struct.Struct(">BBBBI6sHI4xIIIBB10x")  # RFC 7143 §11.13
_TEXT_RESPONSE = struct.Struct(">BB2xIQIIIII12x")  # RFC 7143 §11.11
_DATA_IN = struct.Struct(">BBxBIQIIIIIIII")  # RFC 7143 §11.7
_LOGOUT_RESPONSE = struct.Struct(">BBBxI8xI4xIII4xHH4x")  # RFC 7143 §11.15
_R2T = struct.Struct(">BB2xIQIIIIIIII")  # RFC 7143 §11.8
_ASYNC_MESSAGE = struct.Struct(">BB2xIQI4xIIIBBHHH4x")  # RFC 7143 §11.9
_REJECT = struct.Struct(">BBBxI8xI4xIIII8x")  # RFC 7143 §11.17
#: The same layouts, public for the target's per-command fast path, which packs and unpacks
#: them directly instead of going through the dataclasses (RFC 7143 §11.3, §11.4, §11.7).
#: SCSI_COMMAND_FIELDS stops before the CDB: opcode, flags, lengths, LUN, ITT, EDTL, CmdSN,
#: ExpStatSN.
SCSI_COMMAND_FIELDS = struct.Struct(">BB2xIQIIII")
SCSI_RESPONSE_BHS = _SCSI_RESPONSE
DATA_IN_BHS = _DATA_IN
_AHS_HEADER = struct.Struct(">HBx")  # RFC 7143 §11.2.2: AHSLength, AHSType, reserved/specific
_U32 = struct.Struct(">I")
_DIGEST = struct.Struct("<I")

_ISID_MAX = (1 << 48) - 1


def _lengths(total_ahs_words: int, data_length: int) -> int:
    return (total_ahs_words << 24) | data_length


def _isid_bytes(isid: int) -> bytes:
    if not 0 <= isid <= _ISID_MAX:
        raise LocalProtocolError(f"ISID {isid:#x} does not fit in 6 bytes (RFC 7143 §11.12.5)")
    return isid.to_bytes(6, "big")


@dataclass(frozen=True, slots=True)
class NopOut:
    """NOP-Out, RFC 7143 §11.18. ``ttt`` is RESERVED_TAG unless answering a NOP-In ping."""

    opcode: ClassVar[Opcode] = Opcode.NOP_OUT
    itt: int = RESERVED_TAG
    ttt: int = RESERVED_TAG
    cmd_sn: int = 0
    exp_stat_sn: int = 0
    lun: int = 0
    immediate: bool = False
    data: BytesLike = b""

    def encode_bhs(self, total_ahs_words: int, data_length: int) -> bytes:
        return _NOP_OUT.pack(
            Opcode.NOP_OUT | (IMMEDIATE_BIT if self.immediate else 0),
            FINAL_BIT,
            _lengths(total_ahs_words, data_length),
            self.lun,
            self.itt,
            self.ttt,
            self.cmd_sn,
            self.exp_stat_sn,
        )


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
class TaskManagementRequest:
    """Task Management Function Request, RFC 7143 §11.5."""

    opcode: ClassVar[Opcode] = Opcode.TASK_MGMT_REQUEST
    itt: int = 0
    function: int = TaskManagementFunction.ABORT_TASK
    lun: int = 0
    referenced_task_tag: int = RESERVED_TAG
    cmd_sn: int = 0
    exp_stat_sn: int = 0
    ref_cmd_sn: int = 0
    exp_data_sn: int = 0
    immediate: bool = False
    data: BytesLike = b""

    def encode_bhs(self, total_ahs_words: int, data_length: int) -> bytes:
        if not 0 <= self.function <= 0x7F:
            raise LocalProtocolError(f"task management function {self.function} is not 7 bits")
        return _TASK_MGMT_REQUEST.pack(
            Opcode.TASK_MGMT_REQUEST | (IMMEDIATE_BIT if self.immediate else 0),
            FINAL_BIT | self.function,
            _lengths(total_ahs_words, data_length),
            self.lun,
            self.itt,
            self.referenced_task_tag,
            self.cmd_sn,
            self.exp_stat_sn,
            self.ref_cmd_sn,
            self.exp_data_sn,
        )


@dataclass(frozen=True, slots=True)
class LoginRequest:
    """Login Request, RFC 7143 §11.12. Always sent with the I bit set (§11.12)."""

    opcode: ClassVar[Opcode] = Opcode.LOGIN_REQUEST
    itt: int = 0
    isid: int = 0
    tsih: int = 0
    cid: int = 0
    cmd_sn: int = 0
    exp_stat_sn: int = 0
    transit: bool = False
    cont: bool = False
    csg: int = LoginStage.SECURITY_NEGOTIATION
    nsg: int = 0
    version_max: int = 0
    version_min: int = 0
    data: BytesLike = b""

    def encode_bhs(self, total_ahs_words: int, data_length: int) -> bytes:
        if not (0 <= self.csg <= 3 and 0 <= self.nsg <= 3):
            raise LocalProtocolError("CSG and NSG are 2-bit fields (RFC 7143 §11.12.3)")
        flags = (
            (LOGIN_TRANSIT if self.transit else 0)
            | (CONTINUE_BIT if self.cont else 0)
            | (self.csg << 2)
            | self.nsg
        )
        return _LOGIN_REQUEST.pack(
            Opcode.LOGIN_REQUEST | IMMEDIATE_BIT,
            flags,
            self.version_max,
            self.version_min,
            _lengths(total_ahs_words, data_length),
            _isid_bytes(self.isid),
            self.tsih,
            self.itt,
            self.cid,
            self.cmd_sn,
            self.exp_stat_sn,
        )


@dataclass(frozen=True, slots=True)
class TextRequest:
    """Text Request, RFC 7143 §11.10. ``cont`` set means more text follows (F must be 0)."""

    opcode: ClassVar[Opcode] = Opcode.TEXT_REQUEST
    itt: int = 0
    ttt: int = RESERVED_TAG
    cmd_sn: int = 0
    exp_stat_sn: int = 0
    lun: int = 0
    final: bool = True
    cont: bool = False
    immediate: bool = False
    data: BytesLike = b""

    def encode_bhs(self, total_ahs_words: int, data_length: int) -> bytes:
        if self.final and self.cont:
            raise LocalProtocolError("a Text Request with C=1 must have F=0 (RFC 7143 §11.10.2)")
        return _TEXT_REQUEST.pack(
            Opcode.TEXT_REQUEST | (IMMEDIATE_BIT if self.immediate else 0),
            (FINAL_BIT if self.final else 0) | (CONTINUE_BIT if self.cont else 0),
            _lengths(total_ahs_words, data_length),
            self.lun,
            self.itt,
            self.ttt,
            self.cmd_sn,
            self.exp_stat_sn,
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
class LogoutRequest:
    """Logout Request, RFC 7143 §11.14."""

    opcode: ClassVar[Opcode] = Opcode.LOGOUT_REQUEST
    itt: int = 0
    reason: int = LogoutReason.CLOSE_SESSION
    cid: int = 0
    cmd_sn: int = 0
    exp_stat_sn: int = 0
    immediate: bool = False
    data: BytesLike = b""

    def encode_bhs(self, total_ahs_words: int, data_length: int) -> bytes:
        if not 0 <= self.reason <= 0x7F:
            raise LocalProtocolError(f"logout reason {self.reason} is not 7 bits")
        return _LOGOUT_REQUEST.pack(
            Opcode.LOGOUT_REQUEST | (IMMEDIATE_BIT if self.immediate else 0),
            FINAL_BIT | self.reason,
            _lengths(total_ahs_words, data_length),
            self.itt,
            self.cid,
            self.cmd_sn,
            self.exp_stat_sn,
        )


@dataclass(frozen=True, slots=True)
class SnackRequest:
    """SNACK Request, RFC 7143 §11.16. Decoded only so that it can be rejected at ERL 0."""

    opcode: ClassVar[Opcode] = Opcode.SNACK_REQUEST
    itt: int = RESERVED_TAG
    snack_type: int = 0
    lun: int = 0
    ttt: int = RESERVED_TAG
    exp_stat_sn: int = 0
    beg_run: int = 0
    run_length: int = 0
    data: BytesLike = b""

    def encode_bhs(self, total_ahs_words: int, data_length: int) -> bytes:
        if not 0 <= self.snack_type <= 0x0F:
            raise LocalProtocolError(f"SNACK type {self.snack_type} is not 4 bits")
        return _SNACK_REQUEST.pack(
            Opcode.SNACK_REQUEST,
            FINAL_BIT | self.snack_type,
            _lengths(total_ahs_words, data_length),
            self.lun,
            self.itt,
            self.ttt,
            self.exp_stat_sn,
            self.beg_run,
            self.run_length,
        )


@dataclass(frozen=True, slots=True)
class NopIn:
    """NOP-In, RFC 7143 §11.19. A target ping carries itt=RESERVED_TAG and a real ``ttt``."""

    opcode: ClassVar[Opcode] = Opcode.NOP_IN
    itt: int = RESERVED_TAG
    ttt: int = RESERVED_TAG
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    lun: int = 0
    data: BytesLike = b""

    def encode_bhs(self, total_ahs_words: int, data_length: int) -> bytes:
        return _NOP_IN.pack(
            Opcode.NOP_IN,
            FINAL_BIT,
            _lengths(total_ahs_words, data_length),
            self.lun,
            self.itt,
            self.ttt,
            self.stat_sn,
            self.exp_cmd_sn,
            self.max_cmd_sn,
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
class TaskManagementResponse:
    """Task Management Function Response, RFC 7143 §11.6."""

    opcode: ClassVar[Opcode] = Opcode.TASK_MGMT_RESPONSE
    itt: int = 0
    response: int = TaskManagementResponseCode.FUNCTION_COMPLETE
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    data: BytesLike = b""

    def encode_bhs(self, total_ahs_words: int, data_length: int) -> bytes:
        return _TASK_MGMT_RESPONSE.pack(
            Opcode.TASK_MGMT_RESPONSE,
            FINAL_BIT,
            self.response,
            _lengths(total_ahs_words, data_length),
            self.itt,
            self.stat_sn,
            self.exp_cmd_sn,
            self.max_cmd_sn,
        )


@dataclass(frozen=True, slots=True)
class LoginResponse:
    """Login Response, RFC 7143 §11.13. ``status`` is Status-Class << 8 | Status-Detail."""

    opcode: ClassVar[Opcode] = Opcode.LOGIN_RESPONSE
    itt: int = 0
    isid: int = 0
    tsih: int = 0
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    status: int = 0
    transit: bool = False
    cont: bool = False
    csg: int = LoginStage.SECURITY_NEGOTIATION
    nsg: int = 0
    version_max: int = 0
    version_active: int = 0
    data: BytesLike = b""

    @property
    def status_class(self) -> int:
        return self.status >> 8

    @property
    def status_detail(self) -> int:
        return self.status & 0xFF

    def encode_bhs(self, total_ahs_words: int, data_length: int) -> bytes:
        if not (0 <= self.csg <= 3 and 0 <= self.nsg <= 3):
            raise LocalProtocolError("CSG and NSG are 2-bit fields (RFC 7143 §11.13.3)")
        if not 0 <= self.status <= 0xFFFF:
            raise LocalProtocolError(f"login status {self.status:#x} is not 2 bytes")
        flags = (
            (LOGIN_TRANSIT if self.transit else 0)
            | (CONTINUE_BIT if self.cont else 0)
            | (self.csg << 2)
            | self.nsg
        )
        return _LOGIN_RESPONSE.pack(
            Opcode.LOGIN_RESPONSE,
            flags,
            self.version_max,
            self.version_active,
            _lengths(total_ahs_words, data_length),
            _isid_bytes(self.isid),
            self.tsih,
            self.itt,
            self.stat_sn,
            self.exp_cmd_sn,
            self.max_cmd_sn,
            self.status >> 8,
            self.status & 0xFF,
        )


@dataclass(frozen=True, slots=True)
class TextResponse:
    """Text Response, RFC 7143 §11.11."""

    opcode: ClassVar[Opcode] = Opcode.TEXT_RESPONSE
    itt: int = 0
    ttt: int = RESERVED_TAG
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    lun: int = 0
    final: bool = True
    cont: bool = False
    data: BytesLike = b""

    def encode_bhs(self, total_ahs_words: int, data_length: int) -> bytes:
        if self.final and self.cont:
            raise LocalProtocolError("a Text Response with C=1 must have F=0 (RFC 7143 §11.11.2)")
        return _TEXT_RESPONSE.pack(
            Opcode.TEXT_RESPONSE,
            (FINAL_BIT if self.final else 0) | (CONTINUE_BIT if self.cont else 0),
            _lengths(total_ahs_words, data_length),
            self.lun,
            self.itt,
            self.ttt,
            self.stat_sn,
            self.exp_cmd_sn,
            self.max_cmd_sn,
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
class LogoutResponse:
    """Logout Response, RFC 7143 §11.15."""

    opcode: ClassVar[Opcode] = Opcode.LOGOUT_RESPONSE
    itt: int = 0
    response: int = LogoutResponseCode.CLOSED_SUCCESSFULLY
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    time2wait: int = 0
    time2retain: int = 0
    data: BytesLike = b""

    def encode_bhs(self, total_ahs_words: int, data_length: int) -> bytes:
        return _LOGOUT_RESPONSE.pack(
            Opcode.LOGOUT_RESPONSE,
            FINAL_BIT,
            self.response,
            _lengths(total_ahs_words, data_length),
            self.itt,
            self.stat_sn,
            self.exp_cmd_sn,
            self.max_cmd_sn,
            self.time2wait,
            self.time2retain,
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


@dataclass(frozen=True, slots=True)
class AsyncMessage:
    """Asynchronous Message, RFC 7143 §11.9. The ITT field is always 0xffffffff (§11.9)."""

    opcode: ClassVar[Opcode] = Opcode.ASYNC_MESSAGE
    async_event: int = AsyncEvent.SCSI_ASYNC_EVENT
    async_vcode: int = 0
    lun: int = 0
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    parameter1: int = 0
    parameter2: int = 0
    parameter3: int = 0
    data: BytesLike = b""

    def encode_bhs(self, total_ahs_words: int, data_length: int) -> bytes:
        return _ASYNC_MESSAGE.pack(
            Opcode.ASYNC_MESSAGE,
            FINAL_BIT,
            _lengths(total_ahs_words, data_length),
            self.lun,
            RESERVED_TAG,
            self.stat_sn,
            self.exp_cmd_sn,
            self.max_cmd_sn,
            self.async_event,
            self.async_vcode,
            self.parameter1,
            self.parameter2,
            self.parameter3,
        )


@dataclass(frozen=True, slots=True)
class Reject:
    """Reject, RFC 7143 §11.17. ``data`` is the complete header of the rejected PDU."""

    opcode: ClassVar[Opcode] = Opcode.REJECT
    reason: int = RejectReason.PROTOCOL_ERROR
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    data_sn: int = 0
    data: BytesLike = b""

    def encode_bhs(self, total_ahs_words: int, data_length: int) -> bytes:
        return _REJECT.pack(
            Opcode.REJECT,
            FINAL_BIT,
            self.reason,
            _lengths(total_ahs_words, data_length),
            RESERVED_TAG,
            self.stat_sn,
            self.exp_cmd_sn,
            self.max_cmd_sn,
            self.data_sn,
        )


Pdu: TypeAlias = (
    NopOut
    | ScsiCommand
    | TaskManagementRequest
    | LoginRequest
    | TextRequest
    | DataOut
    | LogoutRequest
    | SnackRequest
    | NopIn
    | ScsiResponse
    | TaskManagementResponse
    | LoginResponse
    | TextResponse
    | DataIn
    | LogoutResponse
    | R2T
    | AsyncMessage
    | Reject
)

# --- encoding --------------------------------------------------------------------------------


def _digest(data: BytesLike) -> bytes:
    return _DIGEST.pack(crc32c.crc32c(data))


def encode_pdu_buffers(
    pdu: Pdu, *, header_digest: bool = False, data_digest: bool = False
) -> list[BytesLike]:
    """Encode ``pdu`` as buffers to write in order: header (+digest), data, padding, digest.

    The data segment is passed through as the same object, never copied, so a Data-In can point
    at the block device's read buffer. Raises :class:`LocalProtocolError` when a field does not
    fit its wire width.
    """
    data = pdu.data
    data_length = data.nbytes if isinstance(data, memoryview) else len(data)
    if data_length > MAX_DATA_SEGMENT_LENGTH:
        raise LocalProtocolError(
            f"data segment of {data_length} bytes exceeds the 3-byte DataSegmentLength field"
        )
    ahs = pdu.ahs_bytes() if isinstance(pdu, ScsiCommand) else b""
    if len(ahs) > MAX_TOTAL_AHS_LENGTH:
        raise LocalProtocolError(f"AHS of {len(ahs)} bytes exceeds {MAX_TOTAL_AHS_LENGTH}")
    try:
        header = pdu.encode_bhs(len(ahs) >> 2, data_length)
    except struct.error as exc:
        raise LocalProtocolError(f"{type(pdu).__name__} field out of range: {exc}") from exc
    if ahs:
        header += ahs
    if header_digest:
        header += _digest(header)
    if not data_length:
        return [header]
    pad = _PAD[-data_length & 3]
    buffers: list[BytesLike] = [header, data]
    if pad:
        buffers.append(pad)
    if data_digest:
        crc = crc32c.crc32c(data)
        if pad:
            crc = crc32c.crc32c(pad, crc)
        buffers.append(_DIGEST.pack(crc))
    return buffers


def encode_pdu(pdu: Pdu, *, header_digest: bool = False, data_digest: bool = False) -> bytes:
    """Encode ``pdu`` into one bytes object (see :func:`encode_pdu_buffers`)."""
    return b"".join(encode_pdu_buffers(pdu, header_digest=header_digest, data_digest=data_digest))


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


# --- decoding --------------------------------------------------------------------------------

_Decoder = Callable[[BytesLike, memoryview, memoryview], Pdu]


def _invalid(message: str, header: BytesLike) -> PduFormatError:
    return PduFormatError(
        message, reject_reason=RejectReason.INVALID_PDU_FIELD, header=bytes(header[:BHS_LENGTH])
    )


def _no_ahs(ahs: memoryview, header: BytesLike, name: str) -> None:
    if len(ahs):
        raise _invalid(
            f"{name} carries an AHS, which RFC 7143 §11.2.2 defines only for commands", header
        )


def _no_data(data: memoryview, header: BytesLike, name: str) -> None:
    if len(data):
        raise _invalid(f"{name} must have DataSegmentLength 0", header)


def _decode_nop_out(h: BytesLike, ahs: memoryview, data: memoryview) -> Pdu:
    _no_ahs(ahs, h, "NOP-Out")
    op, _f, _l, lun, itt, ttt, cmd_sn, exp_stat_sn = _NOP_OUT.unpack_from(h)
    return NopOut(itt, ttt, cmd_sn, exp_stat_sn, lun, bool(op & IMMEDIATE_BIT), data)


def _parse_command_ahs(ahs: memoryview, header: BytesLike) -> tuple[bytes, int | None]:
    extra = b""
    bidi: int | None = None
    seen: set[int] = set()
    offset = 0
    while offset < len(ahs):
        if len(ahs) - offset < 4:
            raise _invalid("truncated AHS header", header)
        length, ahs_type = _AHS_HEADER.unpack_from(ahs, offset)
        if ahs_type in seen:
            raise _invalid(f"AHS type {ahs_type} appears twice", header)
        seen.add(ahs_type)
        # AHSLength excludes AHSLength/AHSType and padding (RFC 7143 §11.2.2.1).
        end = offset + 3 + length
        if length == 0 or end > len(ahs):
            raise _invalid(f"AHS length {length} runs past TotalAHSLength", header)
        if ahs_type == AHS_TYPE_EXTENDED_CDB:
            extra = bytes(ahs[offset + 4 : end])
            if CDB_IN_BHS + len(extra) > MAX_CDB_LENGTH:
                raise _invalid(f"extended CDB longer than {MAX_CDB_LENGTH} bytes", header)
        elif ahs_type == AHS_TYPE_BIDI_READ_LENGTH:
            if length != _BIDI_READ_AHS_LENGTH:
                raise _invalid(f"bidirectional read AHS length {length} is not 5", header)
            (bidi,) = _U32.unpack_from(ahs, offset + 4)
        else:
            raise _invalid(f"AHS type {ahs_type} is reserved (RFC 7143 §11.2.2.2)", header)
        offset = (end + 3) & ~3
    if offset != len(ahs):
        raise _invalid("AHS padding runs past TotalAHSLength", header)
    return extra, bidi


def _decode_scsi_command(h: BytesLike, ahs: memoryview, data: memoryview) -> Pdu:
    op, flags, _l, lun, itt, edtl, cmd_sn, exp_stat_sn, cdb = _SCSI_COMMAND.unpack_from(h)
    bidi: int | None = None
    if len(ahs):
        extra, bidi = _parse_command_ahs(ahs, h)
        cdb += extra
    return ScsiCommand(
        itt,
        cdb,
        lun,
        edtl,
        cmd_sn,
        exp_stat_sn,
        bool(flags & FINAL_BIT),
        bool(flags & SCSI_CMD_READ),
        bool(flags & SCSI_CMD_WRITE),
        flags & SCSI_CMD_ATTR_MASK,
        bool(op & IMMEDIATE_BIT),
        bidi,
        data,
    )


def _decode_task_mgmt_request(h: BytesLike, ahs: memoryview, data: memoryview) -> Pdu:
    _no_ahs(ahs, h, "Task Management Request")
    _no_data(data, h, "Task Management Request")
    op, flags, _l, lun, itt, ref_tag, cmd_sn, exp_stat_sn, ref_cmd_sn, exp_data_sn = (
        _TASK_MGMT_REQUEST.unpack_from(h)
    )
    return TaskManagementRequest(
        itt,
        flags & 0x7F,
        lun,
        ref_tag,
        cmd_sn,
        exp_stat_sn,
        ref_cmd_sn,
        exp_data_sn,
        bool(op & IMMEDIATE_BIT),
    )


def _decode_login_request(h: BytesLike, ahs: memoryview, data: memoryview) -> Pdu:
    _no_ahs(ahs, h, "Login Request")
    (_op, flags, vmax, vmin, _l, isid, tsih, itt, cid, cmd_sn, exp_stat_sn) = (
        _LOGIN_REQUEST.unpack_from(h)
    )
    return LoginRequest(
        itt,
        int.from_bytes(isid, "big"),
        tsih,
        cid,
        cmd_sn,
        exp_stat_sn,
        bool(flags & LOGIN_TRANSIT),
        bool(flags & CONTINUE_BIT),
        (flags >> 2) & 3,
        flags & 3,
        vmax,
        vmin,
        data,
    )


def _decode_text_request(h: BytesLike, ahs: memoryview, data: memoryview) -> Pdu:
    _no_ahs(ahs, h, "Text Request")
    op, flags, _l, lun, itt, ttt, cmd_sn, exp_stat_sn = _TEXT_REQUEST.unpack_from(h)
    final, cont = bool(flags & FINAL_BIT), bool(flags & CONTINUE_BIT)
    if final and cont:
        raise _invalid("Text Request with both F and C set (RFC 7143 §11.10.2)", h)
    return TextRequest(
        itt, ttt, cmd_sn, exp_stat_sn, lun, final, cont, bool(op & IMMEDIATE_BIT), data
    )


def _decode_data_out(h: BytesLike, ahs: memoryview, data: memoryview) -> Pdu:
    if len(ahs):
        _no_ahs(ahs, h, "Data-Out")
    _op, flags, _l, lun, itt, ttt, exp_stat_sn, data_sn, offset = _DATA_OUT.unpack_from(h)
    return DataOut(itt, ttt, lun, exp_stat_sn, data_sn, offset, bool(flags & FINAL_BIT), data)


def _decode_logout_request(h: BytesLike, ahs: memoryview, data: memoryview) -> Pdu:
    _no_ahs(ahs, h, "Logout Request")
    _no_data(data, h, "Logout Request")
    op, flags, _l, itt, cid, cmd_sn, exp_stat_sn = _LOGOUT_REQUEST.unpack_from(h)
    return LogoutRequest(itt, flags & 0x7F, cid, cmd_sn, exp_stat_sn, bool(op & IMMEDIATE_BIT))


def _decode_snack_request(h: BytesLike, ahs: memoryview, data: memoryview) -> Pdu:
    _no_ahs(ahs, h, "SNACK Request")
    _no_data(data, h, "SNACK Request")
    _op, flags, _l, lun, itt, ttt, exp_stat_sn, beg_run, run_length = _SNACK_REQUEST.unpack_from(h)
    return SnackRequest(itt, flags & 0x0F, lun, ttt, exp_stat_sn, beg_run, run_length)


def _decode_nop_in(h: BytesLike, ahs: memoryview, data: memoryview) -> Pdu:
    _no_ahs(ahs, h, "NOP-In")
    _op, _f, _l, lun, itt, ttt, stat_sn, exp_cmd_sn, max_cmd_sn = _NOP_IN.unpack_from(h)
    return NopIn(itt, ttt, stat_sn, exp_cmd_sn, max_cmd_sn, lun, data)


def _decode_scsi_response(h: BytesLike, ahs: memoryview, data: memoryview) -> Pdu:
    _no_ahs(ahs, h, "SCSI Response")
    (_op, flags, response, status, _l, itt, snack_tag, stat_sn, exp_cmd_sn, max_cmd_sn,
     exp_data_sn, bidi_residual, residual) = _SCSI_RESPONSE.unpack_from(h)  # fmt: skip
    if flags & SCSI_RSP_OVERFLOW and flags & SCSI_RSP_UNDERFLOW:
        raise _invalid("SCSI Response with both O and U set (RFC 7143 §11.4.1)", h)
    if flags & SCSI_RSP_BIDI_OVERFLOW and flags & SCSI_RSP_BIDI_UNDERFLOW:
        raise _invalid("SCSI Response with both o and u set (RFC 7143 §11.4.1)", h)
    return ScsiResponse(
        itt,
        status,
        response,
        stat_sn,
        exp_cmd_sn,
        max_cmd_sn,
        exp_data_sn,
        snack_tag,
        bool(flags & SCSI_RSP_OVERFLOW),
        bool(flags & SCSI_RSP_UNDERFLOW),
        bool(flags & SCSI_RSP_BIDI_OVERFLOW),
        bool(flags & SCSI_RSP_BIDI_UNDERFLOW),
        residual,
        bidi_residual,
        data,
    )


def _decode_task_mgmt_response(h: BytesLike, ahs: memoryview, data: memoryview) -> Pdu:
    _no_ahs(ahs, h, "Task Management Response")
    _no_data(data, h, "Task Management Response")
    _op, _f, response, _l, itt, stat_sn, exp_cmd_sn, max_cmd_sn = _TASK_MGMT_RESPONSE.unpack_from(h)
    return TaskManagementResponse(itt, response, stat_sn, exp_cmd_sn, max_cmd_sn)


def _decode_login_response(h: BytesLike, ahs: memoryview, data: memoryview) -> Pdu:
    _no_ahs(ahs, h, "Login Response")
    (_op, flags, vmax, vactive, _l, isid, tsih, itt, stat_sn, exp_cmd_sn, max_cmd_sn,
     status_class, status_detail) = _LOGIN_RESPONSE.unpack_from(h)  # fmt: skip
    return LoginResponse(
        itt,
        int.from_bytes(isid, "big"),
        tsih,
        stat_sn,
        exp_cmd_sn,
        max_cmd_sn,
        (status_class << 8) | status_detail,
        bool(flags & LOGIN_TRANSIT),
        bool(flags & CONTINUE_BIT),
        (flags >> 2) & 3,
        flags & 3,
        vmax,
        vactive,
        data,
    )


def _decode_text_response(h: BytesLike, ahs: memoryview, data: memoryview) -> Pdu:
    _no_ahs(ahs, h, "Text Response")
    _op, flags, _l, lun, itt, ttt, stat_sn, exp_cmd_sn, max_cmd_sn = _TEXT_RESPONSE.unpack_from(h)
    final, cont = bool(flags & FINAL_BIT), bool(flags & CONTINUE_BIT)
    if final and cont:
        raise _invalid("Text Response with both F and C set (RFC 7143 §11.11.2)", h)
    return TextResponse(itt, ttt, stat_sn, exp_cmd_sn, max_cmd_sn, lun, final, cont, data)


def _decode_data_in(h: BytesLike, ahs: memoryview, data: memoryview) -> Pdu:
    if len(ahs):
        _no_ahs(ahs, h, "Data-In")
    (_op, flags, status, _l, lun, itt, ttt, stat_sn, exp_cmd_sn, max_cmd_sn, data_sn, offset,
     residual) = _DATA_IN.unpack_from(h)  # fmt: skip
    if flags & DATA_IN_STATUS and not flags & FINAL_BIT:
        raise _invalid("Data-In with S=1 but F=0 (RFC 7143 §11.7.4)", h)
    if flags & DATA_IN_OVERFLOW and flags & DATA_IN_UNDERFLOW:
        raise _invalid("Data-In with both O and U set (RFC 7143 §11.7.5)", h)
    return DataIn(
        itt,
        ttt,
        lun,
        stat_sn,
        exp_cmd_sn,
        max_cmd_sn,
        data_sn,
        offset,
        residual,
        status,
        bool(flags & FINAL_BIT),
        bool(flags & DATA_IN_ACK),
        bool(flags & DATA_IN_STATUS),
        bool(flags & DATA_IN_OVERFLOW),
        bool(flags & DATA_IN_UNDERFLOW),
        data,
    )


def _decode_logout_response(h: BytesLike, ahs: memoryview, data: memoryview) -> Pdu:
    _no_ahs(ahs, h, "Logout Response")
    _no_data(data, h, "Logout Response")
    _op, _f, response, _l, itt, stat_sn, exp_cmd_sn, max_cmd_sn, t2w, t2r = (
        _LOGOUT_RESPONSE.unpack_from(h)
    )
    return LogoutResponse(itt, response, stat_sn, exp_cmd_sn, max_cmd_sn, t2w, t2r)


def _decode_r2t(h: BytesLike, ahs: memoryview, data: memoryview) -> Pdu:
    _no_ahs(ahs, h, "R2T")
    _no_data(data, h, "R2T")
    (_op, _f, _l, lun, itt, ttt, stat_sn, exp_cmd_sn, max_cmd_sn, r2t_sn, offset,
     desired) = _R2T.unpack_from(h)  # fmt: skip
    return R2T(itt, ttt, lun, stat_sn, exp_cmd_sn, max_cmd_sn, r2t_sn, offset, desired)


def _decode_async_message(h: BytesLike, ahs: memoryview, data: memoryview) -> Pdu:
    _no_ahs(ahs, h, "Async Message")
    (_op, _f, _l, lun, _itt, stat_sn, exp_cmd_sn, max_cmd_sn, event, vcode, p1, p2,
     p3) = _ASYNC_MESSAGE.unpack_from(h)  # fmt: skip
    return AsyncMessage(event, vcode, lun, stat_sn, exp_cmd_sn, max_cmd_sn, p1, p2, p3, data)


def _decode_reject(h: BytesLike, ahs: memoryview, data: memoryview) -> Pdu:
    _no_ahs(ahs, h, "Reject")
    _op, _f, reason, _l, _itt, stat_sn, exp_cmd_sn, max_cmd_sn, data_sn = _REJECT.unpack_from(h)
    return Reject(reason, stat_sn, exp_cmd_sn, max_cmd_sn, data_sn, data)


_DECODERS: dict[int, _Decoder] = {
    Opcode.NOP_OUT: _decode_nop_out,
    Opcode.SCSI_COMMAND: _decode_scsi_command,
    Opcode.TASK_MGMT_REQUEST: _decode_task_mgmt_request,
    Opcode.LOGIN_REQUEST: _decode_login_request,
    Opcode.TEXT_REQUEST: _decode_text_request,
    Opcode.SCSI_DATA_OUT: _decode_data_out,
    Opcode.LOGOUT_REQUEST: _decode_logout_request,
    Opcode.SNACK_REQUEST: _decode_snack_request,
    Opcode.NOP_IN: _decode_nop_in,
    Opcode.SCSI_RESPONSE: _decode_scsi_response,
    Opcode.TASK_MGMT_RESPONSE: _decode_task_mgmt_response,
    Opcode.LOGIN_RESPONSE: _decode_login_response,
    Opcode.TEXT_RESPONSE: _decode_text_response,
    Opcode.SCSI_DATA_IN: _decode_data_in,
    Opcode.LOGOUT_RESPONSE: _decode_logout_response,
    Opcode.R2T: _decode_r2t,
    Opcode.ASYNC_MESSAGE: _decode_async_message,
    Opcode.REJECT: _decode_reject,
}


def decode_pdu(
    header: BytesLike,
    ahs: memoryview,
    data: memoryview,
    *,
    allowed_opcodes: frozenset[Opcode] | None = None,
) -> Pdu:
    """Decode one PDU from its BHS (at least 48 bytes), AHS and unpadded data segment.

    ``allowed_opcodes`` restricts what the peer's role may send; anything else raises
    :class:`UnsupportedOpcodeError`. Digests must already be checked and stripped. Every
    problem raises a :class:`~blockyard.iscsi.errors.RemoteProtocolError` subclass carrying the
    Reject reason and the BHS; nothing else escapes.
    """
    opcode = header[0] & OPCODE_MASK
    decoder = _DECODERS.get(opcode)
    if decoder is None:
        raise UnsupportedOpcodeError(
            f"opcode {opcode:#04x} is reserved or vendor specific (RFC 7143 §11.2.1.2)",
            reject_reason=RejectReason.COMMAND_NOT_SUPPORTED,
            header=bytes(header[:BHS_LENGTH]),
        )
    if allowed_opcodes is not None and opcode not in allowed_opcodes:
        raise UnsupportedOpcodeError(
            f"{Opcode(opcode).name} may not be sent in this direction (RFC 7143 §11.2.1.2)",
            reject_reason=RejectReason.PROTOCOL_ERROR,
            header=bytes(header[:BHS_LENGTH]),
        )
    return decoder(header, ahs, data)
