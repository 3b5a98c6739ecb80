"""Snapshots: copy-on-write accounting, stable views, delete, restore and clone."""

from __future__ import annotations

import pytest
from engine_helpers import MIB, block_of, random_bytes, read_all, wait_checkpointed

from blockyard.engine import Volume, VolumeStore
from blockyard.errors import (
    InvalidNameError,
    OutOfRangeError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    VolumeExistsError,
)


def read_snapshot_all(vol: Volume, name: str) -> bytes:
    size = vol.get_snapshot(name).size_bytes
    step = 8 * MIB // 512
    count = size // 512
    return b"".join(
        vol.read_snapshot(name, lba, min(step, count - lba)) for lba in range(0, count, step)
    )


def test_create_list_read_delete(store: VolumeStore) -> None:
    with store.create("v", 4 * MIB) as vol:
        vol.write(0, block_of(1))
        a = vol.create_snapshot("a")
        vol.write(0, block_of(2))
        b = vol.create_snapshot("b")
        assert (a.name, b.name) == ("a", "b")
        assert b.seq > a.seq
        assert a.size_bytes == 4 * MIB
        assert a.uuid != b.uuid
        assert a.created_ns <= b.created_ns
        assert [s.name for s in vol.list_snapshots()] == ["a", "b"]
        assert vol.get_snapshot("a").uuid == a.uuid
        assert vol.read_snapshot("a", 0, 8) == block_of(1)
        assert vol.read_snapshot("b", 0, 8) == block_of(2)
        # Sub-block reads of a snapshot.
        assert vol.read_snapshot("a", 3, 2) == block_of(1)[:1024]
        vol.delete_snapshot("a")
        assert [s.name for s in vol.list_snapshots()] == ["b"]
        with pytest.raises(SnapshotNotFoundError):
            vol.read_snapshot("a", 0, 1)
        assert vol.read_snapshot("b", 0, 8) == block_of(2)
        assert vol.read(0, 8) == block_of(2)


def test_snapshot_includes_unflushed_writes(store: VolumeStore) -> None:
    # "Everything acknowledged before the call": a write still in the WAL belongs in it.
    with store.create("v", 4 * MIB) as vol:
        vol.write(16, block_of(6))
        vol.unmap(0, 8)
        vol.create_snapshot("s")
        assert vol.read_snapshot("s", 16, 8) == block_of(6)
        assert vol.read_snapshot("s", 0, 8) == bytes(4096)


def test_cow_costs_one_block_per_first_overwrite(store: VolumeStore) -> None:
    with store.create("v", 4 * MIB) as vol:
        vol.write(0, block_of(1, 4))
        vol.create_snapshot("s")
        assert vol.get_snapshot("s").delta_blocks == 0, "a new snapshot must be empty (O(1))"

        vol.write(8, block_of(2))  # physical block 1
        wait_checkpointed(vol)
        assert vol.get_snapshot("s").delta_blocks == 1

        vol.write(8, block_of(3))
        vol.write(9, b"\x04" * 512)
        wait_checkpointed(vol)
        assert vol.get_snapshot("s").delta_blocks == 1, "overwriting again must not copy again"

        vol.unmap(16, 8)  # physical block 2: preserved before it is punched
        wait_checkpointed(vol)
        assert vol.get_snapshot("s").delta_blocks == 2
        assert vol.read_snapshot("s", 0, 32) == block_of(1, 4)


def test_cow_for_a_new_snapshot_starts_again(store: VolumeStore) -> None:
    with store.create("v", 4 * MIB) as vol:
        vol.write(0, block_of(1))
        vol.create_snapshot("a")
        vol.write(0, block_of(2))
        vol.create_snapshot("b")
        vol.write(0, block_of(3))
        wait_checkpointed(vol)
        # The newest snapshot pays for the newest overwrite; the older one keeps its own copy.
        assert vol.get_snapshot("a").delta_blocks == 1
        assert vol.get_snapshot("b").delta_blocks == 1
        assert vol.read_snapshot("a", 0, 8) == block_of(1)
        assert vol.read_snapshot("b", 0, 8) == block_of(2)
        assert vol.read(0, 8) == block_of(3)


