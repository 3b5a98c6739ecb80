"""The logical unit's capacity and provisioning commands (a mixin of
:class:`~blockyard.scsi.lu.LogicalUnit`): READ CAPACITY (10)/(16), WRITE SAME (10)/(16),
UNMAP and GET LBA STATUS (SBC-4 §4.7, §5). The volume is thin provisioned and deallocated
blocks read as zeros (LBPME=1, LBPRZ=1)."""

from __future__ import annotations

import struct
import threading
from typing import TYPE_CHECKING, Final

from blockyard.blockdev import BlockDevice
from blockyard.scsi.constants import LBA_OUT_OF_RANGE, PARAMETER_LIST_LENGTH_ERROR, SenseKey, Status
from blockyard.scsi.identity import (
    MAX_UNMAP_DESCRIPTORS,
    MAX_UNMAP_LBA_COUNT,
    MAX_WRITE_SAME_BLOCKS,
)
from blockyard.scsi.nexus import Nexus
from blockyard.scsi.sense import (
    GOOD,
    CommandError,
    ScsiResult,
    cdb_error,
    check_condition,
    illegal,
    param_error,
)

#: SBC-4 §5.8: GET LBA STATUS descriptors returned per command.
LBA_STATUS_DESCRIPTORS_MAX: Final = 64

# The structs are this module's own, not imported (see lu_io).
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_LBA10 = struct.Struct(">xxIxH")  # LBA at byte 2, group at 6, length at 7
_LBA16 = struct.Struct(">xxQI")
_RC10 = struct.Struct(">II")
_RC16 = struct.Struct(">QIBBH16x")
_LBA_STATUS = struct.Struct(">QIB3x")


class ProvisioningCommands:
    """Capacity and provisioning in the logical unit; uses its state (declared below)."""

    if TYPE_CHECKING:
        _device: BlockDevice
        _write_lock: threading.Lock
        _write_through: bool
        _zero_block: bytes

        def _check_range(self, lba: int, blocks: int) -> None: ...

    def _write_same(
        self, cdb: memoryview, lba: int, blocks: int, count_byte: int, data: memoryview
    ) -> ScsiResult:
        self._check_range(lba, blocks)
        if blocks == 0:
            # WSNZ=1 in the Block Limits page: zero means nothing, and is refused.
            raise cdb_error(count_byte)
        if blocks > MAX_WRITE_SAME_BLOCKS:
            raise cdb_error(count_byte)
        unmap = bool(cdb[1] & 0x08)
        pattern = data if len(data) else memoryview(self._zero_block)
        device = self._device
        with self._write_lock:
            if pattern == self._zero_block:
                # LBPRZ=1: deallocated blocks read as zeros, so both paths give the same data.
                if unmap:
                    device.unmap(lba, blocks)
                else:
                    device.write_zeroes(lba, blocks)
            else:
                chunk_blocks = max(1, min(device.max_transfer_blocks, 256, blocks))
                chunk = bytes(pattern) * chunk_blocks
                done = 0
                while done < blocks:
                    n = min(chunk_blocks, blocks - done)
                    device.write(lba + done, memoryview(chunk)[: n * len(pattern)])
                    done += n
        if self._write_through:
            device.flush()  # outside the lock, as in _do_write
        return GOOD

    def _write_same10(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA10.unpack_from(cdb)
        return self._write_same(cdb, lba, blocks, 7, data)

    def _write_same16(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA16.unpack_from(cdb)
        return self._write_same(cdb, lba, blocks, 10, data)

    def _unmap(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        # SBC-4 §5.32: a zero-length parameter list is not an error.
        if len(data) == 0:
            return GOOD
        if len(data) < 8:
            raise illegal(PARAMETER_LIST_LENGTH_ERROR)
        desc_bytes = _U16.unpack_from(data, 2)[0]
        if desc_bytes > len(data) - 8:
            raise illegal(PARAMETER_LIST_LENGTH_ERROR)
        count = desc_bytes // 16
        if count > MAX_UNMAP_DESCRIPTORS:
            raise param_error(2)
        ranges: list[tuple[int, int]] = []
        capacity = self._device.block_count
        for i in range(count):
            off = 8 + 16 * i
            lba, blocks = struct.unpack_from(">QI", data, off)
            if blocks > MAX_UNMAP_LBA_COUNT:
                raise param_error(off + 8)
            if lba + blocks > capacity:
                raise CommandError(check_condition(SenseKey.ILLEGAL_REQUEST, LBA_OUT_OF_RANGE))
            if blocks:
                ranges.append((lba, blocks))
        with self._write_lock:
            for lba, blocks in ranges:
                self._device.unmap(lba, blocks)
        if self._write_through and ranges:
            self._device.flush()  # outside the lock, as in _do_write
        return GOOD

    def _read_capacity10(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        if not cdb[8] & 0x01 and _U32.unpack_from(cdb, 2)[0]:
            # SBC-4 §5.20: with PMI=0 the LOGICAL BLOCK ADDRESS field must be zero.
            raise cdb_error(2)
        last = min(self._device.block_count - 1, 0xFFFFFFFF)
        return ScsiResult(Status.GOOD, None, _RC10.pack(last, self._device.logical_block_size))

    def _read_capacity16(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        if not cdb[14] & 0x01 and _U64.unpack_from(cdb, 2)[0]:
            raise cdb_error(2)
        dev = self._device
        per_physical = max(1, dev.physical_block_size // dev.logical_block_size)
        exponent = per_physical.bit_length() - 1
        # SBC-4 §5.21.2: LBPME=1 (thin provisioned), LBPRZ=1, lowest aligned LBA 0.
        payload = _RC16.pack(
            dev.block_count - 1, dev.logical_block_size, 0, exponent & 0x0F, 0x8000 | 0x4000
        )
        return ScsiResult(Status.GOOD, None, payload)

    def _get_lba_status(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba = _U64.unpack_from(cdb, 2)[0]
        alloc = _U32.unpack_from(cdb, 10)[0]
        capacity = self._device.block_count
        if lba >= capacity:
            raise CommandError(check_condition(SenseKey.ILLEGAL_REQUEST, LBA_OUT_OF_RANGE))
        wanted = max(1, min(LBA_STATUS_DESCRIPTORS_MAX, (alloc - 8) // 16 if alloc > 8 else 1))
        body = bytearray()
        cur = lba
        for _ in range(wanted):
            if cur >= capacity:
                break
            status = self._device.lba_status(cur)
            # SBC-4 §5.8.2: the first descriptor starts at the requested LBA even when the
            # device's extent began earlier; later ones start where the previous ended.
            start = max(status.lba, cur)
            blocks = min(status.lba + status.block_count - start, 0xFFFFFFFF, capacity - start)
            if blocks <= 0:
                break
            # SBC-4 §5.8.2 PROVISIONING STATUS: 0 mapped, 1 deallocated.
            body += _LBA_STATUS.pack(start, blocks, 0 if status.mapped else 1)
            cur = start + blocks
        return ScsiResult(Status.GOOD, None, _U32.pack(len(body) + 4) + bytes(4) + bytes(body))
