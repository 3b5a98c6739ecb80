"""Streaming PDU framer: bytes in, PDUs out, no I/O (the h11 model).

Usage by an adapter::

    reader = PduReader(peer=PeerRole.INITIATOR)
    while True:
        pdu = reader.next_pdu()
        if pdu is NEED_DATA:
            reader.receive_data(await read_some())
            continue
        handle(pdu)

:meth:`PduReader.next_pdu` refuses a declared data segment over the bound as soon as the 48-byte
header is in, before any of the segment is buffered. Digests are checked when enabled. Errors are
:class:`~blockyard.iscsi.errors.RemoteProtocolError` subclasses: a non-fatal one (data digest,
invalid field, unsupported opcode) has consumed exactly the offending PDU so reading can go on;
after a fatal one (header digest, oversize length) the reader repeats that error forever.
"""

from __future__ import annotations

import struct
from enum import Enum
from typing import Literal

import crc32c

from blockyard.blockdev import BytesLike
from blockyard.iscsi.errors import (
    DataDigestError,
    HeaderDigestError,
    LocalProtocolError,
    PduTooLargeError,
    RejectReason,
    RemoteProtocolError,
)
from blockyard.iscsi.pdu import (
    BHS_LENGTH,
    DIGEST_LENGTH,
    INITIATOR_OPCODES,
    MAX_DATA_SEGMENT_LENGTH,
    OPCODE_MASK,
    TARGET_OPCODES,
    Opcode,
    Pdu,
    decode_pdu,
)

#: Until MaxRecvDataSegmentLength is negotiated, its default applies (RFC 7143 §13.12).
DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH = 8192
#: The smallest MaxRecvDataSegmentLength a peer may declare (RFC 7143 §13.12).
MIN_MAX_RECV_DATA_SEGMENT_LENGTH = 512

_LENGTHS = struct.Struct(">I")
_SCSI_COMMAND = int(Opcode.SCSI_COMMAND)
_DIGEST = struct.Struct("<I")


class PeerRole(Enum):
    """Who sends the PDUs this reader decodes."""

    INITIATOR = "initiator"
    TARGET = "target"


class _NeedData(Enum):
    NEED_DATA = "NEED_DATA"


#: Returned by :meth:`PduReader.next_pdu` when the buffer holds no complete PDU yet.
NEED_DATA: Literal[_NeedData.NEED_DATA] = _NeedData.NEED_DATA