def test_snapshot_view_is_stable_under_writes_and_unmaps(store: VolumeStore) -> None:
    with store.create("v", 8 * MIB) as vol:
        base = random_bytes(6 * MIB, seed=11)
        vol.write(0, base)
        vol.create_snapshot("s")
        vol.write(3, random_bytes(4096 * 3, seed=12))
        vol.unmap(100, 9)
        vol.write_zeroes(200, 8 * 10)
        vol.write_same(5000, 64, b"\x5a" * 512)
        # Large unmaps (> 1 MiB) bypass the WAL and punch the data region directly.
        vol.unmap(2048, 3 * MIB // 512)
        assert vol.read(4096, 8) == bytes(4096)
        assert read_snapshot_all(vol, "s") == base + bytes(2 * MIB)
        wait_checkpointed(vol)
        assert read_snapshot_all(vol, "s") == base + bytes(2 * MIB)
        vol.unmap(0, vol.block_count)
        assert read_all(vol) == bytes(8 * MIB)
        assert read_snapshot_all(vol, "s") == base + bytes(2 * MIB)
    with store.open("v") as vol:
        assert read_snapshot_all(vol, "s") == base + bytes(2 * MIB)


def test_deleting_snapshots_keeps_the_others_views(store: VolumeStore) -> None:
    with store.create("v", 4 * MIB) as vol:
        views: dict[str, bytes] = {}
        for i, name in enumerate(["s1", "s2", "s3", "s4"]):
            # Each generation changes some blocks the previous one also changed, and some new.
            vol.write(0, block_of(10 + i, 2))
            vol.write(8 * (4 + i), block_of(20 + i))
            if i == 2:
                vol.unmap(0, 8)
            vol.create_snapshot(name)
            views[name] = vol.read(0, 64)
        vol.write(0, block_of(99, 8))
        wait_checkpointed(vol)

        vol.delete_snapshot("s2")  # a middle one
        for name in ("s1", "s3", "s4"):
            assert vol.read_snapshot(name, 0, 64) == views[name], name
        vol.delete_snapshot("s4")  # the newest
        for name in ("s1", "s3"):
            assert vol.read_snapshot(name, 0, 64) == views[name], name
        vol.write(0, block_of(98, 8))
        wait_checkpointed(vol)
        vol.delete_snapshot("s1")  # the oldest
        assert vol.read_snapshot("s3", 0, 64) == views["s3"]
        assert [s.name for s in vol.list_snapshots()] == ["s3"]
    with store.open("v") as vol:
        assert vol.read_snapshot("s3", 0, 64) == views["s3"]
        assert vol.read(0, 64) == block_of(98, 8)


def test_snapshots_survive_reopen(store: VolumeStore) -> None:
    vol = store.create("v", 4 * MIB)
    vol.write(0, block_of(1))
    vol.create_snapshot("a")
    vol.write(0, block_of(2))
    vol.close()
    with store.open("v") as vol:
        assert [s.name for s in vol.list_snapshots()] == ["a"]
        assert vol.read_snapshot("a", 0, 8) == block_of(1)
        assert vol.read(0, 8) == block_of(2)
        # The snapshot keeps its view for overwrites after the reopen too.
        vol.write(0, block_of(3))
        wait_checkpointed(vol)
        assert vol.read_snapshot("a", 0, 8) == block_of(1)


def test_restore_snapshot(store: VolumeStore) -> None:
    with store.create("v", 4 * MIB) as vol:
        vol.write(0, block_of(1, 4))
        vol.unmap(8, 8)
        vol.create_snapshot("s")
        expected = read_snapshot_all(vol, "s")
        vol.write(0, block_of(2, 16))
        vol.write(vol.block_count - 8, block_of(3))
        vol.create_snapshot("later")
        later = read_snapshot_all(vol, "later")
        vol.write(0, block_of(4))
        vol.unmap(24, 8)
        wait_checkpointed(vol)

        vol.restore_snapshot("s")
        assert read_all(vol) == expected
        # Restoring goes through the WAL, so newer snapshots keep their views.
        assert read_snapshot_all(vol, "later") == later
    with store.open("v") as vol:
        assert read_all(vol) == expected


def test_restore_snapshot_taken_before_grow(store: VolumeStore) -> None:
    with store.create("v", 4 * MIB) as vol:
        vol.write(0, block_of(1))
        vol.create_snapshot("small")
        vol.grow(8 * MIB)
        vol.write(4 * MIB // 512, block_of(2))
        vol.write(0, block_of(3))
        wait_checkpointed(vol)
        vol.restore_snapshot("small")
        assert vol.size_bytes == 8 * MIB, "restore does not shrink the volume"
        assert vol.read(0, 8) == block_of(1)
        assert vol.read(4 * MIB // 512, 8) == bytes(4096), "the grown area must read as zeros"
        with pytest.raises(OutOfRangeError, match="outside its"):
            vol.read_snapshot("small", 4 * MIB // 512, 1)


def test_bug_restore_snapshot_undoes_writes_still_in_the_wal(store: VolumeStore) -> None:
    """Restore used to rewrite only blocks held in snapshot deltas without draining the WAL,
    so writes not yet checkpointed survived the restore."""
    with store.create("v", 4 * MIB) as vol:
        vol.write(0, block_of(1))
        vol.create_snapshot("s")
        vol.write(0, block_of(2))
        vol.restore_snapshot("s")
        assert vol.read(0, 8) == block_of(1)


def test_clone_is_independent(store: VolumeStore) -> None:
    src = store.create("src", 4 * MIB)
    data = random_bytes(3 * MIB, seed=21)
    src.write(0, data)
    src.unmap(8, 16)
    src.create_snapshot("s")
    expected = read_snapshot_all(src, "s")
    src.write(0, block_of(7, 64))
    src.grow(8 * MIB)
    wait_checkpointed(src)

    clone = store.clone(src, "s", "copy")
    assert clone.size_bytes == 4 * MIB, "a clone has the snapshot's size"
    assert clone.uuid != src.uuid
    assert read_all(clone) == expected
    assert clone.list_snapshots() == []

    clone.write(0, block_of(8, 8))
    assert src.read(0, 64 * 8) == block_of(7, 64)
    assert src.read_snapshot("s", 0, 64) == expected[: 64 * 512]
    src.delete_snapshot("s")
    src.close()
    store.delete("src")
    assert clone.read(64, 64) == expected[64 * 512 : 128 * 512]
    clone.close()
    with store.open("copy") as clone:
        assert clone.read(0, 64) == block_of(8, 8)
        assert clone.read(64, 3 * MIB // 512 - 64) == expected[64 * 512 : 3 * MIB]


def test_clone_errors(store: VolumeStore) -> None:
    with store.create("v", 2 * MIB) as vol:
        vol.create_snapshot("s")
        with pytest.raises(SnapshotNotFoundError, match="snapshot list"):
            store.clone(vol, "nope", "c")
        with pytest.raises(VolumeExistsError):
            store.clone(vol, "s", "v")
        with pytest.raises(InvalidNameError):
            store.clone(vol, "s", "bad name")
        assert store.names() == ["v"]


@pytest.mark.parametrize("name", ["", ".x", "a/b", "sp ace", "y" * 129])
def test_snapshot_names_are_validated(store: VolumeStore, name: str) -> None:
    with store.create("v", 2 * MIB) as vol:
        with pytest.raises(InvalidNameError, match="snapshot name"):
            vol.create_snapshot(name)
        assert vol.list_snapshots() == []


def test_duplicate_and_unknown_snapshots(store: VolumeStore) -> None:
    with store.create("v", 2 * MIB) as vol:
        vol.create_snapshot("s")
        with pytest.raises(SnapshotExistsError, match="pick another name"):
            vol.create_snapshot("s")
        assert len(vol.list_snapshots()) == 1
        for op in (
            lambda: vol.read_snapshot("t", 0, 1),
            lambda: vol.delete_snapshot("t"),
            lambda: vol.restore_snapshot("t"),
            lambda: vol.get_snapshot("t"),
        ):
            with pytest.raises(SnapshotNotFoundError, match="has no snapshot 't'"):
                op()
        # A deleted name can be reused.
        vol.delete_snapshot("s")
        vol.create_snapshot("s")
        assert [s.name for s in vol.list_snapshots()] == ["s"]


def test_snapshot_read_bounds(store: VolumeStore) -> None:
    with store.create("v", 2 * MIB) as vol:
        vol.create_snapshot("s")
        with pytest.raises(OutOfRangeError):
            vol.read_snapshot("s", vol.block_count - 1, 2)
        with pytest.raises(OutOfRangeError):
            vol.read_snapshot("s", -1, 1)
        assert vol.read_snapshot("s", vol.block_count - 1, 1) == bytes(512)
