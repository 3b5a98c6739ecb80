"""Failover through MasterCore under a fake clock: lease expiry, choice of copy, store first."""

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

from blockyard.engine.epoch import Role
from blockyard.master.core import PutVolume
from blockyard.master.model import CopyState, VolumeStatus


def steady(h: Harness, name: str = "vol") -> None:
    """Every server of the volume heartbeats once (primary first)."""
    rec = h.volume(name)
    h.heartbeat(rec.primary, (primary_report(rec),))
    for c in rec.copies:
        if c.server_id != rec.primary:
            h.heartbeat(c.server_id, (replica_report(rec),))


def run_silent(
    h: Harness, alive: tuple[str, ...], until_ns: int, lsns: dict[str, int] | None = None
) -> list[PutVolume]:
    """Advance in heartbeat steps to ``until_ns`` or the first promotion; only ``alive``
    servers heartbeat, as replicas of the epoch they were told (with ``lsns``)."""
    start = h.volume()
    promotions: list[PutVolume] = []
    while h.now < until_ns and not promotions:
        h.advance(min(INTERVAL_NS, until_ns - h.now))
        for sid in alive:
            lsn = (lsns or {}).get(sid, 100)
            h.heartbeat(sid, (replica_report(start, durable_lsn=lsn),))
        promotions += [i for i in h.tick() if isinstance(i, PutVolume) and i.reason == "failover"]
    return promotions


def test_primary_gets_a_lease_for_the_store_epoch() -> None:
    h = Harness.make(("s1", "s2"), (volume_record(epoch=4),))
    reply, _ = h.heartbeat("s1", (primary_report(h.volume()),))
    assert [(g.volume, g.epoch, g.ttl_ms) for g in reply.leases] == [("vol", 4, 2000)]
    reply, _ = h.heartbeat("s2", (replica_report(h.volume()),))
    assert reply.leases == ()


def test_failover_promotes_the_in_sync_replica_after_the_lease() -> None:
    h = Harness.make(("s1", "s2", "s3"), (volume_record(replicas=("s2", "s3")),), start_ns=0)
    h.advance(TTL_NS + MARGIN_NS)  # past the new-master hold
    steady(h)
    last_grant = h.now
    # s3 is further along than s2.
    lsns = {"s2": 80, "s3": 90}
    until = last_grant + TTL_NS + MARGIN_NS + 2 * INTERVAL_NS
    promotions = run_silent(h, ("s2", "s3"), until, lsns)
    assert len(promotions) == 1
    rec = h.volume()
    assert (rec.epoch, rec.primary) == (2, "s3")
    old = rec.copy_on("s1")
    assert old is not None and (old.role, old.state) == (Role.REPLICA, CopyState.OUT_OF_SYNC)
    assert rec.status is VolumeStatus.DEGRADED
    # The new primary is told (epoch 2, replicas s1 and s3) and granted a lease at epoch 2.
    reply, _ = h.heartbeat("s3", (replica_report(rec, epoch=1),))
    [a] = reply.assignments
    assert (a.role, a.epoch, a.replicas) == (Role.PRIMARY, 2, ("10.0.0.1:9600", "10.0.0.2:9600"))
    assert [(g.volume, g.epoch) for g in reply.leases] == [("vol", 2)]


def test_store_first_then_assign() -> None:
    h = Harness.make(("s1", "s2"), (volume_record(),))
    h.advance(TTL_NS + MARGIN_NS)
    steady(h)
    h.auto_persist = False
    run_silent(h, ("s2",), h.now + TTL_NS + MARGIN_NS + INTERVAL_NS)
    [intent] = h.held
    assert isinstance(intent, PutVolume) and intent.record.epoch == 2
    # Not persisted yet: nothing is assigned, the registry still holds epoch 1.
    reply, _ = h.heartbeat("s2", (replica_report(h.volume()),))
    assert reply.assignments == () and h.volume().epoch == 1
    # A failed write changes nothing; the next tick tries again.
    h.finish(intent, ok=False)
    assert h.volume().epoch == 1 and not h.core.busy("vol")
    again = h.tick()
    assert [i.record.epoch for i in again if isinstance(i, PutVolume)] == [2]
    h.finish(again[0])
    reply, _ = h.heartbeat("s2", (replica_report(h.volume(), epoch=1),))
    assert [(a.role, a.epoch) for a in reply.assignments] == [(Role.PRIMARY, 2)]


def test_out_of_sync_replica_is_never_promoted() -> None:
    rec = volume_record(replica_state=CopyState.OUT_OF_SYNC)
    h = Harness.make(("s1", "s2"), (rec,))
    h.advance(TTL_NS + MARGIN_NS)
    h.heartbeat("s1", (primary_report(rec, replicas_in_sync=False, phase="disconnected"),))
    h.heartbeat("s2", (replica_report(rec, durable_lsn=10**6),))
    assert run_silent(h, ("s2",), h.now + 10 * TTL_NS) == []
    assert (h.volume().primary, h.volume().epoch) == ("s1", 1)


