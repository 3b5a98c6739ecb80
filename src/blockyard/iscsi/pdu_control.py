"""The PDUs that carry no SCSI task, RFC 7143: NOP-Out and NOP-In pings (§11.18, §11.19), SNACK
Request (§11.16), Asynchronous Message (§11.9) with its events, and Reject (§11.17).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from blockyard.blockdev import BytesLike
from blockyard.iscsi.errors import LocalProtocolError, RejectReason
from blockyard.iscsi.pdu_header import FINAL_BIT, IMMEDIATE_BIT, RESERVED_TAG, Opcode, _lengths


class AsyncEvent(IntEnum):
    """Asynchronous Message events, RFC 7143 §11.9.1."""

    SCSI_ASYNC_EVENT = 0
    LOGOUT_REQUESTED = 1
    CONNECTION_WILL_DROP = 2
    SESSION_WILL_DROP = 3
    RENEGOTIATE = 4
    VENDOR_SPECIFIC = 255


# BHS layouts, following the byte diagram of each cited section (see pdu_header._lengths).
# They are defined here, in the module that packs them, and not imported: CPython 3.11 compiles
# ``_X.pack(...)`` as a method call only on a name that is not imported into the module.
_NOP_OUT = struct.Struct(">BB2xIQIIII16x")  # RFC 7143 §11.18
_SNACK_REQUEST = struct.Struct(">BB2xIQII4xI8xII")  # RFC 7143 §11.16
_NOP_IN = struct.Struct(">BB2xIQIIIII12x")  # RFC 7143 §11.19
_ASYNC_MESSAGE = struct.Struct(">BB2xIQI4xIIIBBHHH4x")  # RFC 7143 §11.9
_REJECT = struct.Struct(">BBBxI8xI4xIIII8x")  # RFC 7143 §11.17


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
