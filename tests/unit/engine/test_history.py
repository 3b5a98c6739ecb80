"""Write history: segments of (epoch, generation) and the common-prefix rule replicas use."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockyard.engine import Role, VolumeStore
from blockyard.engine.history import (
    MAX_HISTORY_SEGMENTS,
    OPEN_LSN,
    History,
    Segment,
    common_prefix_end,
)
from blockyard.errors import CorruptionError

MIB = 1 << 20


def seg(e: int, g: int, first: int, last: int = OPEN_LSN) -> Segment:
    return Segment(e, g, first, last)


def test_same_history_matches_up_to_the_replica_end() -> None:
    primary = [seg(1, 7, 1, 100), seg(1, 8, 105)]
    replica = [seg(1, 7, 1, 100), seg(1, 8, 105)]
    assert common_prefix_end(primary, 300, replica, 250) == 250
    assert common_prefix_end(primary, 300, replica[:1], 90) == 90


def test_replica_ahead_of_a_segment_the_primary_closed_diverges_there() -> None:
    # The primary crashed at 100 (records 101..103 lost); the replica got them.
    primary = [seg(1, 7, 1, 100), seg(1, 8, 104)]
    replica = [seg(1, 7, 1)]
    assert common_prefix_end(primary, 200, replica, 103) == 100


def test_replica_of_a_deposed_primary_diverges_at_the_takeover() -> None:
    # Replica A was promoted at epoch 2 after LSN 50; old primary B wrote 51..60 at epoch 1.
    new_primary = [seg(1, 7, 1, 50), seg(2, 9, 51)]
    old_primary = [seg(1, 7, 1)]
    assert common_prefix_end(new_primary, 80, old_primary, 60) == 50


def test_unknown_history_has_no_common_prefix() -> None:
    assert common_prefix_end([seg(3, 1, 1)], 10, [seg(2, 5, 1)], 5) is None
    assert common_prefix_end([seg(3, 1, 1)], 10, [], 5) is None


def test_primary_behind_the_replica_in_the_same_open_segment() -> None:
    # Replica has more of the open segment than the primary knows (cannot happen with a
    # healthy primary; must still stop at the primary's end).
    assert common_prefix_end([seg(1, 7, 1)], 40, [seg(1, 7, 1)], 50) == 40


@given(
    cut=st.integers(1, 200),
    extra=st.integers(0, 50),
    tail=st.integers(0, 50),
)
def test_common_prefix_is_the_cut_point(cut: int, extra: int, tail: int) -> None:
    """A primary that lost its tail after ``cut`` and went on in a new generation, against a
    replica that got ``extra`` records past the cut: the common part ends exactly at the cut
    (or at the replica's end when it got nothing past it)."""
    primary = [seg(1, 1, 1, cut), seg(1, 2, cut + 1 + tail)]
    replica = [seg(1, 1, 1)]
    got = common_prefix_end(primary, cut + tail + 100, replica, cut + extra)
    assert got == cut


def test_history_roundtrip_and_bounds() -> None:
    h = History()
    for i in range(MAX_HISTORY_SEGMENTS + 5):
        h.begin(1, i + 1, i * 10 + 1, close_at=i * 10)
    assert len(h.segments) == MAX_HISTORY_SEGMENTS
    again = History.decode(h.encode(), path="p", volume="v")
    assert again.segments == h.segments
    for bad in (
        b"{",
        b'{"version": 2, "segments": []}',
        b'{"version":1,"segments":[[1,0,1,null]]}',
    ):
        with pytest.raises(CorruptionError):
            History.decode(bad, path="p", volume="v")


def test_primary_open_starts_a_new_segment(store: VolumeStore) -> None:
    vol = store.create("v", 4 * MIB)
    vol.set_role(Role.PRIMARY, epoch=3)
    g1 = vol.generation
    first = vol.write(0, bytes(4096))
    assert vol.history.last is not None
    assert vol.history.last.key() == (3, g1)
    vol.close()
    vol = store.open("v")
    try:
        g2 = vol.generation
        assert g2 not in (0, g1)
        segs = vol.history.segments
        assert segs[-2] == Segment(3, g1, segs[-2].first_lsn, first)
        assert segs[-1].key() == (3, g2) and segs[-1].open
        assert vol.write(0, bytes(4096)) >= segs[-1].first_lsn
    finally:
        vol.close()


def test_replica_keeps_generation_and_lsns_across_reopen(store: VolumeStore) -> None:
    vol = store.create("r", 4 * MIB)
    vol.set_role(Role.REPLICA, epoch=1)
    gen = vol.generation
    last = vol.last_lsn
    vol.close()
    vol = store.open("r")
    try:
        assert vol.generation == gen
        assert vol.last_lsn == last
    finally:
        vol.close()
