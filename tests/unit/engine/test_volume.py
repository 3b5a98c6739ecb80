"""Volume data path: grow, write-same, provisioning status, argument checks and closed handles."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from engine_helpers import MIB, block_of, random_bytes, read_all, wait_checkpointed

from blockyard.engine import Volume, VolumeStore
from blockyard.errors import (
    InvalidSizeError,
    MisalignedError,
    OutOfRangeError,
    ShrinkRefusedError,
    TransferTooLargeError,
    VolumeClosedError,
)

# ---- grow -----------------------------------------------------------------------------------


def test_grow_online(store: VolumeStore) -> None:
    vol = store.create("v", 4 * MIB)
    old_last = vol.block_count - 1
    vol.write(old_last, b"\x11" * 512)
    vol.grow(8 * MIB)
    assert vol.size_bytes == 8 * MIB
    assert vol.block_count == 8 * MIB // 512
    assert vol.read(old_last, 1) == b"\x11" * 512
    # The new area reads as zeros and is usable at once, up to the new last block.
    assert vol.read(old_last + 1, 8192) == bytes(8192 * 512)
    new_last = vol.block_count - 1
    vol.write(new_last, b"\x22" * 512)
    # A write straddling the old end is one ordinary write now.
    vol.write(old_last, b"\x33" * 1024)
    assert vol.read(old_last, 2) == b"\x33" * 1024
    assert vol.read(new_last, 1) == b"\x22" * 512
    assert store.info("v").size_bytes == 8 * MIB
    with pytest.raises(OutOfRangeError):
        vol.read(new_last, 2)


def test_grow_survives_reopen(store: VolumeStore) -> None:
    vol = store.create("v", 4 * MIB)
    vol.grow(12 * MIB)
    vol.write(12 * MIB // 512 - 8, block_of(5))
    # The grow is durable on return; the write only after close, which flushes everything.
    vol.close()
    assert store.info("v").size_bytes == 12 * MIB
    with store.open("v") as vol:
        assert vol.size_bytes == 12 * MIB
        assert vol.read(vol.block_count - 8, 8) == block_of(5)
        assert vol.read(4 * MIB // 512, 8) == bytes(4096)


def test_grow_to_same_size_is_a_noop(store: VolumeStore) -> None:
    with store.create("v", 4 * MIB) as vol:
        vol.write(0, block_of(1))
        vol.grow(4 * MIB)
        assert vol.size_bytes == 4 * MIB
        assert vol.read(0, 8) == block_of(1)


def test_shrink_is_refused(store: VolumeStore) -> None:
    with store.create("v", 8 * MIB) as vol:
        vol.write(vol.block_count - 8, block_of(4))
        with pytest.raises(ShrinkRefusedError, match="Create a smaller volume and copy instead"):
            vol.grow(4 * MIB)
        assert vol.size_bytes == 8 * MIB
        assert vol.read(vol.block_count - 8, 8) == block_of(4)


@pytest.mark.parametrize("size", [8 * MIB + 512, 8 * MIB + 1, 16 << 40])
def test_grow_to_invalid_size(store: VolumeStore, size: int) -> None:
    with store.create("v", 4 * MIB) as vol:
        with pytest.raises(InvalidSizeError, match="must be a multiple of 4096 and at most"):
            vol.grow(size)
        assert vol.size_bytes == 4 * MIB


def test_grown_area_over_old_sparse_tail_reads_zeros_after_unmap_and_reopen(
    store: VolumeStore,
) -> None:
    # Data written near the old end, then a large unmap, then grow: no stale bytes may appear.
    vol = store.create("v", 4 * MIB)
    vol.write(0, random_bytes(4 * MIB, seed=3))
    vol.unmap(0, 4 * MIB // 512)
    vol.grow(6 * MIB)
    vol.close()
    with store.open("v") as vol:
        assert read_all(vol) == bytes(6 * MIB)


# ---- write_same -----------------------------------------------------------------------------


def test_write_same_with_pattern(store: VolumeStore) -> None:
    with store.create("v", 8 * MIB) as vol:
        pattern = bytes(range(256)) * 2
        vol.write(0, b"\xff" * 4096 * 2)
        # Unaligned, and longer than one 1 MiB expansion chunk.
        count = 3 * MIB // 512 + 3
        vol.write_same(3, count, pattern)
        assert vol.read(0, 3) == b"\xff" * 3 * 512
        got = b"".join(
            vol.read(lba, min(4096, 3 + count - lba)) for lba in range(3, 3 + count, 4096)
        )
        assert got == pattern * count
        assert vol.read(3 + count, 8) == bytes(4096)


def test_write_same_with_zero_pattern_deallocates(store: VolumeStore) -> None:
    with store.create("v", 4 * MIB) as vol:
        vol.write(0, block_of(7, 4))
        vol.write_same(0, 32, bytes(512))
        assert vol.read(0, 32) == bytes(4 * 4096)
        assert vol.lba_status(0).mapped is False


def test_write_same_rejects_wrong_pattern_size(store: VolumeStore) -> None:
    with store.create("v", 4 * MIB) as vol:
        with pytest.raises(MisalignedError, match="exactly 512 bytes"):
            vol.write_same(0, 8, b"\x01" * 4096)
        with pytest.raises(OutOfRangeError):
            vol.write_same(vol.block_count - 1, 2, b"\x01" * 512)
        assert vol.read(vol.block_count - 1, 1) == bytes(512)


# ---- lba_status -----------------------------------------------------------------------------


def test_lba_status_tracks_writes_and_unmaps(store: VolumeStore) -> None:
    with store.create("v", 8 * MIB) as vol:
        status = vol.lba_status(0)
        assert status.mapped is False
        assert status.lba + status.block_count == vol.block_count, "a fresh volume is one hole"

        vol.write(8 * 10, block_of(1, 4))  # physical blocks 10..13
        st = vol.lba_status(80)
        assert (st.mapped, st.lba) == (True, 80)
        assert 1 <= st.block_count <= 32
        assert vol.lba_status(79).mapped is False
        assert vol.lba_status(79).block_count == 1, "the hole before a mapped run ends at it"
        assert vol.lba_status(111).mapped is True
        assert vol.lba_status(112).mapped is False

        vol.unmap(88, 8)  # physical block 11
        assert vol.lba_status(88).mapped is False
        assert vol.lba_status(96).mapped is True

        # Same answers once the WAL is applied to the data region (holes punched).
        wait_checkpointed(vol)
        assert vol.lba_status(80).mapped is True
        assert vol.lba_status(80).block_count == 8
        assert vol.lba_status(88).mapped is False
        assert vol.lba_status(96).mapped is True
        assert vol.lba_status(96).block_count == 16

        # A large unmap takes the direct path; status follows it.
        vol.write(4096, random_bytes(2 * MIB, seed=9))
        vol.unmap(4096, 2 * MIB // 512)
        assert vol.lba_status(4096).mapped is False
        assert vol.lba_status(4096 + 2 * MIB // 512 - 1).mapped is False


def test_lba_status_run_stays_inside_volume(store: VolumeStore) -> None:
    with store.create("v", 4 * MIB) as vol:
        vol.write(vol.block_count - 8, block_of(1))
        for lba in (vol.block_count - 8, vol.block_count - 1):
            st = vol.lba_status(lba)
            assert st.mapped is True
            assert st.lba + st.block_count == vol.block_count
        wait_checkpointed(vol)
        st = vol.lba_status(vol.block_count - 3)
        assert (st.mapped, st.block_count) == (True, 3)


# ---- argument checks ------------------------------------------------------------------------


def test_transfer_cap_and_unmap_without_cap(store: VolumeStore) -> None:
    with store.create("v", 16 * MIB) as vol:
        cap = vol.max_transfer_blocks
        assert cap * 512 == 8 * MIB
        with pytest.raises(TransferTooLargeError, match="split the request"):
            vol.read(0, cap + 1)
        with pytest.raises(TransferTooLargeError):
            vol.write(0, bytes((cap + 8) * 512))
        # Unmap is not a data transfer: a whole-device discard (mkfs) is one request.
        vol.write(vol.block_count - 8, block_of(2))
        vol.unmap(0, vol.block_count)
        assert vol.read(vol.block_count - 8, 8) == bytes(4096)


def test_writes_refused_mid_range_change_nothing(store: VolumeStore) -> None:
    with store.create("v", 4 * MIB) as vol:
        vol.write(vol.block_count - 1, b"\x01" * 512)
        with pytest.raises(OutOfRangeError, match="outside the volume"):
            vol.write(vol.block_count - 1, b"\x02" * 1024)
        with pytest.raises(MisalignedError, match="pad the write"):
            vol.write(0, b"\x02" * 700)
        assert vol.read(vol.block_count - 1, 1) == b"\x01" * 512
        assert vol.read(0, 2) == bytes(1024)
        assert vol.last_lsn == 1, "refused writes must not be logged"


def test_empty_write_is_a_noop(store: VolumeStore) -> None:
    with store.create("v", 4 * MIB) as vol:
        vol.write(5, b"")
        vol.unmap(5, 0)
        assert vol.last_lsn == 0
        assert vol.read(5, 0) == b""


# ---- closed handles -------------------------------------------------------------------------

_Op = Callable[[Volume], object]

_REFUSED_AFTER_CLOSE: list[tuple[str, _Op]] = [
    ("write", lambda v: v.write(0, bytes(512))),
    ("write_fua", lambda v: v.write(0, bytes(4096), fua=True)),
    ("unmap", lambda v: v.unmap(0, 8)),
    ("write_zeroes", lambda v: v.write_zeroes(0, 8)),
    ("write_same", lambda v: v.write_same(0, 8, b"\x01" * 512)),
    ("flush", lambda v: v.flush()),
    ("grow", lambda v: v.grow(8 * MIB)),
    ("set_epoch", lambda v: v.set_epoch(5)),
    ("create_snapshot", lambda v: v.create_snapshot("late")),
    ("delete_snapshot", lambda v: v.delete_snapshot("s")),
    ("read_snapshot", lambda v: v.read_snapshot("s", 0, 1)),
    ("restore_snapshot", lambda v: v.restore_snapshot("s")),
]

# Regression: these used to hit the closed file descriptor (StorageIOError) or succeed.
_REFUSED_AFTER_CLOSE_READS: list[tuple[str, _Op]] = [
    ("read", lambda v: v.read(0, 1)),
    ("readinto", lambda v: v.readinto(0, memoryview(bytearray(512)))),
    ("lba_status", lambda v: v.lba_status(0)),
    ("list_snapshots", lambda v: v.list_snapshots()),
    ("get_snapshot", lambda v: v.get_snapshot("s")),
    ("snapshot_extents", lambda v: v.snapshot_extents("s")),
]


@pytest.mark.parametrize(
    "op",
    [
        pytest.param(op, id=name)
        for name, op in [*_REFUSED_AFTER_CLOSE, *_REFUSED_AFTER_CLOSE_READS]
    ],
)
def test_closed_volume_refuses_operations(store: VolumeStore, op: _Op) -> None:
    vol = store.create("v", 4 * MIB)
    vol.write(0, block_of(1))
    vol.create_snapshot("s")
    vol.close()
    assert vol.closed
    with pytest.raises(VolumeClosedError, match="open it again"):
        op(vol)
    with store.open("v") as again:
        assert again.read(0, 8) == block_of(1)
        assert [s.name for s in again.list_snapshots()] == ["s"]


def test_close_is_idempotent_and_releases_the_name(store: VolumeStore) -> None:
    vol = store.create("v", 4 * MIB)
    vol.close()
    vol.close()
    store.open("v").close()
    store.delete("v")
    assert store.names() == []
