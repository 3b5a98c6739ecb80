"""An in-memory :class:`~blockyard.blockdev.BlockDevice`: the reference model for tests.

Not durable and not meant to be fast; it exists so protocol layers (SCSI, iSCSI) can be tested
without a volume file, and as the plain model the engine is checked against.
"""

from __future__ import annotations

import threading

from blockyard.blockdev import BytesLike, LbaStatus
from blockyard.errors import MisalignedError, OutOfRangeError, TransferTooLargeError


class MemoryBlockDevice:
    """Thread-safe: one lock guards the buffer and the allocation map."""

    def __init__(
        self,
        block_count: int,
        *,
        logical_block_size: int = 512,
        physical_block_size: int = 4096,
        max_transfer_blocks: int = 16384,
    ) -> None:
        self._lbs = logical_block_size
        self._pbs = physical_block_size
        self._max_transfer = max_transfer_blocks
        self._buf = bytearray(block_count * logical_block_size)
        self._mapped = bytearray(block_count)
        self._lock = threading.Lock()
        self.flush_count = 0

    @property
    def logical_block_size(self) -> int:
        return self._lbs

    @property
    def physical_block_size(self) -> int:
        return self._pbs

    @property
    def block_count(self) -> int:
        return len(self._mapped)

    @property
    def max_transfer_blocks(self) -> int:
        return self._max_transfer

    def resize(self, block_count: int) -> None:
        with self._lock:
            if block_count < len(self._mapped):
                raise ValueError("MemoryBlockDevice only grows")
            grow = block_count - len(self._mapped)
            self._buf.extend(bytes(grow * self._lbs))
            self._mapped.extend(bytes(grow))

    def _check(self, lba: int, block_count: int) -> None:
        if block_count > self._max_transfer:
            raise TransferTooLargeError(
                f"{block_count} blocks exceeds the transfer cap of {self._max_transfer}; "
                "split the request"
            )
        if lba < 0 or block_count < 0 or lba + block_count > len(self._mapped):
            raise OutOfRangeError(
                f"LBA range [{lba}, {lba + block_count}) is outside the device "
                f"(0..{len(self._mapped)})"
            )

    def read(self, lba: int, block_count: int) -> bytes:
        self._check(lba, block_count)
        with self._lock:
            return bytes(self._buf[lba * self._lbs : (lba + block_count) * self._lbs])

    def readinto(self, lba: int, buf: memoryview) -> None:
        if len(buf) % self._lbs:
            raise MisalignedError(f"buffer of {len(buf)} bytes is not a multiple of {self._lbs}")
        n = len(buf) // self._lbs
        self._check(lba, n)
        with self._lock:
            buf[:] = self._buf[lba * self._lbs : (lba + n) * self._lbs]

    def write(self, lba: int, data: BytesLike, *, fua: bool = False) -> None:
        if len(data) % self._lbs:
            raise MisalignedError(f"data of {len(data)} bytes is not a multiple of {self._lbs}")
        n = len(data) // self._lbs
        self._check(lba, n)
        with self._lock:
            self._buf[lba * self._lbs : (lba + n) * self._lbs] = data
            self._mapped[lba : lba + n] = b"\x01" * n
            if fua:
                self.flush_count += 1

    def unmap(self, lba: int, block_count: int) -> None:
        self._check_unmap(lba, block_count)
        with self._lock:
            self._buf[lba * self._lbs : (lba + block_count) * self._lbs] = bytes(
                block_count * self._lbs
            )
            self._mapped[lba : lba + block_count] = bytes(block_count)

    def _check_unmap(self, lba: int, block_count: int) -> None:
        if lba < 0 or block_count < 0 or lba + block_count > len(self._mapped):
            raise OutOfRangeError(
                f"LBA range [{lba}, {lba + block_count}) is outside the device "
                f"(0..{len(self._mapped)})"
            )

    def write_zeroes(self, lba: int, block_count: int) -> None:
        self.unmap(lba, block_count)

    def flush(self) -> None:
        with self._lock:
            self.flush_count += 1

    def lba_status(self, lba: int) -> LbaStatus:
        self._check_unmap(lba, 1)
        with self._lock:
            state = self._mapped[lba]
            end = lba
            while end < len(self._mapped) and self._mapped[end] == state:
                end += 1
            return LbaStatus(lba=lba, block_count=end - lba, mapped=bool(state))
