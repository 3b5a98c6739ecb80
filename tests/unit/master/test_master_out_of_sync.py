"""The master's half of the degrade decision under a fake clock: a copy a primary had marked
out of sync (MarkOutOfSync) is never promoted, however long the primary stays silent, while an
in-sync copy of the same volume still is; and the mark is refused to anyone but the store's
primary at the store's epoch."""

from __future__ import annotations

import pytest
from master_harness import INTERVAL_NS, MARGIN_NS, TTL_NS, Harness, addresses, volume_record
from test_master_failover import run_silent, steady

from blockyard.errors import StaleEpochError
from blockyard.master.model import CopyState


def mark(h: Harness, replica: str, *, epoch: int = 1, primary: str = "s1") -> None:
    h.core.begin("vol")
    try:
        new = h.core.mark_out_of_sync(
            "vol", epoch, primary, addresses(replica).replication, h.now, sent_mono_ns=h.now
        )
        if new is not None:
            h.core.applied_volume(new, h.core.registry.volume_versions["vol"] + 1)
    finally:
        h.core.end("vol")


def test_a_copy_marked_out_of_sync_is_never_promoted() -> None:
    h = Harness.make(("s1", "s2"), (volume_record(),))
    h.advance(TTL_NS + MARGIN_NS)  # past the new-master hold
    steady(h)
    mark(h, "s2")
    assert h.volume().copy_on("s2").state is CopyState.OUT_OF_SYNC  # type: ignore[union-attr]
    # The primary dies (kill -9): s2 keeps heartbeating for ten promotion delays.
    promotions = run_silent(h, ("s2",), h.now + 10 * (TTL_NS + MARGIN_NS))
    assert promotions == []
    rec = h.volume()
    assert (rec.epoch, rec.primary) == (1, "s1")
    assert rec.copy_on("s2").state is CopyState.OUT_OF_SYNC  # type: ignore[union-attr]


def test_with_rf3_the_copy_still_in_sync_is_promoted_not_the_marked_one() -> None:
    h = Harness.make(("s1", "s2", "s3"), (volume_record(replicas=("s2", "s3")),))
    h.advance(TTL_NS + MARGIN_NS)
    steady(h)
    mark(h, "s3")
    # s3 claims the higher LSN: it must not matter.
    until = h.now + TTL_NS + MARGIN_NS + 4 * INTERVAL_NS
    promotions = run_silent(h, ("s2", "s3"), until, {"s2": 10, "s3": 999})
    assert len(promotions) == 1
    assert (h.volume().epoch, h.volume().primary) == (2, "s2")


def test_only_the_stores_primary_at_its_epoch_may_mark() -> None:
    h = Harness.make(("s1", "s2"), (volume_record(epoch=3),))
    for epoch, primary in ((2, "s1"), (3, "s2")):
        with pytest.raises(StaleEpochError):
            mark(h, "s2", epoch=epoch, primary=primary)
    assert h.volume().copy_on("s2").state is CopyState.IN_SYNC  # type: ignore[union-attr]
