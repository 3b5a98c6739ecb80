"""A replica was promoted while the old primary could still hold a lease (sw-block: a timer
not tied to the lease). The master must promote only at last grant + TTL + MARGIN, and a master
that just took over only after TTL + MARGIN since it did (a previous incarnation's grants are
invisible to it)."""

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

from blockyard.master.core import PutVolume


def promotions(h: Harness) -> list[PutVolume]:
    return [i for i in h.tick() if isinstance(i, PutVolume) and i.reason == "failover"]


def test_no_promotion_before_last_grant_plus_ttl_plus_margin() -> None:
    h = Harness.make(("s1", "s2"), (volume_record(),), start_ns=0)
    h.advance(10 * TTL_NS)
    reply, _ = h.heartbeat("s1", (primary_report(h.volume()),))
    assert reply.leases
    granted_at = h.now
    deadline = granted_at + TTL_NS + MARGIN_NS
    while h.now + INTERVAL_NS < deadline:
        h.advance(INTERVAL_NS)
        h.heartbeat("s2", (replica_report(h.volume()),))
        assert promotions(h) == []
    h.now = deadline - 1
    h.heartbeat("s2", (replica_report(h.volume()),))
    assert promotions(h) == []
    h.now = deadline
    h.heartbeat("s2", (replica_report(h.volume()),))
    assert [p.record.epoch for p in promotions(h)] == [2]


def test_new_master_promotes_nothing_for_ttl_plus_margin() -> None:
    start = 1_000 * TTL_NS
    h = Harness.make(("s1", "s2"), (volume_record(),), start_ns=start)
    # The primary never reaches this master (it may hold a lease from the previous one).
    while h.now + INTERVAL_NS < start + TTL_NS + MARGIN_NS:
        h.advance(INTERVAL_NS)
        h.heartbeat("s2", (replica_report(h.volume()),))
        assert not h.core.promotions_allowed(h.now)
        assert promotions(h) == []
    h.now = start + TTL_NS + MARGIN_NS
    h.heartbeat("s2", (replica_report(h.volume()),))
    assert h.core.promotions_allowed(h.now)
    assert [p.record.primary for p in promotions(h)] == ["s2"]
