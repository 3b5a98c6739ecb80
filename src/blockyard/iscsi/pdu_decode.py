"""Decoding one complete iSCSI PDU into its dataclass (RFC 7143 §11), and :data:`Pdu`, the union
of the PDU types.

:func:`decode_pdu` dispatches on the opcode through a table of per-PDU decoders, which unpack the
header layouts the PDU family modules define. It checks what framing and field meaning need;
sequence numbers and task state are the session's job. The streaming framer around it is
:class:`blockyard.iscsi.reader.PduReader`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

from blockyard.blockdev import BytesLike
from blockyard.iscsi import pdu_control, pdu_login, pdu_scsi, pdu_task_mgmt
from blockyard.iscsi.errors import PduFormatError, RejectReason, UnsupportedOpcodeError
from blockyard.iscsi.pdu_control import AsyncMessage, NopIn, NopOut, Reject, SnackRequest
from blockyard.iscsi.pdu_header import BHS_LENGTH, FINAL_BIT, IMMEDIATE_BIT, OPCODE_MASK, Opcode
from blockyard.iscsi.pdu_login import (
    CONTINUE_BIT,
    LOGIN_TRANSIT,
    LoginRequest,
    LoginResponse,
    LogoutRequest,
    LogoutResponse,
    TextRequest,
    TextResponse,
)
from blockyard.iscsi.pdu_scsi import (
    _BIDI_READ_AHS_LENGTH,
    AHS_TYPE_BIDI_READ_LENGTH,
    AHS_TYPE_EXTENDED_CDB,
    CDB_IN_BHS,
    DATA_IN_ACK,
    DATA_IN_OVERFLOW,
    DATA_IN_STATUS,
    DATA_IN_UNDERFLOW,
    MAX_CDB_LENGTH,
    R2T,
    SCSI_CMD_ATTR_MASK,
    SCSI_CMD_READ,
    SCSI_CMD_WRITE,
    SCSI_RSP_BIDI_OVERFLOW,
    SCSI_RSP_BIDI_UNDERFLOW,
    SCSI_RSP_OVERFLOW,
    SCSI_RSP_UNDERFLOW,
    DataIn,
    DataOut,
    ScsiCommand,
    ScsiResponse,
)
from blockyard.iscsi.pdu_task_mgmt import TaskManagementRequest, TaskManagementResponse

# The header layouts, re-bound as this module's own globals rather than imported by name: on a
# name imported into the module, CPython 3.11 compiles ``_X.unpack_from(...)`` as an attribute
# load that builds a bound method for every PDU instead of a method call (LOAD_METHOD).
_NOP_OUT = pdu_control._NOP_OUT
_SNACK_REQUEST = pdu_control._SNACK_REQUEST
_NOP_IN = pdu_control._NOP_IN
_ASYNC_MESSAGE = pdu_control._ASYNC_MESSAGE
_REJECT = pdu_control._REJECT
_LOGIN_REQUEST = pdu_login._LOGIN_REQUEST
_TEXT_REQUEST = pdu_login._TEXT_REQUEST
_LOGOUT_REQUEST = pdu_login._LOGOUT_REQUEST
_LOGIN_RESPONSE = pdu_login._LOGIN_RESPONSE
_TEXT_RESPONSE = pdu_login._TEXT_RESPONSE
_LOGOUT_RESPONSE = pdu_login._LOGOUT_RESPONSE
_SCSI_COMMAND = pdu_scsi._SCSI_COMMAND
_DATA_OUT = pdu_scsi._DATA_OUT
_SCSI_RESPONSE = pdu_scsi._SCSI_RESPONSE
_DATA_IN = pdu_scsi._DATA_IN
_R2T = pdu_scsi._R2T
_AHS_HEADER = pdu_scsi._AHS_HEADER
_U32 = pdu_scsi._U32
_TASK_MGMT_REQUEST = pdu_task_mgmt._TASK_MGMT_REQUEST
_TASK_MGMT_RESPONSE = pdu_task_mgmt._TASK_MGMT_RESPONSE

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
