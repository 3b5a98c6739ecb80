"""Draining a server: its replicas get a copy elsewhere before theirs is dropped, and its
primaries hand over through the lease (no lease, then promotion of an in-sync replica)."""

from __future__ import annotations

from dataclasses import replace

from master_harness import (
    INTERVAL_NS,
    MARGIN_NS,
    TTL_NS,
    Harness,
    addresses,
    primary_report,
    replica_report,
    volume_record,
)

from blockyard.engine.epoch import Role
from blockyard.master.model import CopyState, ReplicaReport, ServerState, VolumeReport


def drain(h: Harness, sid: str) -> None:
    rec = h.core.registry.servers[sid]
    h.core.applied_server(replace(rec, state=ServerState.DRAINING), 9)


def report_with(rec_name: str, uuid: str, epoch: int, in_sync: dict[str, bool]) -> VolumeReport:
    return VolumeReport(
        rec_name,
        uuid,
        Role.PRIMARY,
        epoch,
        durable_lsn=100,
        replicas=tuple(
            ReplicaReport(addresses(s).replication, ok, True, "in_sync" if ok else "resyncing")
            for s, ok in in_sync.items()
        ),
    )


def test_replica_moves_with_a_new_copy_first() -> None:
    h = Harness.make(("s1", "s2", "s3"), (volume_record(),))
    for sid in ("s1", "s2", "s3"):
        h.heartbeat(sid)
    drain(h, "s2")
    assert h.core.server_state("s2", h.now) is ServerState.DRAINING
    h.tick()
    rec = h.volume()
    assert [(c.server_id, c.state) for c in rec.copies] == [
        ("s1", CopyState.IN_SYNC),
        ("s2", CopyState.IN_SYNC),
        ("s3", CopyState.PENDING),
    ]
    # Still rebuilding: the draining copy stays.
    h.heartbeat("s1", (report_with("vol", rec.uuid, 1, {"s2": True, "s3": False}),))
    h.tick()
    assert h.volume().copy_on("s2") is not None
    # In sync: the draining copy goes and its server is told to delete it.
    h.heartbeat("s1", (report_with("vol", rec.uuid, 1, {"s2": True, "s3": True}),))
    h.tick()
    rec = h.volume()
    assert rec.server_ids == ("s1", "s3")
    reply, _ = h.heartbeat("s2", (replica_report(rec),))
    assert [(a.volume, a.deleted) for a in reply.assignments] == [("vol", True)]


def test_primary_hands_over_through_its_lease() -> None:
    h = Harness.make(("s1", "s2", "s3"), (volume_record(),))
    h.advance(TTL_NS + MARGIN_NS)
    h.heartbeat("s3")
    h.heartbeat("s1", (primary_report(h.volume()),))
    h.heartbeat("s2", (replica_report(h.volume()),))
    drain(h, "s1")
    last_grant = h.now
    while h.now < last_grant + TTL_NS + MARGIN_NS:
        h.advance(INTERVAL_NS)
        reply, _ = h.heartbeat("s1", (primary_report(h.volume()),))
        assert reply.leases == ()  # the draining primary is not renewed
        h.heartbeat("s2", (replica_report(h.volume()),))
        h.heartbeat("s3")
        h.tick()
    rec = h.volume()
    assert (rec.primary, rec.epoch) == ("s2", 2)
    copy = rec.copy_on("s1")
    assert copy is not None and copy.role is Role.REPLICA
