"""The logical unit's data commands (a mixin of :class:`~blockyard.scsi.lu.LogicalUnit`):
READ, WRITE and WRITE AND VERIFY (6)/(10)/(12)/(16), VERIFY, COMPARE AND WRITE, PRE-FETCH and
SYNCHRONIZE CACHE (SBC-4 §5). Every device write is made under the logical unit's write lock;
a flush that FUA or write-through asks for is made after it is released."""

from __future__ import annotations

import struct
import threading
from typing import TYPE_CHECKING, Final

from blockyard.blockdev import BlockDevice
from blockyard.scsi.constants import MISCOMPARE_DURING_VERIFY, SenseKey, Status
from blockyard.scsi.nexus import Nexus
from blockyard.scsi.sense import GOOD, CommandError, ScsiResult, check_condition

# The structs are this module's own, not imported: CPython compiles ``name.unpack_from(...)``
# on an imported name without LOAD_METHOD, a bound-method object more per command.
_U64 = struct.Struct(">Q")
_LBA10 = struct.Struct(">xxIxH")  # LBA at byte 2, group at 6, length at 7
_LBA12 = struct.Struct(">xxII")
_LBA16 = struct.Struct(">xxQI")

_COMPARE_CHUNK_BYTES: Final = 4096


def _first_difference(a: memoryview, b: memoryview) -> int:
    """Byte offset of the first difference of two equal-length buffers, or -1."""
    for start in range(0, len(a), _COMPARE_CHUNK_BYTES):
        end = start + _COMPARE_CHUNK_BYTES
        if a[start:end] != b[start:end]:
            for i in range(start, min(end, len(a))):
                if a[i] != b[i]:
                    return i
    return -1


def _miscompare(offset: int) -> CommandError:
    # SBC-4 §5.3 / §5.33: INFORMATION holds the offset of the first miscompared byte.
    return CommandError(
        check_condition(SenseKey.MISCOMPARE, MISCOMPARE_DURING_VERIFY, information=offset)
    )


class IoCommands:
    """Reads, writes and their kin in the logical unit; uses its state (declared below)."""

    if TYPE_CHECKING:
        _device: BlockDevice
        _write_lock: threading.Lock
        _write_through: bool

        def _check_range(self, lba: int, blocks: int) -> None: ...

    def _do_read(self, lba: int, blocks: int) -> ScsiResult:
        self._check_range(lba, blocks)
        if blocks == 0:
            return GOOD
        return ScsiResult(Status.GOOD, None, memoryview(self._device.read(lba, blocks)))

    def _do_write(self, lba: int, blocks: int, data: memoryview, fua: bool) -> ScsiResult:
        self._check_range(lba, blocks)
        if blocks == 0:
            return GOOD
        with self._write_lock:
            self._device.write(lba, data)
        if fua or self._write_through:
            # Outside the write lock: a FUA write of a replicated volume waits for replicas
            # here, and other writers (some on the event loop) must not wait behind it. A flush
            # covers this write as FUA would (SBC-4 §5.40: FUA = durable before GOOD).
            self._device.flush()
        return GOOD

    def _read6(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
        return self._do_read(lba, cdb[4] or 256)

    def _write6(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
        return self._do_write(lba, cdb[4] or 256, data, False)

    def _read10(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA10.unpack_from(cdb)
        return self._do_read(lba, blocks)

    def _write10(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA10.unpack_from(cdb)
        return self._do_write(lba, blocks, data, bool(cdb[1] & 0x08))

    def _read12(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA12.unpack_from(cdb)
        return self._do_read(lba, blocks)

    def _write12(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA12.unpack_from(cdb)
        return self._do_write(lba, blocks, data, bool(cdb[1] & 0x08))

    def _read16(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA16.unpack_from(cdb)
        return self._do_read(lba, blocks)

    def _write16(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA16.unpack_from(cdb)
        return self._do_write(lba, blocks, data, bool(cdb[1] & 0x08))

    def _verify(self, cdb: memoryview, lba: int, blocks: int, data: memoryview) -> ScsiResult:
        self._check_range(lba, blocks)
        if blocks == 0:
            return GOOD
        stored = memoryview(self._device.read(lba, blocks))
        bytchk = (cdb[1] >> 1) & 0x03
        if bytchk == 0b01:
            offset = _first_difference(stored, data)
        elif bytchk == 0b11:
            lbs = self._device.logical_block_size
            offset = -1
            for i in range(blocks):
                diff = _first_difference(stored[i * lbs : (i + 1) * lbs], data)
                if diff >= 0:
                    offset = i * lbs + diff
                    break
        else:
            return GOOD
        if offset >= 0:
            raise _miscompare(offset)
        return GOOD

    def _verify10(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA10.unpack_from(cdb)
        return self._verify(cdb, lba, blocks, data)

    def _verify12(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA12.unpack_from(cdb)
        return self._verify(cdb, lba, blocks, data)

    def _verify16(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA16.unpack_from(cdb)
        return self._verify(cdb, lba, blocks, data)

    def _pre_fetch10(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA10.unpack_from(cdb)
        self._check_range(lba, blocks)
        return GOOD

    def _pre_fetch16(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA16.unpack_from(cdb)
        self._check_range(lba, blocks)
        return GOOD

    def _sync10(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA10.unpack_from(cdb)
        self._check_range(lba, blocks)
        self._device.flush()
        return GOOD

    def _sync16(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba, blocks = _LBA16.unpack_from(cdb)
        self._check_range(lba, blocks)
        self._device.flush()
        return GOOD

    def _compare_and_write(self, nexus: Nexus, cdb: memoryview, data: memoryview) -> ScsiResult:
        lba = _U64.unpack_from(cdb, 2)[0]
        blocks = cdb[13]
        self._check_range(lba, blocks)
        if blocks == 0:
            return GOOD
        half = blocks * self._device.logical_block_size
        with self._write_lock:
            stored = memoryview(self._device.read(lba, blocks))
            offset = _first_difference(stored, data[:half])
            if offset >= 0:
                raise _miscompare(offset)
            self._device.write(lba, data[half:])
        if cdb[1] & 0x08 or self._write_through:
            self._device.flush()  # outside the lock, as in _do_write
        return GOOD
