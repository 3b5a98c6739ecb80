"""Epoch fencing, role transitions and the replication feed (``wal_records``)."""

from __future__ import annotations

import pytest
from engine_helpers import MIB, block_of, wait_checkpointed

from blockyard.engine import Role, VolumeStore
from blockyard.engine.wal import Kind
from blockyard.errors import (
    EpochAheadError,
    EpochRegressionError,
    InvalidRoleTransitionError,
    StaleEpochError,
    WalTruncatedError,
)


def test_epoch_only_moves_forward(store: VolumeStore) -> None:
    with store.create("v", 2 * MIB) as vol:
        vol.set_epoch(3)
        vol.set_epoch(3)
        assert vol.epoch == 3
        with pytest.raises(EpochRegressionError, match="fetch the current epoch from the master"):
            vol.set_epoch(2)
        assert vol.epoch == 3
        vol.set_epoch(10)
    with store.open("v") as vol:
        assert vol.epoch == 10
        assert store.info("v").epoch == 10


def test_write_epoch_fencing(store: VolumeStore) -> None:
    with store.create("v", 2 * MIB) as vol:
        vol.set_epoch(5)
        vol.write(0, block_of(1), epoch=5)
        with pytest.raises(StaleEpochError, match="deposed primary") as info:
            vol.write(0, block_of(2), epoch=4)
        assert (info.value.volume_epoch, info.value.request_epoch) == (5, 4)
        with pytest.raises(EpochAheadError, match="assign the new epoch to the volume first"):
            vol.write(0, block_of(3), epoch=6)
        # Unfenced writes (epoch None) are local writes and always allowed.
        vol.write(8, block_of(4))
        assert vol.read(0, 8) == block_of(1), "a fenced write must not change data"
        assert [r.epoch for r in vol.wal_records(0)] == [5, 5]
    with store.open("v") as vol:
        with pytest.raises(StaleEpochError):
            vol.write(0, block_of(2), epoch=4)
        vol.write(0, block_of(5), epoch=5)
        assert vol.read(0, 8) == block_of(5)


def test_stale_epoch_is_also_refused_for_fua_writes(store: VolumeStore) -> None:
    with store.create("v", 2 * MIB) as vol:
        vol.set_epoch(2)
        with pytest.raises(StaleEpochError):
            vol.write(0, block_of(1), epoch=1, fua=True)
        assert vol.read(0, 8) == bytes(4096)


@pytest.mark.parametrize(
    ("start", "to"),
    [
        (Role.NONE, Role.PRIMARY),
        (Role.NONE, Role.REPLICA),
        (Role.NONE, Role.REBUILDING),
        (Role.PRIMARY, Role.REPLICA),
        (Role.PRIMARY, Role.REBUILDING),
        (Role.PRIMARY, Role.NONE),
        (Role.REBUILDING, Role.REPLICA),
        (Role.REBUILDING, Role.NONE),
        (Role.REPLICA, Role.REBUILDING),
    ],
)
def test_allowed_role_transitions(store: VolumeStore, start: Role, to: Role) -> None:
    vol = store.create("v", 2 * MIB)
    vol.set_role(start, epoch=1)
    vol.set_role(to)
    assert (vol.role, vol.epoch) == (to, 1)
    vol.close()
    assert store.info("v").role is to


def test_rebuilding_cannot_become_primary(store: VolumeStore) -> None:
    with store.create("v", 2 * MIB) as vol:
        vol.set_role(Role.REBUILDING, epoch=1)
        with pytest.raises(InvalidRoleTransitionError, match="allowed from rebuilding"):
            vol.set_role(Role.PRIMARY, epoch=2)
        assert (vol.role, vol.epoch) == (Role.REBUILDING, 1), "a refused change must change nothing"


def test_replica_promotion_requires_epoch_bump(store: VolumeStore) -> None:
    with store.create("v", 2 * MIB) as vol:
        vol.set_role(Role.REPLICA, epoch=4)
        with pytest.raises(InvalidRoleTransitionError, match="pass epoch > current"):
            vol.set_role(Role.PRIMARY)
        with pytest.raises(InvalidRoleTransitionError):
            vol.set_role(Role.PRIMARY, epoch=4)
        with pytest.raises(EpochRegressionError):
            vol.set_role(Role.PRIMARY, epoch=3)
        assert (vol.role, vol.epoch) == (Role.REPLICA, 4)
        vol.set_role(Role.PRIMARY, epoch=5)
        assert (vol.role, vol.epoch) == (Role.PRIMARY, 5)
    with store.open("v") as vol:
        assert (vol.role, vol.epoch) == (Role.PRIMARY, 5)


