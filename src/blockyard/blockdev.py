"""The block-device seam every data path is written against.

The SCSI layer serves any :class:`BlockDevice`; the engine's volumes are one, and later an
iSCSI-attached LUN, a FUSE file and a replicated volume are others. All of them pass the same
conformance suite, :func:`blockyard.testing.blockdev.check_block_device`.

Addresses are logical block addresses (LBAs) in units of ``logical_block_size`` bytes (512).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeAlias, runtime_checkable

#: What write paths accept; memoryview lets callers pass slices of receive buffers without a copy.
BytesLike: TypeAlias = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class LbaStatus:
    """Provisioning state of a run of blocks starting at ``lba`` (SBC-4 §5.7, GET LBA STATUS).

    ``mapped`` is False for deallocated blocks, which read as zeros.
    """

    lba: int
    block_count: int
    mapped: bool


@runtime_checkable
class BlockDevice(Protocol):
    """A fixed-geometry array of logical blocks.

    Contract shared by every implementation:

    - ``read`` returns the newest acknowledged data; never-written and unmapped blocks read as
      zeros.
    - ``write`` returning means later reads see the data; durability across power loss holds
      only after ``flush()`` returns (or at once with ``fua=True``).
    - Every LBA range is checked: out-of-range raises ``OutOfRangeError``, a buffer that is not a
      whole number of blocks raises ``MisalignedError``, a request above
      ``max_transfer_blocks`` raises ``TransferTooLargeError``.
    """

    @property
    def logical_block_size(self) -> int: ...

    @property
    def physical_block_size(self) -> int: ...

    @property
    def block_count(self) -> int: ...

    @property
    def max_transfer_blocks(self) -> int: ...

    def read(self, lba: int, block_count: int) -> bytes: ...

    def readinto(self, lba: int, buf: memoryview) -> None: ...

    def write(self, lba: int, data: BytesLike, *, fua: bool = False) -> object: ...

    def unmap(self, lba: int, block_count: int) -> object: ...

    def write_zeroes(self, lba: int, block_count: int) -> object: ...

    def flush(self) -> None: ...

    def lba_status(self, lba: int) -> LbaStatus: ...
