"""The task management PDUs of RFC 7143: Task Management Function Request (§11.5) and
Response (§11.6), with their function and response codes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from blockyard.blockdev import BytesLike
from blockyard.iscsi.errors import LocalProtocolError
from blockyard.iscsi.pdu_header import FINAL_BIT, IMMEDIATE_BIT, RESERVED_TAG, Opcode, _lengths


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


# BHS layouts, following the byte diagram of each cited section (see pdu_header._lengths).
# They are defined here, in the module that packs them, and not imported: CPython 3.11 compiles
# ``_X.pack(...)`` as a method call only on a name that is not imported into the module.
_TASK_MGMT_REQUEST = struct.Struct(">BB2xIQIIIIII8x")  # RFC 7143 §11.5
_TASK_MGMT_RESPONSE = struct.Struct(">BBBxI8xI4xIII12x")  # RFC 7143 §11.6


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
