"""The PDUs that open, negotiate on and close a connection, RFC 7143: Login Request and Response
(§11.12, §11.13), Text Request and Response (§11.10, §11.11) and Logout Request and Response
(§11.14, §11.15), with their flag bits, the login stages and the logout codes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from blockyard.blockdev import BytesLike
from blockyard.iscsi.errors import LocalProtocolError
from blockyard.iscsi.pdu_header import FINAL_BIT, IMMEDIATE_BIT, RESERVED_TAG, Opcode, _lengths

# Login and Text flags, RFC 7143 §11.10.1, §11.10.2, §11.12.1 - §11.12.3
LOGIN_TRANSIT = 0x80  # T bit
CONTINUE_BIT = 0x40  # C bit (Login and Text)


class LoginStage(IntEnum):
    """CSG/NSG stage codes, RFC 7143 §11.12.3."""

    SECURITY_NEGOTIATION = 0
    LOGIN_OPERATIONAL_NEGOTIATION = 1
    FULL_FEATURE_PHASE = 3


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


# BHS layouts, following the byte diagram of each cited section (see pdu_header._lengths).
# They are defined here, in the module that packs them, and not imported: CPython 3.11 compiles
# ``_X.pack(...)`` as a method call only on a name that is not imported into the module.
_LOGIN_REQUEST = struct.Struct(">BBBBI6sHIH2xII16x")  # RFC 7143 §11.12
_TEXT_REQUEST = struct.Struct(">BB2xIQIIII16x")  # RFC 7143 §11.10
_LOGOUT_REQUEST = struct.Struct(">BB2xI8xIH2xII16x")  # RFC 7143 §11.14
_LOGIN_RESPONSE = struct.Struct(">BBBBI6sHI4xIIIBB10x")  # RFC 7143 §11.13
_TEXT_RESPONSE = struct.Struct(">BB2xIQIIIII12x")  # RFC 7143 §11.11
_LOGOUT_RESPONSE = struct.Struct(">BBBxI8xI4xIII4xHH4x")  # RFC 7143 §11.15

_ISID_MAX = (1 << 48) - 1


def _isid_bytes(isid: int) -> bytes:
    if not 0 <= isid <= _ISID_MAX:
        raise LocalProtocolError(f"ISID {isid:#x} does not fit in 6 bytes (RFC 7143 §11.12.5)")
    return isid.to_bytes(6, "big")


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
