"""A replica applies the primary's records with the primary's identity, refuses what does not
follow, takes resync blocks without overwriting newer live records, and can start a new log."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from engine_helpers import block_of

from blockyard.engine import Role, Volume, VolumeStore
from blockyard.engine.history import History, Segment
from blockyard.errors import FencedError, NotPrimaryError, ReplicationGapError, StaleEpochError
from blockyard.testing.faultfs import FaultFS

MIB = 1 << 20


@dataclass(frozen=True)
class Rec:
    lsn: int
    epoch: int
    generation: int
    kind: int
    block: int
    block_count: int
    data: bytes = b""


def w(lsn: int, block: int, tag: int, *, epoch: int = 1, gen: int = 77) -> Rec:
    return Rec(lsn, epoch, gen, 1, block, 1, block_of(tag))


def replica(store: VolumeStore, name: str = "r") -> Volume:
    vol = store.create(name, 8 * MIB)
    vol.set_role(Role.REPLICA, epoch=1)
    return vol


def test_records_keep_the_primary_identity_and_duplicates_are_skipped(
    store: VolumeStore,
) -> None:
    vol = replica(store)
    base = vol.last_lsn
    recs = [w(base + 1, 0, 1), w(base + 2, 1, 2), Rec(base + 3, 1, 77, 2, 0, 1)]
    assert vol.apply_replicated(recs) == base + 3
    assert vol.apply_replicated(recs[:2]) == base + 3  # resent after a reconnect
    assert vol.read(0, 8) == bytes(4096) and vol.read(8, 8) == block_of(2)
    out = vol.wal_records(base)
    assert [(r.lsn, r.epoch, r.generation) for r in out] == [
        (base + 1, 1, 77),
        (base + 2, 1, 77),
        (base + 3, 1, 77),
    ]
    assert vol.history.last == Segment(1, 77, base + 1)
    vol.close()


def test_gaps_newer_epochs_and_local_writes_are_refused(store: VolumeStore) -> None:
    vol = replica(store)
    base = vol.last_lsn
    with pytest.raises(ReplicationGapError):
        vol.apply_replicated([w(base + 1, 0, 1), w(base + 3, 0, 3)])
    assert vol.last_lsn == base + 1, "what came before the gap stays"
    with pytest.raises(StaleEpochError):
        vol.apply_replicated([w(base + 2, 0, 2, epoch=2)])
    with pytest.raises(NotPrimaryError):
        vol.write(0, block_of(9))
    with pytest.raises(NotPrimaryError):
        vol.unmap(0, 8)
    vol.close()


def test_a_new_segment_may_skip_lsns(store: VolumeStore) -> None:
    """After the primary crashed it numbers new records above everything it ever wrote; the
    jump comes with a new generation."""
    vol = replica(store)
    base = vol.last_lsn
    vol.apply_replicated([w(base + 1, 0, 1, gen=5)])
    vol.apply_replicated([w(base + 9, 1, 2, gen=6)])
    assert vol.last_lsn == base + 9
    segs = vol.history.segments
    # The skipped LSNs belong to no segment: the old one ends at the last record held.
    assert segs[-2] == Segment(1, 5, base + 1, base + 1) and segs[-1] == Segment(1, 6, base + 9)
    vol.close()


def test_primary_refuses_replicated_records(store: VolumeStore) -> None:
    vol = store.create("p", 8 * MIB)
    vol.set_role(Role.PRIMARY, epoch=1)
    with pytest.raises(FencedError):
        vol.apply_replicated([w(vol.last_lsn + 1, 0, 1)])
    vol.close()


def test_backfill_never_overwrites_a_newer_live_record(store: VolumeStore) -> None:
    vol = replica(store)
    base = vol.last_lsn
    vol.apply_replicated([w(base + 1, 3, 33)])  # live write to block 3, still in the WAL
    vol.apply_backfill([(2, 3, block_of(1, 3)), (10, 2, None)])
    assert vol.read(16, 8) == block_of(1)  # block 2 from backfill
    assert vol.read(24, 8) == block_of(33)  # block 3: the live record wins
    assert vol.read(32, 8) == block_of(1)
    vol.close()


def test_reset_log_retires_the_old_log() -> None:
    """Records of the old log past the new start stay physically in the WAL; with the new salt
    they are not this volume's any more, so recovery neither replays them nor reports them as
    damage (they would claim to be durable LSNs beyond the end of the log)."""
    fs = FaultFS()
    fs.mkdir("/d")
    store = VolumeStore("/d", fs=fs, background_flusher=False)
    vol = replica(store)
    base = vol.last_lsn
    vol.apply_replicated([w(base + i, i, i) for i in range(1, 5)])
    vol.flush()
    # These carry "durable through base + 4" in their headers.
    vol.apply_replicated([w(base + i, i, i) for i in range(5, 9)])
    vol.flush()
    hist = History([Segment(1, 99, base + 3)])
    vol.set_role(Role.REBUILDING)
    vol.reset_log(base + 3, hist)  # diverged after base + 2
    assert vol.last_lsn == base + 2
    vol.apply_replicated([w(base + 3, 7, 70, gen=99)])
    vol.flush()
    # Leave the new record in the WAL: the process dies, another opens the volume.
    del vol
    store = VolumeStore("/d", fs=fs, background_flusher=False)
    vol = store.open("r")
    try:
        assert vol.last_lsn == base + 3
        assert vol.read(56, 8) == block_of(70)
        assert vol.read(8, 8) == block_of(1), "applied before the reset"
        assert vol.history.segments == [Segment(1, 99, base + 3)]
    finally:
        vol.close()


def test_reset_log_frees_the_space_of_records_still_held(store: VolumeStore) -> None:
    """Records held in the WAL when the log is reset are retired with the old salt; their
    space must count as free again, or the WAL fills with nothing in it."""
    vol = store.create("r", 8 * MIB, wal_size_bytes=256 << 10)
    vol.set_role(Role.REPLICA, epoch=1)
    vol.track_replica("replica-1:7500")  # as a copy that was primary holds them
    base = vol.last_lsn
    vol.apply_replicated([w(base + 1 + i, i, i + 1) for i in range(20)])
    vol.checkpoint()
    assert vol.wal_usage().used_bytes > 0
    hist = History([Segment(1, 77, base + 1)])
    vol.reset_log(base + 100, hist)
    assert vol.wal_usage().used_bytes == 0
    # The freed space is usable: many times the WAL's size goes through it.
    for i in range(200):
        vol.apply_replicated([w(base + 100 + i, i % 64, i)])
    assert vol.last_lsn == base + 299
    vol.close()


# ---- try_apply_replicated: the receiver's non-waiting apply ------------------------------


def test_try_apply_takes_plain_records_that_continue_the_segment(store: VolumeStore) -> None:
    vol = replica(store)
    other = replica(store, "r2")
    base = vol.last_lsn
    vol.apply_replicated([w(base + 1, 0, 1)])  # opens the segment (its note is fsynced)
    other.apply_replicated([w(base + 1, 0, 1)])
    recs = [w(base + 2, 1, 2), Rec(base + 3, 1, 77, 2, 0, 1), w(base + 4, 5, 4)]
    assert vol.try_apply_replicated(recs) == base + 4
    assert other.apply_replicated(recs) == base + 4
    # The same log and the same blocks as the waiting apply.
    assert [(r.lsn, r.kind, r.block) for r in vol.wal_records(base)] == [
        (r.lsn, r.kind, r.block) for r in other.wal_records(base)
    ]
    assert vol.read(0, 48) == other.read(0, 48)
    vol.close()
    other.close()


def test_try_apply_declines_what_may_wait_and_applies_nothing(store: VolumeStore) -> None:
    vol = replica(store)
    base = vol.last_lsn
    # The first record of a segment: its history note is synced.
    assert vol.try_apply_replicated([w(base + 1, 0, 1)]) is None
    assert vol.last_lsn == base
    vol.apply_replicated([w(base + 1, 0, 1)])
    declined = [
        [w(base + 2, 0, 2), w(base + 9, 1, 9)],  # a gap
        [w(base + 1, 0, 1)],  # a duplicate
        [w(base + 2, 0, 2, gen=78)],  # a new segment
        [w(base + 2, 0, 2, epoch=2)],  # a newer epoch (the waiting path raises)
        [w(base + 2, 0, 2), Rec(base + 3, 1, 77, 2, 0, 1 << 20)],  # a range record
        [],
    ]
    for recs in declined:
        assert vol.try_apply_replicated(recs) is None, recs
        assert vol.last_lsn == base + 1, recs
    # The WAL has no room now: declined, not waited for.
    big = [Rec(base + 2 + i, 1, 77, 1, i * 256, 256, bytes(MIB)) for i in range(64)]
    assert vol.try_apply_replicated(big) is None
    assert vol.last_lsn == base + 1
    # A primary takes none.
    vol.set_role(Role.PRIMARY, epoch=2)
    assert vol.try_apply_replicated([w(base + 2, 0, 2)]) is None
    vol.close()
