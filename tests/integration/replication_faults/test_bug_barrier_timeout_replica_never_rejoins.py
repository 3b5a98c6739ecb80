"""A replica marked out of sync by the barrier timeout while its connection stayed up never
counted again.

Over a link slow enough that a barrier's round trip (6 s) outlasts BARRIER_TIMEOUT_S (5 s) but
never silent for DEAD_PEER_TIMEOUT_S, the commit tracker marks the replica out of sync and the
flush degrades, as it should. But that decision lives only in the tracker
(commit.CommitTracker._evaluate); the link and its PrimarySession are not told. The session
had already declared this replica in sync once (PrimarySession._check_in_sync returns False
for good after its first True), so however far the replica catches up on the same connection
— here: every record acknowledged, lag 0, link phase ``in_sync`` — nothing calls
VolumeReplication.mark_in_sync. The replica stayed ``out_of_sync`` (not counted, not
promotable) until its connection happened to drop."""

from __future__ import annotations

import time

from fault_helpers import Model, Rig, degrade_by_round_trip_timeout

REJOIN_S = 60.0


def test_replica_marked_out_by_barrier_timeout_rejoins_once_caught_up(rig: Rig) -> None:
    model = Model(rig.attach())
    degrade_by_round_trip_timeout(rig, model)
    rig.proxy.set_delay(0.0)
    started = time.monotonic()
    rep = rig.wait_in_sync_while_writing(model, timeout_s=REJOIN_S)
    print(f"in sync again {time.monotonic() - started:.1f} s after the delay was lifted: {rep}")
    assert rig.file_in_sync()
    result = model.flush()
    assert result.error is None, result.error
    assert rig.replica_info().durable_lsn >= rig.info().last_lsn
    model.verify()
    rig.assert_same_bytes()
