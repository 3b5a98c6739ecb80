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

This module is the encoder and the codec's one import point. It re-exports every name of the
codec: the sizes, opcodes and bits every header shares (:mod:`~blockyard.iscsi.pdu_header`), the
PDU types with their flag bits, codes and header layouts, by family
(:mod:`~blockyard.iscsi.pdu_scsi`, :mod:`~blockyard.iscsi.pdu_task_mgmt`,
:mod:`~blockyard.iscsi.pdu_login`, :mod:`~blockyard.iscsi.pdu_control`), and the decoder
(:mod:`~blockyard.iscsi.pdu_decode`).
"""

from __future__ import annotations

import struct

import crc32c

from blockyard.blockdev import BytesLike
from blockyard.iscsi.errors import LocalProtocolError
from blockyard.iscsi.pdu_control import (
    AsyncEvent,
    AsyncMessage,
    NopIn,
    NopOut,
    Reject,
    SnackRequest,
)
from blockyard.iscsi.pdu_decode import Pdu, decode_pdu
from blockyard.iscsi.pdu_header import (
    _PAD,
    BHS_LENGTH,
    DIGEST_LENGTH,
    FINAL_BIT,
    IMMEDIATE_BIT,
    INITIATOR_OPCODES,
    MAX_DATA_SEGMENT_LENGTH,
    MAX_TOTAL_AHS_LENGTH,
    OPCODE_MASK,
    RESERVED_TAG,
    TARGET_OPCODES,
    Opcode,
)
from blockyard.iscsi.pdu_login import (
    CONTINUE_BIT,
    LOGIN_TRANSIT,
    LoginRequest,
    LoginResponse,
    LoginStage,
    LogoutReason,
    LogoutRequest,
    LogoutResponse,
    LogoutResponseCode,
    TextRequest,
    TextResponse,
)
from blockyard.iscsi.pdu_scsi import (
    AHS_TYPE_BIDI_READ_LENGTH,
    AHS_TYPE_EXTENDED_CDB,
    CDB_IN_BHS,
    DATA_IN_ACK,
    DATA_IN_BHS,
    DATA_IN_OVERFLOW,
    DATA_IN_STATUS,
    DATA_IN_UNDERFLOW,
    MAX_CDB_LENGTH,
    R2T,
    SCSI_CMD_ATTR_MASK,
    SCSI_CMD_READ,
    SCSI_CMD_WRITE,
    SCSI_COMMAND_FIELDS,
    SCSI_RESPONSE_BHS,
    SCSI_RSP_BIDI_OVERFLOW,
    SCSI_RSP_BIDI_UNDERFLOW,
    SCSI_RSP_OVERFLOW,
    SCSI_RSP_UNDERFLOW,
    DataIn,
    DataOut,
    ScsiCommand,
    ScsiResponse,
    ScsiResponseCode,
    TaskAttribute,
    parse_sense_segment,
    sense_segment,
)
from blockyard.iscsi.pdu_task_mgmt import (
    TaskManagementFunction,
    TaskManagementRequest,
    TaskManagementResponse,
    TaskManagementResponseCode,
)

_DIGEST = struct.Struct("<I")

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


__all__ = [
    "AHS_TYPE_BIDI_READ_LENGTH",
    "AHS_TYPE_EXTENDED_CDB",
    "BHS_LENGTH",
    "CDB_IN_BHS",
    "CONTINUE_BIT",
    "DATA_IN_ACK",
    "DATA_IN_BHS",
    "DATA_IN_OVERFLOW",
    "DATA_IN_STATUS",
    "DATA_IN_UNDERFLOW",
    "DIGEST_LENGTH",
    "FINAL_BIT",
    "IMMEDIATE_BIT",
    "INITIATOR_OPCODES",
    "LOGIN_TRANSIT",
    "MAX_CDB_LENGTH",
    "MAX_DATA_SEGMENT_LENGTH",
    "MAX_TOTAL_AHS_LENGTH",
    "OPCODE_MASK",
    "R2T",
    "RESERVED_TAG",
    "SCSI_CMD_ATTR_MASK",
    "SCSI_CMD_READ",
    "SCSI_CMD_WRITE",
    "SCSI_COMMAND_FIELDS",
    "SCSI_RESPONSE_BHS",
    "SCSI_RSP_BIDI_OVERFLOW",
    "SCSI_RSP_BIDI_UNDERFLOW",
    "SCSI_RSP_OVERFLOW",
    "SCSI_RSP_UNDERFLOW",
    "TARGET_OPCODES",
    "AsyncEvent",
    "AsyncMessage",
    "DataIn",
    "DataOut",
    "LoginRequest",
    "LoginResponse",
    "LoginStage",
    "LogoutReason",
    "LogoutRequest",
    "LogoutResponse",
    "LogoutResponseCode",
    "NopIn",
    "NopOut",
    "Opcode",
    "Pdu",
    "Reject",
    "ScsiCommand",
    "ScsiResponse",
    "ScsiResponseCode",
    "SnackRequest",
    "TaskAttribute",
    "TaskManagementFunction",
    "TaskManagementRequest",
    "TaskManagementResponse",
    "TaskManagementResponseCode",
    "TextRequest",
    "TextResponse",
    "decode_pdu",
    "encode_pdu",
    "encode_pdu_buffers",
    "parse_sense_segment",
    "sense_segment",
]
