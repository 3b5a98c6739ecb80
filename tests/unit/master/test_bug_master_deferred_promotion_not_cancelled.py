"""sw-block's deferred promotion fired although the primary had reconnected in time: two
primaries. A deferred promotion must be cancelled when the primary is heard again holding
the volume at the current epoch before the promotion was carried out."""

from __future__ import annotations

from master_harness import (
    INTERVAL_NS,
    MARGIN_NS,
    TTL_NS,
    Harness,
    primary_report,
    replica_report,
    volume_record,
)


def test_reconnect_before_the_deadline_cancels_the_promotion() -> None:
    h = Harness.make(("s1", "s2"), (volume_record(),), start_ns=0)
    h.advance(TTL_NS + MARGIN_NS)
    h.heartbeat("s1", (primary_report(h.volume()),))
    h.disconnect("s1")
    h.advance(INTERVAL_NS)
    h.heartbeat("s2", (replica_report(h.volume()),))
    assert h.tick() == []
    assert "vol" in h.core.deferred
    # The primary reconnects (a new stream, full state) before its lease ran out.
    h.advance(INTERVAL_NS)
    reply, _ = h.heartbeat("s1", (primary_report(h.volume()),), full=True)
    assert reply.leases
    assert "vol" not in h.core.deferred
    # Well past the first deadline, with the primary heartbeating: nothing is promoted.
    for _ in range(4 * (TTL_NS + MARGIN_NS) // INTERVAL_NS):
        h.advance(INTERVAL_NS)
        h.heartbeat("s1", (primary_report(h.volume()),))
        h.heartbeat("s2", (replica_report(h.volume()),))
        assert h.tick() == []
    assert (h.volume().primary, h.volume().epoch) == ("s1", 1)


def test_late_close_of_an_old_stream_does_not_disconnect_the_new_one() -> None:
    h = Harness.make(("s1", "s2"), (volume_record(),), start_ns=0)
    h.advance(TTL_NS + MARGIN_NS)
    h.heartbeat("s1", (primary_report(h.volume()),))
    old_stream = h.streams["s1"]
    h.heartbeat("s1", (primary_report(h.volume()),), full=True)  # reconnected
    h.core.close_stream(old_stream, "s1")  # the old stream's end is noticed late
    assert h.core.registry.live["s1"].connected
    assert h.tick() == [] and "vol" not in h.core.deferred


def test_stream_ids_are_unique_across_cores() -> None:
    """A new leader builds a new core while old streams keep running: an old stream's id must
    not equal a new stream's, or the old stream's deltas would pass for the current one's."""
    old, new = Harness.make(), Harness.make()
    assert old.core.open_stream() != new.core.open_stream()
