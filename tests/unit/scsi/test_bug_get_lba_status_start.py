"""Bug: GET LBA STATUS reported the start of the device's extent, not the requested LBA.

A device that tracks allocation in 4 KiB blocks (the engine) answers ``lba_status(lba)`` with
an extent that may begin up to seven sectors before ``lba``; the logical unit copied that
start into the first descriptor, and libiscsi's GetLBAStatus.UnmapSingle failed ("lba offset
in first descriptor does not match request"). SBC-4 §5.8.2 wants the first descriptor to
start at the requested LBA.
"""

from __future__ import annotations

import struct
import uuid

from scsi_support import I1, tur

from blockyard.blockdev import LbaStatus
from blockyard.scsi import LogicalUnit, LuIdentity, MemoryReservationStore, StaticAlua, Status
from blockyard.testing.memdev import MemoryBlockDevice


class AlignedStatusDevice(MemoryBlockDevice):
    """Reports provisioning per 8-sector block, as the engine does."""

    def lba_status(self, lba: int) -> LbaStatus:
        status = super().lba_status(lba - lba % 8)
        return LbaStatus(lba - lba % 8, status.block_count, status.mapped)


def test_first_descriptor_starts_at_the_requested_lba() -> None:
    device = AlignedStatusDevice(64)
    lu = LogicalUnit(
        device, LuIdentity(uuid.uuid4()), StaticAlua.single(), MemoryReservationStore()
    )
    lu.execute(I1, tur())  # clears POWER ON
    device.write(0, bytes(512 * 16))
    cdb = bytes([0x9E, 0x12]) + struct.pack(">QI", 3, 64) + bytes(2)
    result = lu.execute(I1, cdb)
    assert result.status == Status.GOOD
    data = bytes(result.data_in or b"")
    lba, blocks, provisioning = struct.unpack_from(">QIB", data, 8)
    assert lba == 3
    assert blocks == 16 - 3  # the rest of the mapped extent, not its full length
    assert provisioning == 0
