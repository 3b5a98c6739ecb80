"""Shared helpers: a logical unit over an in-memory device, CDB builders, result checks."""

from __future__ import annotations

import struct
import uuid

from blockyard.scsi import (
    LogicalUnit,
    LuIdentity,
    MemoryReservationStore,
    Nexus,
    ScsiResult,
    StaticAlua,
    Status,
)
from blockyard.testing.memdev import MemoryBlockDevice

VOLUME_UUID = uuid.UUID("12345678-1234-5678-1234-567812345678")
BLOCKS = 2048
I1 = Nexus("iqn.2024-01.test:init1,i,0x23d000000001", "iqn.2024-01.test:tgt,t,0x1", 1, 1)
I2 = Nexus("iqn.2024-01.test:init2,i,0x23d000000002", "iqn.2024-01.test:tgt,t,0x1", 1, 1)


class Harness:
    def __init__(self, blocks: int = BLOCKS) -> None:
        self.device = MemoryBlockDevice(blocks)
        self.alua = StaticAlua.single()
        self.store = MemoryReservationStore()
        self.lu = LogicalUnit(
            self.device, LuIdentity(VOLUME_UUID), self.alua, self.store, volume_name="vol"
        )

    def run(self, cdb: bytes, data: bytes | None = None, nexus: Nexus = I1) -> ScsiResult:
        return self.lu.execute(nexus, cdb, data)

    def ready(self, *nexuses: Nexus) -> Harness:
        for n in nexuses or (I1,):
            while self.run(tur(), nexus=n).status != Status.GOOD:
                pass
        return self


def sense_of(result: ScsiResult) -> tuple[int, int, int]:
    assert result.status == Status.CHECK_CONDITION, result
    assert result.sense is not None
    return result.sense[2] & 0x0F, result.sense[12], result.sense[13]


def data_of(result: ScsiResult) -> bytes:
    assert result.status == Status.GOOD, (result.status, result.asc_ascq)
    return b"" if result.data_in is None else bytes(result.data_in)


def tur() -> bytes:
    return bytes(6)


def read10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x28, flags, lba, 0, blocks, 0)


def write10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, flags, lba, 0, blocks, 0)


def read16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


def write16(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, flags, lba, blocks, 0, 0)


def inquiry(evpd: int = 0, page: int = 0, alloc: int = 255) -> bytes:
    return struct.pack(">BBBHB", 0x12, evpd, page, alloc, 0)


def pr_out(sa: int, rk: int, sark: int, pr_type: int = 0, flags: int = 0) -> tuple[bytes, bytes]:
    cdb = struct.pack(">BBBxxIB", 0x5F, sa, pr_type, 24, 0)
    params = struct.pack(">QQ4xBx2x", rk, sark, flags)
    return cdb, params


def pr_in(sa: int, alloc: int = 1024) -> bytes:
    return struct.pack(">BBxxxxxHB", 0x5E, sa, alloc, 0)
