"""A link slow enough that a round trip outlasts the barrier timeout, though neither side ever
falls silent for the dead-peer timeout (3 s each way: a 6 s round trip against
BARRIER_TIMEOUT_S = 5 s and DEAD_PEER_TIMEOUT_S = 5 s). This is the timeout branch of the
degrade-or-fail rule with the connection up: in sync_all the first write waits for the
replica's receipt, and is acknowledged only after the replica was durably marked out of sync,
within the bound. (What should follow — the replica, still connected, counting again once it
caught up — is in test_bug_barrier_timeout_replica_never_rejoins.py.) The barrier branch of
the same rule (a flush whose replica received the records but does not confirm durability) is
driven with a fake clock in tests/unit/replication/test_commit_tracker.py."""

from __future__ import annotations

from fault_helpers import Model, Rig, degrade_by_round_trip_timeout


def test_barrier_round_trip_past_the_timeout_degrades_with_the_link_up(rig: Rig) -> None:
    model = Model(rig.attach())
    degrade_by_round_trip_timeout(rig, model)
    rig.proxy.set_delay(0.0)
    model.verify()
