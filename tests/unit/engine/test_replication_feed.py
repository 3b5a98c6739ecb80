"""The engine's replication feed: records in order, push notification, WAL retention for
lagging replicas, the bound past which a replica's misses go to its bitmap, and retention across
a restart of the primary."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_helpers import block_of

from blockyard.engine import Role, Volume, VolumeStore, wal
from blockyard.engine.limits import RETENTION_MAX_S
from blockyard.errors import FeedLostError, WalTruncatedError

MIB = 1 << 20
WAL = 256 << 10
R1 = "replica-1:7500"


def primary(store: VolumeStore, name: str = "v") -> Volume:
    vol = store.create(name, 8 * MIB, wal_size_bytes=WAL)
    vol.set_role(Role.PRIMARY, epoch=1)
    return vol


class Notes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def test_feed_hands_out_records_in_order_and_notifies_once(store: VolumeStore) -> None:
    vol = primary(store)
    vol.track_replica(R1)
    start = vol.last_lsn
    notes = Notes()
    feed = vol.open_feed(R1, start, notes)
    assert feed.take(1 << 20) == []
    lsns = [vol.write(i * 8, block_of(i + 1)) for i in range(5)]
    lsns.append(vol.unmap(0, 8))
    assert notes.count == 1, "armed once, called once for a burst of writes"
    recs = feed.take(3 * 4096)
    assert [r.lsn for r in recs] == lsns[:3]
    assert recs[0].data == block_of(1) and recs[0].generation == vol.generation
    recs += feed.take(1 << 20)
    assert [r.lsn for r in recs] == lsns
    assert recs[-1].kind is wal.Kind.ZERO and recs[-1].data is None
    assert feed.take(1 << 20) == []
    vol.close()


def test_wal_is_retained_for_a_lagging_feed_until_acked(store: VolumeStore) -> None:
    vol = primary(store)
    vol.track_replica(R1)
    feed = vol.open_feed(R1, vol.last_lsn, Notes())
    lsns = [vol.write(i * 8, block_of(i + 1)) for i in range(4)]
    vol.checkpoint()
    # Applied to the data region, but the replica has not acknowledged: still available.
    assert vol.oldest_available_lsn() == lsns[0]
    assert [r.lsn for r in feed.take(1 << 20)] == lsns
    feed.ack(lsns[1])
    assert vol.oldest_available_lsn() == lsns[2]
    feed.ack(lsns[3])
    assert vol.oldest_available_lsn() == vol.last_lsn + 1
    vol.close()


def test_past_the_byte_bound_misses_go_to_the_bitmap_and_the_feed_is_lost(
    store: VolumeStore,
) -> None:
    vol = primary(store)
    bitmap = vol.track_replica(R1)
    feed = vol.open_feed(R1, vol.last_lsn, Notes())
    # Far more than half the WAL, never acknowledged: writers must not stall.
    for i in range(200):
        vol.write((i % 500) * 8, block_of(i + 1))
    vol.checkpoint()
    with pytest.raises(FeedLostError):
        for _ in range(1000):
            if not feed.take(1 << 20):
                break
    assert bitmap.active
    marked = {b for first, n in bitmap.runs() for b in range(first, first + n)}
    assert marked, "released records must be in the bitmap"
    # Every block not marked must still be in the WAL for the replica.
    held = {r.block for r in vol.wal_records(vol.covered_lsn(R1))}
    assert set(range(200)) <= marked | held
    vol.close()


def test_past_the_time_bound_misses_go_to_the_bitmap(store: VolumeStore) -> None:
    vol = primary(store)
    bitmap = vol.track_replica(R1)
    now = [1000.0]
    vol._clock = lambda: now[0]
    vol.open_feed(R1, vol.last_lsn, Notes())
    vol.write(0, block_of(1))
    vol.checkpoint()
    assert not bitmap.active
    now[0] += RETENTION_MAX_S + 1
    vol.checkpoint()
    assert bitmap.active and list(bitmap.runs()) == [(0, 1)]
    assert vol.oldest_available_lsn() == vol.last_lsn + 1
    vol.close()


def test_open_feed_refuses_records_no_longer_held(store: VolumeStore) -> None:
    vol = primary(store)
    vol.write(0, block_of(1))
    vol.checkpoint()  # no replica tracked: released at once
    vol.track_replica(R1)
    with pytest.raises(WalTruncatedError):
        vol.open_feed(R1, 0, Notes())
    vol.close()


def test_retained_records_survive_a_primary_restart(tmp_path: Path) -> None:
    store = VolumeStore(str(tmp_path / "d"))
    vol = primary(store)
    vol.track_replica(R1)
    feed = vol.open_feed(R1, vol.last_lsn, Notes())
    start = vol.last_lsn
    lsns = [vol.write(i * 8, block_of(i + 1)) for i in range(6)]
    vol.checkpoint()
    feed.ack(lsns[1])
    vol.close()
    store.close_all()
    store = VolumeStore(str(tmp_path / "d"))
    vol = store.open("v")
    try:
        vol.track_replica(R1)
        # Records after the last acknowledged one are still there, read back from the WAL.
        feed = vol.open_feed(R1, lsns[1], Notes())
        recs = feed.take(1 << 20)
        assert [r.lsn for r in recs] == lsns[2:]
        assert [bytes(r.data or b"") for r in recs] == [block_of(i + 1) for i in range(2, 6)]
        assert start < lsns[0]
    finally:
        vol.close()


def test_untracked_volume_releases_at_once(store: VolumeStore) -> None:
    vol = primary(store)
    vol.write(0, block_of(1))
    vol.checkpoint()
    assert vol.oldest_available_lsn() == vol.last_lsn + 1
    vol.close()


def test_a_demoted_primary_stops_holding_wal_for_its_replicas(store: VolumeStore) -> None:
    """A restarted old primary becomes a replica of the copy promoted in its place: WAL kept
    for its own former replica would pin half the WAL while it applies the new primary's
    stream (a resync then stalled on WAL space). Its bitmaps go too: as a replica it releases
    records without marking them, so a kept bitmap would claim knowledge it does not have."""
    vol = primary(store)
    bitmap_path = vol.track_replica(R1).path
    vol.open_feed(R1, vol.last_lsn, Notes())
    for i in range(8):
        vol.write(i * 8, block_of(i + 1))
    vol.checkpoint()
    assert vol.wal_usage().retained_bytes > 0, "held for the lagging replica"
    vol.set_role(Role.REPLICA, epoch=2)
    assert vol.tracked_replicas() == []
    vol.checkpoint()
    assert vol.wal_usage().used_bytes == 0
    assert vol.oldest_available_lsn() == vol.last_lsn + 1
    assert not Path(bitmap_path).exists()
    vol.close()


def test_a_new_bitmap_knows_nothing_before_the_oldest_record_held(store: VolumeStore) -> None:
    """A primary that starts tracking a replica (it was promoted, or the replica is new) can
    vouch only for records it still holds or releases from now on."""
    vol = primary(store)
    for i in range(4):
        vol.write(i * 8, block_of(i + 1))
    vol.checkpoint()  # released: nobody was tracked
    held = vol.write(40, block_of(9))
    bitmap = vol.track_replica(R1)
    assert bitmap.floor_lsn == held - 1
    vol.close()
    store.close_all()
    vol = store.open("v")
    assert vol.track_replica(R1).floor_lsn == held - 1, "kept across a restart"
    vol.close()
