"""Bug: COMPARE AND WRITE with NUMBER OF LOGICAL BLOCKS 0 but a Data-Out buffer succeeded.

libiscsi's CompareAndWrite.Simple sends 256 blocks, which the one-byte field wraps to 0, with
256 blocks' worth of data; the logical unit ignored the buffer and answered GOOD. The CDB and
the transfer disagree, so it is now refused with INVALID FIELD IN CDB; without data, zero
blocks is still a no-op (SBC-4 §5.3).
"""

from __future__ import annotations

import struct

from scsi_support import Harness, sense_of

from blockyard.scsi import Status


def caw(lba: int, blocks: int) -> bytes:
    return bytes([0x89, 0]) + struct.pack(">Q", lba) + bytes(3) + bytes([blocks, 0, 0])


def test_zero_blocks_with_data_is_refused(h: Harness) -> None:
    assert sense_of(h.run(caw(0, 0), bytes(1024))) == (5, 0x24, 0)


def test_zero_blocks_without_data_is_a_no_op(h: Harness) -> None:
    assert h.run(caw(0, 0)).status == Status.GOOD
    assert h.run(caw(0, 0), b"").status == Status.GOOD
