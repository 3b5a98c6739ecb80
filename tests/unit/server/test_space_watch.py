"""SpaceWatch: the soft threshold fires once per low spell and re-arms with hysteresis."""

from __future__ import annotations

import pytest

from blockyard.server.space import SpaceEvent, SpaceReading, SpaceWatch

GIB = 1 << 30


def test_low_fires_once_and_rearms_above_hysteresis() -> None:
    w = SpaceWatch(threshold_fraction=0.10, threshold_min_bytes=0)
    total = 100 * GIB
    assert w.update(SpaceReading(50 * GIB, total)) is None
    assert w.update(SpaceReading(9 * GIB, total)) is SpaceEvent.LOW
    assert w.low
    assert w.update(SpaceReading(5 * GIB, total)) is None
    # Back just above the threshold but inside the hysteresis margin: still low.
    assert w.update(SpaceReading(11 * GIB, total)) is None
    assert w.update(SpaceReading(12 * GIB, total)) is SpaceEvent.RECOVERED
    assert not w.low
    assert w.update(SpaceReading(9 * GIB, total)) is SpaceEvent.LOW


def test_minimum_bytes_protects_small_filesystems() -> None:
    w = SpaceWatch(threshold_fraction=0.10, threshold_min_bytes=256 << 20)
    total = 1 * GIB
    # 10% of 1 GiB is ~102 MiB, but the minimum is 256 MiB.
    assert w.threshold_bytes(total) == 256 << 20
    assert w.update(SpaceReading(200 << 20, total)) is SpaceEvent.LOW
    # On a tiny filesystem the minimum is capped at half of it.
    assert w.threshold_bytes(64 << 20) == 32 << 20


def test_rejects_nonsense_thresholds() -> None:
    with pytest.raises(ValueError, match="fraction"):
        SpaceWatch(threshold_fraction=1.5)