def test_role_change_cannot_regress_epoch(store: VolumeStore) -> None:
    with store.create("v", 2 * MIB) as vol:
        vol.set_role(Role.PRIMARY, epoch=7)
        with pytest.raises(EpochRegressionError):
            vol.set_role(Role.REPLICA, epoch=6)
        assert (vol.role, vol.epoch) == (Role.PRIMARY, 7)


# ---- wal_records ----------------------------------------------------------------------------


def test_wal_records_in_order_with_lsn_and_epoch(store: VolumeStore) -> None:
    with store.create("v", 4 * MIB) as vol:
        start = vol.last_lsn
        vol.set_epoch(1)
        vol.write(0, block_of(1, 2))
        vol.write(8 * 5 + 1, b"\x09" * 512)  # inside physical block 5
        vol.set_epoch(2)
        vol.unmap(8 * 20, 8 * 3)
        vol.write(8 * 30, block_of(3), epoch=2)

        records = vol.wal_records(start)
        assert [r.lsn for r in records] == list(range(start + 1, start + 5))
        assert vol.last_lsn == start + 4
        assert [r.epoch for r in records] == [1, 1, 2, 2]
        assert [r.kind for r in records] == [Kind.WRITE, Kind.WRITE, Kind.ZERO, Kind.WRITE]
        assert [(r.lba, r.block_count) for r in records] == [(0, 16), (40, 8), (160, 24), (240, 8)]
        assert records[0].data == block_of(1, 2)
        # A sub-block write ships the whole merged 4 KiB block a replica can apply as is.
        assert records[1].data == bytes(512) + b"\x09" * 512 + bytes(6 * 512)
        assert records[2].data is None
        # "since" is exclusive.
        assert [r.lsn for r in vol.wal_records(start + 2)] == [start + 3, start + 4]
        assert vol.wal_records(vol.last_lsn) == []


def test_wal_records_truncated_after_checkpoint(store: VolumeStore) -> None:
    with store.create("v", 4 * MIB) as vol:
        vol.write(0, block_of(1))
        vol.write(8, block_of(2))
        first = vol.wal_records(0)
        assert len(first) == 2
        wait_checkpointed(vol)
        with pytest.raises(WalTruncatedError, match="rebuild the replica in full"):
            vol.wal_records(0)
        # A follower that already has everything up to the checkpoint is fine.
        assert vol.wal_records(vol.last_lsn) == []
        vol.write(16, block_of(3))
        after = vol.wal_records(first[-1].lsn)
        assert [r.data for r in after] == [block_of(3)]
        assert after[0].lsn > first[-1].lsn


def test_lsns_keep_increasing_across_reopen(store: VolumeStore) -> None:
    vol = store.create("v", 4 * MIB)
    vol.write(0, block_of(1))
    vol.write(8, block_of(2))
    last = vol.last_lsn
    vol.close()
    with store.open("v") as vol:
        assert vol.last_lsn >= last
        vol.write(0, block_of(3))
        recs = vol.wal_records(vol.last_lsn - 1)
        assert [r.lsn for r in recs] == [vol.last_lsn]
        assert recs[0].lsn > last, "an LSN was reused after reopen"


def test_bug_large_unmap_reaches_the_replication_feed(store: VolumeStore) -> None:
    """Unmaps above 256 physical blocks used to punch the data region without a WAL record,
    so a caught-up follower silently missed the discard."""
    with store.create("v", 8 * MIB) as vol:
        vol.write(0, block_of(1, 512))
        follower_lsn = vol.last_lsn
        vol.unmap(0, 2 * MIB // 512)
        try:
            records = vol.wal_records(follower_lsn)
        except WalTruncatedError:
            return  # Acceptable: the follower is told to rebuild.
        covered = {
            lba
            for r in records
            if r.kind is Kind.ZERO
            for lba in range(r.lba, r.lba + r.block_count)
        }
        assert set(range(0, 2 * MIB // 512)) <= covered
