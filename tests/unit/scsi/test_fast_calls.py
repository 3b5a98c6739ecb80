"""``LogicalUnit.fast_read`` / ``fast_write``, the calls the connection's fast path makes on the
event loop: they never wait. On a device with ``try_read`` / ``try_write`` whatever would wait
answers ``WOULD_BLOCK`` having changed nothing; a device error is answered as ``execute``
answers it."""

from __future__ import annotations

from scsi_support import (
    I1,
    VOLUME_UUID,
    Harness,
    data_of,
    read10,
    read16,
    sense_of,
    write10,
    write16,
)

from blockyard.blockdev import BytesLike
from blockyard.errors import StorageIOError
from blockyard.scsi import LogicalUnit, LuIdentity, MemoryReservationStore, StaticAlua, Status
from blockyard.scsi.constants import Op
from blockyard.scsi.lu import WOULD_BLOCK, WouldBlock
from blockyard.testing.memdev import MemoryBlockDevice

BLOCK = 512


class TryDevice(MemoryBlockDevice):
    """A memory device with the engine's non-waiting calls; ``cached`` / ``room`` decide
    whether they succeed."""

    def __init__(self, blocks: int) -> None:
        super().__init__(blocks)
        self.cached = True
        self.room = True
        self.fail = False
        self.writes = 0

    def try_read(self, lba: int, block_count: int) -> bytes | None:
        if self.fail:
            raise StorageIOError("injected read failure")
        return self.read(lba, block_count) if self.cached else None

    def try_write(self, lba: int, data: BytesLike) -> int | None:
        if not self.room:
            return None
        self.write(lba, data)
        self.writes += 1
        return self.writes


def _lu(device: MemoryBlockDevice) -> LogicalUnit:
    return LogicalUnit(
        device, LuIdentity(VOLUME_UUID), StaticAlua.single(), MemoryReservationStore()
    )


def test_reads_wait_for_nothing() -> None:
    device = TryDevice(64)
    device.write(0, b"\x07" * BLOCK)
    lu = _lu(device)
    assert bytes(lu.fast_read(Op.READ_10, 0, 1)) == b"\x07" * BLOCK  # type: ignore[arg-type]
    device.cached = False
    assert lu.fast_read(Op.READ_10, 0, 1) is WOULD_BLOCK
    device.cached, device.fail = True, True
    failed = lu.fast_read(Op.READ_10, 0, 1)
    assert not isinstance(failed, bytes | bytearray | memoryview) and failed is not WOULD_BLOCK
    assert sense_of(failed)[0] == 0x03  # MEDIUM ERROR, as execute maps a storage I/O error


def test_writes_wait_for_nothing() -> None:
    device = TryDevice(64)
    lu = _lu(device)
    assert lu.fast_write(Op.WRITE_10, 0, b"\x01" * BLOCK) is None
    assert device.read(0, 1) == b"\x01" * BLOCK
    device.room = False
    assert lu.fast_write(Op.WRITE_10, 1, b"\x02" * BLOCK) is WOULD_BLOCK
    assert device.read(1, 1) == bytes(BLOCK)


def test_a_write_waits_for_nothing_while_another_holds_the_write_lock() -> None:
    """COMPARE AND WRITE holds the write lock across its read; the event loop must not wait
    behind it (nor behind a write that meets a full WAL off the loop)."""
    device = TryDevice(64)
    lu = _lu(device)
    with lu._write_lock:
        assert lu.fast_write(Op.WRITE_10, 0, b"\x01" * BLOCK) is WOULD_BLOCK
    assert device.writes == 0
    assert lu.fast_write(Op.WRITE_10, 0, b"\x01" * BLOCK) is None


def test_write_through_is_never_done_inline() -> None:
    h = Harness().ready()
    device = TryDevice(64)
    lu = _lu(device)
    lu._write_through = True  # what MODE SELECT with WCE=0 sets (test_state covers the CDB)
    assert lu.fast_write(Op.WRITE_10, 0, b"\x01" * BLOCK) is WOULD_BLOCK
    assert device.writes == 0
    assert h.lu.fast_write(Op.WRITE_10, 0, b"\x01" * BLOCK) is None  # a device without try_*


def test_devices_without_try_calls_are_used_directly() -> None:
    h = Harness().ready()
    assert h.lu.fast_write(Op.WRITE_10, 4, b"\x05" * BLOCK) is None
    assert bytes(h.lu.fast_read(Op.READ_10, 4, 1)) == b"\x05" * BLOCK  # type: ignore[arg-type]
    assert data_of(h.run(read10(4, 1))) == b"\x05" * BLOCK


def _lu_ready(device: MemoryBlockDevice) -> LogicalUnit:
    lu = _lu(device)
    while lu.execute(I1, bytes(6)).status != Status.GOOD:  # take the power-on unit attention
        pass
    return lu


def test_try_execute_answers_like_execute_when_nothing_waits() -> None:
    lu = _lu_ready(TryDevice(64))
    data = bytes(range(256)) * 4
    for cdb in (write10(2, 2), write16(4, 2), bytes([0x0A, 0, 0, 6, 2, 0])):  # WRITE 10/16/6
        assert lu.try_execute(I1, cdb, data) == lu.execute(I1, cdb, data)
    for cdb in (read10(2, 6), read16(4, 2), bytes([0x08, 0, 0, 6, 2, 0])):  # READ 10/16/6
        got = lu.try_execute(I1, cdb)
        assert not isinstance(got, WouldBlock)
        assert data_of(got) == data_of(lu.execute(I1, cdb))
    # Errors are answered, not deferred: they need no wait.
    assert lu.try_execute(I1, read10(63, 2)) == lu.execute(I1, read10(63, 2))


def test_try_execute_declines_what_would_wait_having_done_nothing() -> None:
    device = TryDevice(64)
    lu = _lu_ready(device)
    data = b"\x05" * BLOCK
    assert lu.try_execute(I1, write10(1, 1, flags=0x08), data) is WOULD_BLOCK  # FUA: a flush
    assert lu.try_execute(I1, bytes([0x35]) + bytes(9)) is WOULD_BLOCK  # not a READ or WRITE
    with lu._write_lock:
        assert lu.try_execute(I1, write10(1, 1), data) is WOULD_BLOCK
    device.room = False
    assert lu.try_execute(I1, write10(1, 1), data) is WOULD_BLOCK
    device.cached = False
    assert lu.try_execute(I1, read10(1, 1)) is WOULD_BLOCK
    assert device.read(1, 1) == bytes(BLOCK)
    # WRITE (6) has no FUA bit: byte 1 bit 3 is an LBA bit there.
    device.room = True
    assert lu.try_execute(I1, bytes([0x0A, 0x08, 0, 0, 1, 0]), data) == lu.execute(
        I1, bytes([0x0A, 0x08, 0, 0, 1, 0]), data
    )


def test_try_execute_needs_a_device_that_can_try() -> None:
    h = Harness().ready()
    assert h.lu.try_execute(I1, read10(0, 1)) is WOULD_BLOCK
