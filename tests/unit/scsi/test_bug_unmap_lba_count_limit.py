"""Bug: the Block Limits page advertised MAXIMUM UNMAP LBA COUNT of 2 Mi blocks.

libiscsi's Inquiry.BlockLimits treats anything above 1 Mi blocks (512 MiB) as a bogus value
and failed; SBC-4 leaves the number to the device, so we advertise 1 Mi and enforce the same.
"""

from __future__ import annotations

import struct

from scsi_support import Harness, data_of, inquiry, sense_of


def test_block_limits_max_unmap_is_at_most_1mi_blocks(h: Harness) -> None:
    page = data_of(h.run(inquiry(evpd=1, page=0xB0, alloc=64)))
    max_unmap_lba_count = struct.unpack_from(">I", page, 20)[0]
    assert 0 < max_unmap_lba_count <= 1024 * 1024


def test_unmap_beyond_the_advertised_count_is_refused() -> None:
    h_big = Harness(blocks=(1 << 20) + 16).ready()
    params = struct.pack(">HH4x", 22, 16) + struct.pack(">QI4x", 0, (1 << 20) + 1)
    cdb = bytes([0x42, 0, 0, 0, 0, 0, 0]) + struct.pack(">H", len(params)) + b"\x00"
    key, asc, _ascq = sense_of(h_big.run(cdb, params))
    assert (key, asc) == (5, 0x26)
