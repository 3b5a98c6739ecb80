"""What every iSCSI PDU header shares (RFC 7143 §11.2): segment sizes, the reserved tag, the
opcode and I/F bits of byte 0 and byte 1, the opcodes, and the lengths word at offset 4.

Numbers on the wire are big-endian (RFC 7143 §11.1). Reserved fields are sent as zero and
ignored on receipt (RFC 7143 §11.2). The flag bits, codes and header layout of each PDU are in
the module of its family: :mod:`~blockyard.iscsi.pdu_scsi`,
:mod:`~blockyard.iscsi.pdu_task_mgmt`, :mod:`~blockyard.iscsi.pdu_login` and
:mod:`~blockyard.iscsi.pdu_control`.
"""

from __future__ import annotations

from enum import IntEnum

# --- wire constants --------------------------------------------------------------------------

BHS_LENGTH = 48  # RFC 7143 §11.2.1: the Basic Header Segment is always 48 bytes
DIGEST_LENGTH = 4  # RFC 7143 §11.2.3 / §11.2.4: CRC32C header and data digests
MAX_DATA_SEGMENT_LENGTH = (1 << 24) - 1  # RFC 7143 §11.2.1.5: DataSegmentLength is 3 bytes
MAX_TOTAL_AHS_LENGTH = 255 * 4  # RFC 7143 §11.2.1.4: TotalAHSLength counts 4-byte words in 1 byte
RESERVED_TAG = 0xFFFFFFFF  # RFC 7143 §11.2.1.8: ITT/TTT value meaning "no task"

OPCODE_MASK = 0x3F  # RFC 7143 §11.2.1.2: low 6 bits of byte 0
IMMEDIATE_BIT = 0x40  # RFC 7143 §11.2.1.1: I bit
FINAL_BIT = 0x80  # RFC 7143 §11.2.1.3: F bit

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


# Every BHS layout follows the byte diagram of its cited section. Its "I" at offset 4 packs
# TotalAHSLength (1 byte) and DataSegmentLength (3 bytes) together.
def _lengths(total_ahs_words: int, data_length: int) -> int:
    return (total_ahs_words << 24) | data_length
