"""A stale primary: the replica is moved to a newer epoch (as a master does before promoting or
re-assigning) while the old primary keeps serving at its old epoch (real `blockyard serve`
processes, the link through the fault proxy).

The replica refuses the old primary's connections with STALE_EPOCH (DESIGN invariant 2) and takes
none of its later writes. The old primary then follows the degrade-or-fail rule: it marks the
replica out of sync durably before acknowledging any flush without it, and never counts the
replica again — no flush is acknowledged as replicated to a copy that refused it. (Without a
master, nothing stops the old primary from acknowledging flushes that live on it alone; the
lease rule of the master issue is what fences it.)"""

from __future__ import annotations

import time

from fault_helpers import VOLUME, Model, Rig, assert_degraded_before_ack, describe, watch_state

from blockyard.engine.epoch import Role
from blockyard.replication.messages import ReplicaDataState

REFUSED_FOR_S = 8.0


def test_replica_at_a_newer_epoch_refuses_the_old_primary(rig: Rig) -> None:
    model = Model(rig.attach())
    model.write_range(range(0, 32))
    assert model.flush().error is None
    fenced_lsn = rig.info().last_lsn
    assert rig.replica_info().durable_lsn == fenced_lsn
    replica_sum = rig.cluster.checksum(VOLUME, 1)

    info = rig.replica.call(lambda c: c.set_replication(VOLUME, role=Role.REPLICA, epoch=2))
    assert (info.role, info.epoch) == (Role.REPLICA, 2)

    for r in range(4):
        model.write_range(range(100 + 8 * r, 108 + 8 * r))
        flushed_lsn = rig.info().last_lsn
        with watch_state(rig) as evidence:
            result = model.flush()
            returned_ns = time.time_ns()
            mark = evidence()
        print(f"stale primary, flush {r + 1}: {describe(result, mark)}")
        # Either outcome the rule allows; acknowledged only with the replica marked out first.
        assert_degraded_before_ack(rig, result, flushed_lsn, returned_ns, mark)
        assert result.error is None, "the mark could be persisted: the flush degrades"

    rep = rig.wait_report(
        lambda r: "STALE_EPOCH" in r.last_error, "refused with STALE_EPOCH", REFUSED_FOR_S
    )
    print(f"old primary's view: {rep}")
    accepted = rig.proxy.stats().accepted
    # It keeps trying and keeps being refused: never in sync, never acknowledged further.
    deadline = time.monotonic() + REFUSED_FOR_S
    while time.monotonic() < deadline:
        rep = rig.report()
        assert rep.state == "out_of_sync" and not rep.in_sync, rep
        assert rep.acked_lsn <= fenced_lsn, rep
        time.sleep(0.2)
    assert rig.proxy.stats().accepted > accepted, "the old primary stopped reconnecting"
    assert not rig.file_in_sync()
    # The replica took nothing from the stale primary after it moved on.
    after = rig.replica_info()
    assert (after.epoch, after.last_lsn, after.data_state) == (
        2,
        fenced_lsn,
        ReplicaDataState.CONSISTENT,
    ), after
    assert rig.cluster.checksum(VOLUME, 1) == replica_sum
    assert "Hello carries epoch 1, below this replica's epoch 2" in rig.log(rig.replica)
    # The old primary still serves its own copy (reads and writes stay local).
    model.verify()