def test_rebuilding_replica_is_never_promoted() -> None:
    rec = volume_record(replica_state=CopyState.REBUILDING)
    h = Harness.make(("s1", "s2"), (rec,))
    h.advance(TTL_NS + MARGIN_NS)
    h.heartbeat("s1", (primary_report(rec, replicas_in_sync=False, phase="resyncing"),))
    assert run_silent(h, ("s2",), h.now + 10 * TTL_NS) == []


def test_returning_old_primary_is_fenced_and_told_to_be_a_replica() -> None:
    h = Harness.make(("s1", "s2"), (volume_record(),))
    h.advance(TTL_NS + MARGIN_NS)
    steady(h)
    run_silent(h, ("s2",), h.now + TTL_NS + MARGIN_NS + INTERVAL_NS)
    assert h.volume().primary == "s2"
    # s1 comes back still believing it is primary at epoch 1: no lease, a replica assignment.
    reply, _ = h.heartbeat("s1", (primary_report(h.volume(), epoch=1),), full=True)
    assert reply.leases == ()
    assert [(a.role, a.epoch) for a in reply.assignments] == [(Role.REPLICA, 2)]


def test_stopping_primary_gets_no_lease_and_is_failed_over() -> None:
    h = Harness.make(("s1", "s2"), (volume_record(),))
    h.advance(TTL_NS + MARGIN_NS)
    steady(h)
    reply, _ = h.heartbeat("s1", (primary_report(h.volume()),), stopping=True)
    assert reply.leases == ()
    assert len(run_silent(h, ("s2",), h.now + TTL_NS + MARGIN_NS + INTERVAL_NS)) == 1


def test_failed_volume_on_primary_is_failed_over() -> None:
    h = Harness.make(("s1", "s2"), (volume_record(),))
    h.advance(TTL_NS + MARGIN_NS)
    steady(h)
    rec = h.volume()
    failed = primary_report(rec)
    failed = type(failed)(**{**{f: getattr(failed, f) for f in failed.__slots__}, "failed": True})
    promotions = []
    end = h.now + TTL_NS + MARGIN_NS + INTERVAL_NS
    while h.now < end:
        h.advance(INTERVAL_NS)
        reply, _ = h.heartbeat("s1", (failed,))
        assert reply.leases == ()
        h.heartbeat("s2", (replica_report(rec),))
        promotions += h.tick()
    assert h.volume().primary == "s2"


def test_replacement_after_replace_after() -> None:
    h = Harness.make(("s1", "s2", "s3"), (volume_record(),), replace_after_ns=60 * 10**9)
    h.advance(TTL_NS + MARGIN_NS)
    h.heartbeat("s3")
    steady(h)
    # s2 (replica) goes silent; s1 and s3 stay.
    silent_from = h.now
    while h.now + INTERVAL_NS < silent_from + 60 * 10**9:
        h.advance(INTERVAL_NS)
        rec = h.volume()
        h.heartbeat("s1", (primary_report(rec, replicas_in_sync=False, phase="disconnected"),))
        h.heartbeat("s3")
        h.tick()
    assert h.volume().copy_on("s2") is not None  # not before replace_after
    h.advance(INTERVAL_NS)
    before = h.volume()
    h.heartbeat("s1", (primary_report(before, replicas_in_sync=False, phase="disconnected"),))
    h.heartbeat("s3")
    h.tick()
    rec = h.volume()
    assert rec.copy_on("s2") is None
    new = rec.copy_on("s3")
    assert new is not None and (new.role, new.state) == (Role.REPLICA, CopyState.PENDING)
    reply, _ = h.heartbeat("s3")
    [a] = reply.assignments
    assert (a.volume, a.role, a.epoch, a.create) == ("vol", Role.REPLICA, 1, True)
    # Re-sent until the primary reports the new replica set.
    reply, _ = h.heartbeat("s1", (primary_report(before, replicas_in_sync=False),))
    [a] = reply.assignments
    assert (a.role, a.replicas) == (Role.PRIMARY, ("10.0.0.3:9600",))
    # The old server returning is told to delete its stale copy.
    reply, _ = h.heartbeat("s2", (replica_report(rec),), full=True)
    assert [(a.volume, a.deleted) for a in reply.assignments] == [("vol", True)]


def test_mark_out_of_sync_is_not_undone_by_an_older_heartbeat() -> None:
    h = Harness.make(("s1", "s2"), (volume_record(),))
    steady(h)
    sent_before = h.now
    h.advance(INTERVAL_NS)
    h.core.begin("vol")
    new = h.core.mark_out_of_sync("vol", 1, "s1", "10.0.0.2:9600", h.now, sent_mono_ns=h.now)
    assert new is not None
    h.core.applied_volume(new, 2)
    h.core.end("vol")
    assert h.volume().copy_on("s2").state is CopyState.OUT_OF_SYNC  # type: ignore[union-attr]
    # A heartbeat the primary sent before the mark (still saying in sync) arrives late.
    h.heartbeat("s1", (primary_report(h.volume()),), sent_mono_ns=sent_before)
    assert h.volume().copy_on("s2").state is CopyState.OUT_OF_SYNC  # type: ignore[union-attr]
    # One sent after the mark that says in sync again (caught up) is believed.
    h.advance(INTERVAL_NS)
    h.heartbeat("s1", (primary_report(h.volume()),))
    assert h.volume().copy_on("s2").state is CopyState.IN_SYNC  # type: ignore[union-attr]
