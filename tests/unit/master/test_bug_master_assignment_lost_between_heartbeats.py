"""sw-block lost an assignment sent between heartbeats: the master sent it once, the reply was
lost (or the server restarted before applying it), and the server never heard of it again.
An assignment must be re-sent on every reply until a heartbeat shows it applied."""

from __future__ import annotations

from master_harness import Harness, primary_report, replica_report, volume_record

from blockyard.engine.epoch import Role
from blockyard.master.assignments import Assignment, AssignmentQueue
from blockyard.master.model import VolumeReport
from blockyard.replication.commit import DurabilityMode


def test_assignment_is_resent_until_confirmed() -> None:
    h = Harness.make(("s1", "s2"), (volume_record(epoch=3),))
    rec = h.volume()
    stale = replica_report(rec, role=Role.NONE, epoch=0)
    for _ in range(3):  # the server keeps not applying it (lost replies, a restart)
        reply, _ = h.heartbeat("s2", (stale,))
        assert [(a.volume, a.role, a.epoch) for a in reply.assignments] == [
            ("vol", Role.REPLICA, 3)
        ]
    h.heartbeat("s2", (stale,), full=True)  # a restart: new stream, full state
    reply, _ = h.heartbeat("s2", ())
    assert [a.epoch for a in reply.assignments] == [3]
    reply, _ = h.heartbeat("s2", (replica_report(rec),))
    assert reply.assignments == ()


def test_primary_assignment_needs_the_replica_set_applied() -> None:
    h = Harness.make(("s1", "s2"), (volume_record(),))
    rec = h.volume()
    no_replicas = primary_report(rec)
    no_replicas = VolumeReport(no_replicas.name, no_replicas.uuid, Role.PRIMARY, rec.epoch)
    reply, _ = h.heartbeat("s1", (no_replicas,))
    assert [a.replicas for a in reply.assignments] == [("10.0.0.2:9600",)]
    reply, _ = h.heartbeat("s1", (primary_report(rec),))
    assert reply.assignments == ()


def test_newer_epoch_replaces_and_stale_epochs_are_pruned() -> None:
    q = AssignmentQueue()
    uuid = "00000000-0000-0000-0000-000000000001"

    def a(epoch: int) -> Assignment:
        return Assignment("v", uuid, 1, Role.REPLICA, epoch, DurabilityMode.SYNC_ALL)

    q.put("s", a(2))
    q.put("s", a(1))  # older: ignored
    assert [x.epoch for x in q.pending("s")] == [2]
    q.put("s", a(3))
    assert [x.epoch for x in q.pending("s")] == [3]
    # The server is already at epoch 4: the epoch-3 assignment can never apply.
    q.confirm("s", {"v": VolumeReport("v", uuid, Role.PRIMARY, 4)})
    assert q.pending("s") == [] and len(q) == 0