class PduReader:
    """Frames and decodes the PDUs of one connection direction.

    Not thread-safe; one reader belongs to one connection's receive loop. Digest and length
    settings change with :meth:`configure` and apply from the next PDU returned, which is how
    digests switch on after the final Login Response (RFC 7143 §13.1).
    """

    __slots__ = (
        "_allowed",
        "_buffer",
        "_data_digest",
        "_error",
        "_header_digest",
        "_max_data_segment_length",
    )

    def __init__(
        self,
        *,
        peer: PeerRole,
        max_data_segment_length: int = DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH,
        header_digest: bool = False,
        data_digest: bool = False,
    ) -> None:
        self._allowed = INITIATOR_OPCODES if peer is PeerRole.INITIATOR else TARGET_OPCODES
        self._buffer = bytearray()
        self._error: RemoteProtocolError | None = None
        self._max_data_segment_length = 0
        self._header_digest = False
        self._data_digest = False
        self.configure(
            max_data_segment_length=max_data_segment_length,
            header_digest=header_digest,
            data_digest=data_digest,
        )

    def configure(
        self,
        *,
        max_data_segment_length: int | None = None,
        header_digest: bool | None = None,
        data_digest: bool | None = None,
    ) -> None:
        """Change the bound (our declared MaxRecvDataSegmentLength) or the digest settings."""
        if max_data_segment_length is not None:
            if (
                not MIN_MAX_RECV_DATA_SEGMENT_LENGTH
                <= max_data_segment_length
                <= (MAX_DATA_SEGMENT_LENGTH)
            ):
                raise LocalProtocolError(
                    f"max_data_segment_length {max_data_segment_length} is outside "
                    f"{MIN_MAX_RECV_DATA_SEGMENT_LENGTH}..{MAX_DATA_SEGMENT_LENGTH} "
                    "(RFC 7143 §13.12)"
                )
            self._max_data_segment_length = max_data_segment_length
        if header_digest is not None:
            self._header_digest = header_digest
        if data_digest is not None:
            self._data_digest = data_digest

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet returned as PDUs."""
        return len(self._buffer)

    def receive_data(self, data: BytesLike) -> None:
        """Append bytes from the peer. Call only after :meth:`next_pdu` returned NEED_DATA,
        so the buffer never holds much more than one PDU."""
        self._buffer += data

    def next_scsi_command(self) -> bytearray | None:
        """Fast path: the next PDU's bytes (BHS then data segment, padded), undecoded, when it
        is complete, is a SCSI Command without AHS and digests are off; otherwise None and the
        buffer is left for :meth:`next_pdu`. The caller owns the returned buffer and decodes it
        itself (or passes it to :func:`~blockyard.iscsi.pdu.decode_pdu`)."""
        if self._header_digest or self._data_digest or self._error is not None:
            return None
        buffer = self._buffer
        available = len(buffer)
        if available < BHS_LENGTH or buffer[0] & OPCODE_MASK != _SCSI_COMMAND:
            return None
        (lengths,) = _LENGTHS.unpack_from(buffer, 4)
        # A nonzero TotalAHSLength makes ``lengths`` exceed any allowed segment length, so one
        # compare refuses both an AHS and an oversize segment (next_pdu reports the latter).
        if lengths > self._max_data_segment_length:
            return None
        total = BHS_LENGTH + ((lengths + 3) & ~3)
        if available < total:
            return None
        if available == total:
            self._buffer = bytearray()
            return buffer
        chunk = buffer[:total]
        del buffer[:total]  # O(1): CPython moves a bytearray's start instead of its bytes
        return chunk

    def next_pdu(self) -> Pdu | Literal[_NeedData.NEED_DATA]:
        """Return the next complete PDU, or NEED_DATA.

        The returned PDU's ``data`` is a read-only memoryview over a buffer that the reader
        never touches again, so it stays valid as long as the caller holds it.
        """
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        available = len(buffer)
        if available < BHS_LENGTH:
            return NEED_DATA
        (lengths,) = _LENGTHS.unpack_from(buffer, 4)
        ahs_length = (lengths >> 24) * 4
        data_length = lengths & 0xFFFFFF
        if data_length > self._max_data_segment_length:
            # Fatal: skipping the segment would mean buffering or discarding bytes we refused
            # to account for, and RFC 7143 §7.8 lets a target drop a connection that overruns.
            self._error = PduTooLargeError(
                f"DataSegmentLength {data_length} exceeds our MaxRecvDataSegmentLength "
                f"{self._max_data_segment_length} (RFC 7143 §13.12)",
                reject_reason=RejectReason.PROTOCOL_ERROR,
                header=bytes(buffer[:BHS_LENGTH]),
                fatal=True,
            )
            raise self._error
        header_end = BHS_LENGTH + ahs_length
        data_start = header_end + (DIGEST_LENGTH if self._header_digest else 0)
        padded_end = data_start + ((data_length + 3) & ~3)
        total = padded_end + (DIGEST_LENGTH if self._data_digest and data_length else 0)
        if available < total:
            return NEED_DATA

        if available == total:
            chunk = buffer
            self._buffer = bytearray()
        else:
            chunk = buffer[:total]
            del buffer[:total]

        if self._header_digest:
            (sent,) = _DIGEST.unpack_from(chunk, header_end)
            if crc32c.crc32c(memoryview(chunk)[:header_end]) != sent:
                self._error = HeaderDigestError(
                    "header digest mismatch; PDU boundaries are lost (RFC 7143 §7.8)",
                    header=bytes(chunk[:BHS_LENGTH]),
                    fatal=True,
                )
                raise self._error

        view = memoryview(chunk).toreadonly()
        if self._data_digest and data_length:
            (sent,) = _DIGEST.unpack_from(chunk, padded_end)
            if crc32c.crc32c(view[data_start:padded_end]) != sent:
                raise DataDigestError(
                    "data digest mismatch; the PDU is discarded (RFC 7143 §7.8.1)",
                    reject_reason=RejectReason.DATA_DIGEST_ERROR,
                    header=bytes(chunk[:BHS_LENGTH]),
                )
        return decode_pdu(
            chunk,
            view[BHS_LENGTH:header_end],
            view[data_start : data_start + data_length],
            allowed_opcodes=self._allowed,
        )
