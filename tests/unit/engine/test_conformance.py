"""The block-device conformance suite against the engine's volume and the in-memory reference,
and proof that the suite catches broken devices."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blockyard.blockdev import BlockDevice, BytesLike, LbaStatus
from blockyard.engine import VolumeStore
from blockyard.testing.blockdev import check_block_device
from blockyard.testing.memdev import MemoryBlockDevice

MIB = 1 << 20


def test_engine_volume_conforms(tmp_path: Path) -> None:
    counter = itertools.count()
    store = VolumeStore(str(tmp_path))

    @contextlib.contextmanager
    def factory() -> Iterator[BlockDevice]:
        # 16 MiB so a transfer just above the cap still fits in the device: the cap itself,
        # not the range check, must refuse it.
        name = f"conf-{next(counter)}"
        vol = store.create(name, 16 * MIB)
        try:
            yield vol
        finally:
            vol.close()
            store.delete(name)

    check_block_device(factory)
    assert store.names() == []


def test_engine_volume_with_tiny_wal_conforms(tmp_path: Path) -> None:
    # Minimum WAL: every check runs through wraparound and back-pressure.
    counter = itertools.count()
    store = VolumeStore(str(tmp_path))

    def factory() -> tuple[BlockDevice, Callable[[], None]]:
        vol = store.create(f"tiny-{next(counter)}", 4 * MIB, wal_size_bytes=64 * 1024)
        return vol, vol.close

    check_block_device(factory)


@pytest.mark.parametrize(
    ("block_count", "max_transfer_blocks"),
    [(8192, 16384), (32768, 2048), (8192, 8)],
    ids=["cap-above-size", "cap-below-size", "smallest-cap"],
)
def test_memory_device_conforms(block_count: int, max_transfer_blocks: int) -> None:
    def factory() -> tuple[BlockDevice, Callable[[], None]]:
        dev = MemoryBlockDevice(block_count, max_transfer_blocks=max_transfer_blocks)
        return dev, lambda: None

    check_block_device(factory)


# ---- the suite must fail on broken devices --------------------------------------------------


class _Wrapper:
    """Delegates to a MemoryBlockDevice; subclasses break one thing."""

    def __init__(self, block_count: int = 8192) -> None:
        self.inner = MemoryBlockDevice(block_count)

    @property
    def logical_block_size(self) -> int:
        return self.inner.logical_block_size

    @property
    def physical_block_size(self) -> int:
        return self.inner.physical_block_size

    @property
    def block_count(self) -> int:
        return self.inner.block_count

    @property
    def max_transfer_blocks(self) -> int:
        return self.inner.max_transfer_blocks

    def read(self, lba: int, block_count: int) -> bytes:
        return self.inner.read(lba, block_count)

    def readinto(self, lba: int, buf: memoryview) -> None:
        self.inner.readinto(lba, buf)

    def write(self, lba: int, data: BytesLike, *, fua: bool = False) -> None:
        self.inner.write(lba, data, fua=fua)

    def unmap(self, lba: int, block_count: int) -> None:
        self.inner.unmap(lba, block_count)

    def write_zeroes(self, lba: int, block_count: int) -> None:
        self.inner.write_zeroes(lba, block_count)

    def flush(self) -> None:
        self.inner.flush()

    def lba_status(self, lba: int) -> LbaStatus:
        return self.inner.lba_status(lba)


class DropsEverySeventhWrite(_Wrapper):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, lba: int, data: BytesLike, *, fua: bool = False) -> None:
        self.writes += 1
        if self.writes % 7:
            super().write(lba, data, fua=fua)


class UnmapIsIgnored(_Wrapper):
    def unmap(self, lba: int, block_count: int) -> None:
        self.inner._check_unmap(lba, block_count)


class StaleAfterUnmap(_Wrapper):
    """Serves a cached copy of blocks read before an unmap, as a buggy read cache would."""

    def __init__(self) -> None:
        super().__init__()
        self.cache: dict[tuple[int, int], bytes] = {}

    def read(self, lba: int, block_count: int) -> bytes:
        key = (lba, block_count)
        if key not in self.cache:
            self.cache[key] = super().read(lba, block_count)
        return self.cache[key]

    def write(self, lba: int, data: BytesLike, *, fua: bool = False) -> None:
        self.cache.clear()
        super().write(lba, data, fua=fua)


class NoRangeCheckOnLastBlock(_Wrapper):
    def read(self, lba: int, block_count: int) -> bytes:
        if lba + block_count == self.block_count + 1:
            return self.inner.read(lba, block_count - 1) + bytes(512)
        return super().read(lba, block_count)


class WrongErrorForTooLarge(_Wrapper):
    def read(self, lba: int, block_count: int) -> bytes:
        if block_count > self.max_transfer_blocks:
            raise ValueError("too big")
        return super().read(lba, block_count)


class ReadintoIgnoresOffset(_Wrapper):
    def readinto(self, lba: int, buf: memoryview) -> None:
        self.inner.readinto(0, buf)


class LbaStatusAlwaysMapped(_Wrapper):
    def lba_status(self, lba: int) -> LbaStatus:
        st = super().lba_status(lba)
        return LbaStatus(lba=st.lba, block_count=st.block_count, mapped=True)


class SubBlockWriteClobbersNeighbours(_Wrapper):
    """Rounds partial-block writes out to 4 KiB with zeros, losing neighbouring sectors."""

    def write(self, lba: int, data: BytesLike, *, fua: bool = False) -> None:
        if len(data) % 512:
            super().write(lba, data, fua=fua)
            return
        first = lba // 8 * 8
        end = min(-(-(lba + len(data) // 512) // 8) * 8, self.block_count)
        buf = bytearray((end - first) * 512)
        buf[(lba - first) * 512 : (lba - first) * 512 + len(data)] = data
        self.inner._check(lba, len(data) // 512)
        super().write(first, buf, fua=fua)


class LosesDataOnFlush(_Wrapper):
    def flush(self) -> None:
        super().flush()
        self.inner.unmap(0, 16)


@pytest.mark.parametrize(
    ("device_type", "check_name"),
    [
        (DropsEverySeventhWrite, "check_sub_block_writes_keep_neighbours"),
        (UnmapIsIgnored, "check_unmap_and_write_zeroes"),
        (StaleAfterUnmap, "check_unmap_and_write_zeroes"),
        (NoRangeCheckOnLastBlock, "check_bounds"),
        (WrongErrorForTooLarge, "check_bounds"),
        (ReadintoIgnoresOffset, "check_readinto_matches_read"),
        (LbaStatusAlwaysMapped, "check_lba_status"),
        (SubBlockWriteClobbersNeighbours, "check_sub_block_writes_keep_neighbours"),
        (LosesDataOnFlush, "check_flush_and_fua"),
    ],
)
def test_suite_catches_broken_device(device_type: type[_Wrapper], check_name: str) -> None:
    def factory() -> tuple[BlockDevice, Callable[[], None]]:
        return device_type(), lambda: None

    with pytest.raises(AssertionError, match=rf"block device conformance: {check_name}") as info:
        check_block_device(factory)
    # The message must point at what went wrong, not just that something did.
    assert len(str(info.value)) > 60, str(info.value)


def test_suite_runs_cleanup_after_a_failure() -> None:
    cleaned: list[bool] = []

    def factory() -> tuple[BlockDevice, Callable[[], None]]:
        return DropsEverySeventhWrite(), lambda: cleaned.append(True)

    with pytest.raises(AssertionError):
        check_block_device(factory)
    assert cleaned, "the failing check's device was not cleaned up"


def test_suite_rejects_too_small_device() -> None:
    def factory() -> tuple[BlockDevice, Callable[[], None]]:
        return MemoryBlockDevice(1024), lambda: None

    with pytest.raises(AssertionError, match="at least 4194304 bytes"):
        check_block_device(factory)


def test_unexpected_device_errors_propagate_with_the_check_name() -> None:
    class ExplodingFlush(_Wrapper):
        def flush(self) -> None:
            raise OSError("device gone")

    def factory() -> tuple[BlockDevice, Callable[[], None]]:
        return ExplodingFlush(), lambda: None

    with pytest.raises(OSError, match="device gone") as info:
        check_block_device(factory)
    assert any("conformance check" in note for note in info.value.__notes__)
