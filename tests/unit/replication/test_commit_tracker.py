"""The commit point (``commit.CommitTracker``) and the degrade-or-fail rule, driven by an
injected clock: when a flush may be acknowledged, when a replica is dropped (only after it is
durably marked out of sync), when a flush fails, and how barriers are shared."""

from __future__ import annotations

import asyncio
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from blockyard.engine import Role, VolumeStore
from blockyard.replication import primary as primary_mod
from blockyard.replication.commit import (
    BARRIER_TIMEOUT_S,
    Action,
    CommitTracker,
    Complete,
    DurabilityMode,
    Fail,
    MarkInSync,
    MarkOutOfSync,
    SendBarrier,
    Verdict,
    degrade_or_fail,
)
from blockyard.replication.primary import VolumeReplication
from blockyard.replication.state import (
    PrimaryState,
    ReplicaEntry,
    load_primary_state,
    save_primary_state,
)

R1 = "10.0.0.2:7500"
R2 = "10.0.0.3:7500"
ALL = DurabilityMode.SYNC_ALL
QUORUM = DurabilityMode.SYNC_QUORUM
BEST = DurabilityMode.BEST_EFFORT


def of(actions: list[Action], kind: type) -> list:  # type: ignore[type-arg]
    return [a for a in actions if isinstance(a, kind)]


def completed(actions: list[Action]) -> set[int]:
    return {a.token for a in of(actions, Complete)}


def failed(actions: list[Action]) -> set[int]:
    return {a.token for a in of(actions, Fail)}


def marks(actions: list[Action]) -> list[str]:
    return [a.replica for a in of(actions, MarkOutOfSync)]


def barriers(actions: list[Action]) -> list[tuple[str, int]]:
    return [(a.replica, a.lsn) for a in of(actions, SendBarrier)]


def tracker(mode: DurabilityMode, *in_sync: str, out: tuple[str, ...] = ()) -> CommitTracker:
    t = CommitTracker(mode, in_sync=in_sync, out_of_sync=out)
    for r in (*in_sync, *out):
        t.connected(r, 0.0)
    return t


def barrier_id(actions: list[Action], replica: str) -> int:
    (b,) = [a for a in of(actions, SendBarrier) if a.replica == replica]
    return int(b.barrier_id)


# ---- the rule ---------------------------------------------------------------------------


def oracle(mode: DurabilityMode, copies: int, acked: int, pending: int, unmarkable: int) -> Verdict:
    if mode is BEST:
        return Verdict.DONE
    if unmarkable:
        return Verdict.FAIL
    if mode is ALL:
        return Verdict.WAIT if pending else Verdict.DONE
    majority = copies // 2 + 1
    if 1 + acked >= majority:
        return Verdict.DONE
    return Verdict.WAIT if 1 + acked + pending >= majority else Verdict.FAIL


def test_degrade_or_fail_on_every_small_case() -> None:
    for mode, copies in itertools.product(DurabilityMode, (1, 2, 3)):
        replicas = copies - 1
        for acked, pending, unmarkable in itertools.product(range(replicas + 1), repeat=3):
            if acked + pending + unmarkable > replicas:
                continue
            got = degrade_or_fail(mode, copies, acked, pending, unmarkable)
            assert got is oracle(mode, copies, acked, pending, unmarkable), (
                mode,
                copies,
                acked,
                pending,
                unmarkable,
            )


def test_degrade_or_fail_named_cases() -> None:
    # RF3 quorum: the primary and one replica are a majority; one slow replica waits.
    assert degrade_or_fail(QUORUM, 3, 1, 1, 0) is Verdict.DONE
    assert degrade_or_fail(QUORUM, 3, 0, 1, 0) is Verdict.WAIT
    assert degrade_or_fail(QUORUM, 3, 0, 0, 0) is Verdict.FAIL
    # sync_all: every counted replica; a copy that cannot be marked fails the flush.
    assert degrade_or_fail(ALL, 3, 1, 1, 0) is Verdict.WAIT
    assert degrade_or_fail(ALL, 3, 2, 0, 0) is Verdict.DONE
    assert degrade_or_fail(ALL, 3, 1, 0, 1) is Verdict.FAIL
    assert degrade_or_fail(ALL, 2, 0, 0, 0) is Verdict.DONE  # dropped durably: degraded
    assert degrade_or_fail(BEST, 3, 0, 2, 0) is Verdict.DONE


# ---- sync_all -----------------------------------------------------------------------------


def test_sync_all_waits_for_every_in_sync_replica() -> None:
    t = tracker(ALL, R1, R2)
    token, actions = t.request(10, 1.0)
    assert sorted(barriers(actions)) == [(R1, 10), (R2, 10)]
    assert not completed(actions)
    b1, b2 = barrier_id(actions, R1), barrier_id(actions, R2)
    assert b1 != b2
    assert not completed(t.acked(R1, 10, b1, 1.1))
    assert t.waiting == 1
    assert not completed(t.acked(R2, 9, 0, 1.2)), "durable short of the LSN is not enough"
    assert completed(t.acked(R2, 10, b2, 1.3)) == {token}
    assert t.waiting == 0


def test_an_unsolicited_ack_counts() -> None:
    t = tracker(ALL, R1)
    token, _ = t.request(10, 0.0)
    assert completed(t.acked(R1, 12, 0, 0.1)) == {token}
    # Already durable past a new flush's LSN: done at once, no barrier.
    token, actions = t.request(11, 0.2)
    assert completed(actions) == {token} and not barriers(actions)


def test_a_barrier_timeout_marks_the_replica_and_completes_only_once_marked() -> None:
    t = tracker(ALL, R1, R2)
    token, actions = t.request(10, 100.0)
    t.acked(R1, 10, barrier_id(actions, R1), 100.1)
    assert t.tick(100.0 + BARRIER_TIMEOUT_S - 0.01) == []
    actions = t.tick(100.0 + BARRIER_TIMEOUT_S)
    assert marks(actions) == [R2], "only the replica that did not answer"
    assert not completed(actions)
    assert t.state_of(R2) == "marking"
    # Ticking on while the mark is being persisted neither completes nor marks again.
    for dt in (1.0, 10.0, 100.0):
        later = t.tick(100.0 + BARRIER_TIMEOUT_S + dt)
        assert not completed(later) and not marks(later) and not failed(later)
    assert completed(t.marked(R2, True, 200.0)) == {token}
    assert t.state_of(R2) == "out_of_sync" and t.in_sync() == [R1]


def test_a_disconnect_marks_the_replica_and_completes_only_once_marked() -> None:
    t = tracker(ALL, R1, R2)
    token, actions = t.request(10, 0.0)
    t.acked(R1, 10, barrier_id(actions, R1), 0.1)
    actions = t.disconnected(R2, 0.2)
    assert marks(actions) == [R2] and not completed(actions)
    # A reconnect before the mark is durable does not make it count again.
    assert not completed(t.connected(R2, 0.3))
    assert t.state_of(R2) == "marking"
    assert completed(t.marked(R2, True, 0.4)) == {token}


def test_a_mark_that_cannot_be_persisted_fails_the_flush_and_never_completes_it() -> None:
    t = tracker(ALL, R1, R2)
    token, actions = t.request(10, 0.0)
    t.acked(R1, 10, barrier_id(actions, R1), 0.1)
    t.disconnected(R2, 0.2)
    actions = t.marked(R2, False, 0.3)
    assert failed(actions) == {token} and not completed(actions)
    assert t.waiting == 0
    assert t.state_of(R2) == "unmarkable"
    # Until the mark is persisted, every new flush fails too.
    token2, actions = t.request(11, 0.4)
    assert failed(actions) == {token2}
    # The retry persists it: flushes complete without R2 again; the failed ones stay failed.
    actions = t.marked(R2, True, 1.4)
    assert not completed(actions) and t.state_of(R2) == "out_of_sync"
    token3, actions = t.request(12, 1.5)
    t.acked(R1, 12, barrier_id(actions, R1), 1.6)
    assert t.waiting == 0
    assert token3 not in failed(actions)


def test_a_marked_replica_no_longer_gets_barriers_and_is_not_timed_out_again() -> None:
    t = tracker(ALL, R1, R2)
    t.disconnected(R2, 0.0)
    t.marked(R2, True, 0.1)
    t.connected(R2, 0.2)
    token, actions = t.request(10, 1.0)
    assert barriers(actions) == [(R1, 10)]
    later = t.tick(1.0 + 10 * BARRIER_TIMEOUT_S)
    assert marks(later) == [R1], "only the replica that counts times out"
    assert completed(t.marked(R1, True, 60.0)) == {token}


# ---- quorum and best effort ---------------------------------------------------------------


def test_quorum_rf3_one_slow_replica_does_not_block() -> None:
    t = tracker(QUORUM, R1, R2)
    token, actions = t.request(10, 0.0)
    assert completed(t.acked(R2, 10, barrier_id(actions, R2), 0.1)) == {token}
    # R1 never answers: later flushes still complete on R2, and R1 is eventually marked.
    token2, actions = t.request(11, 0.2)
    assert completed(t.acked(R2, 11, 0, 0.3)) == {token2}
    assert marks(t.tick(0.2 + BARRIER_TIMEOUT_S)) == [], "no waiter holds R1 up any more"


def test_quorum_rf3_waits_while_a_majority_is_still_possible() -> None:
    t = tracker(QUORUM, R1, R2)
    token, _ = t.request(10, 0.0)
    actions = t.disconnected(R1, 0.1)
    assert not completed(actions) and not failed(actions)
    actions = t.marked(R1, True, 0.2)
    assert not completed(actions) and not failed(actions), "R2 may still answer"
    assert completed(t.acked(R2, 10, 0, 0.3)) == {token}


def test_quorum_rf3_fails_with_two_replicas_out_of_sync() -> None:
    t = tracker(QUORUM, R1, R2)
    token, _ = t.request(10, 0.0)
    t.disconnected(R1, 0.1)
    t.disconnected(R2, 0.1)
    t.marked(R1, True, 0.2)
    actions = t.marked(R2, True, 0.3)
    # Either may still catch up and join (a new primary's replicas, right after a
    # failover): the write waits for them up to the barrier timeout, then fails.
    assert not failed(actions) and not completed(actions)
    token2, actions = t.request(11, 0.4)
    assert not failed(actions)
    assert failed(t.tick(BARRIER_TIMEOUT_S)) == {token}
    assert failed(t.tick(0.4 + BARRIER_TIMEOUT_S)) == {token2}


def test_quorum_completes_once_an_out_of_sync_replica_catches_up_and_joins() -> None:
    t = tracker(QUORUM, out=(R1, R2))
    token, actions = t.request(10, 0.0)
    assert not failed(actions) and not completed(actions)
    t.connected(R1, 0.5)
    t.acked(R1, 10, 0, 0.6)
    assert completed(t.caught_up(R1, 0.7)) == {token}


def test_best_effort_completes_at_once() -> None:
    t = tracker(BEST, R1, R2)
    token, actions = t.request(10, 0.0)
    assert completed(actions) == {token} and t.waiting == 0
    assert not marks(t.tick(100.0))


def test_switching_to_best_effort_completes_what_waits() -> None:
    t = tracker(ALL, R1)
    token, _ = t.request(10, 0.0)
    assert completed(t.set_mode(BEST, 0.1)) == {token}


def test_removing_a_replica_releases_its_waiters() -> None:
    t = tracker(ALL, R1, R2)
    token, actions = t.request(10, 0.0)
    t.acked(R1, 10, barrier_id(actions, R1), 0.1)
    assert completed(t.remove_replica(R2, 0.2)) == {token}
    assert t.copies == 2


# ---- barriers -----------------------------------------------------------------------------


def test_one_barrier_in_flight_and_the_next_covers_the_highest_waiting_lsn() -> None:
    """Group commit over the network: flushes that arrive while a barrier is out ride on one
    next barrier for the highest LSN anyone waits for."""
    t = tracker(ALL, R1)
    t1, actions = t.request(10, 0.0)
    assert barriers(actions) == [(R1, 10)]
    first = barrier_id(actions, R1)
    t2, actions = t.request(20, 0.1)
    assert barriers(actions) == []
    t3, actions = t.request(15, 0.2)
    assert barriers(actions) == []
    actions = t.acked(R1, 10, first, 0.3)
    assert completed(actions) == {t1}
    assert barriers(actions) == [(R1, 20)]
    second = barrier_id(actions, R1)
    assert second != first
    actions = t.acked(R1, 20, second, 0.4)
    assert completed(actions) == {t2, t3}
    assert barriers(actions) == []


def test_an_ack_that_covers_the_barrier_frees_the_slot_whatever_its_id() -> None:
    t = tracker(ALL, R1)
    _, actions = t.request(10, 0.0)
    t.request(20, 0.1)
    actions = t.acked(R1, 10, 0, 0.2)  # an unsolicited report that covers the barrier
    assert barriers(actions) == [(R1, 20)]


def test_a_barrier_waits_for_the_connection_and_times_out_without_one() -> None:
    t = CommitTracker(ALL, in_sync=[R1, R2])
    t.connected(R2, 0.0)
    token, actions = t.request(10, 0.0)
    assert barriers(actions) == [(R2, 10)], "R1 is not connected: nothing to send it on"
    actions = t.connected(R1, 0.1)
    assert barriers(actions) == [(R1, 10)]
    t.acked(R1, 10, barrier_id(actions, R1), 0.2)
    # R2 got its barrier but never answers: marked at the timeout, counted from the request.
    assert marks(t.tick(BARRIER_TIMEOUT_S - 0.001)) == []
    assert marks(t.tick(BARRIER_TIMEOUT_S)) == [R2]
    assert completed(t.marked(R2, True, BARRIER_TIMEOUT_S)) == {token}


def test_a_reconnect_voids_the_barrier_in_flight_and_sends_it_again() -> None:
    t = tracker(ALL, R1)
    t1, actions = t.request(10, 0.0)
    old = barrier_id(actions, R1)
    actions = t.connected(R1, 0.1)  # a new connection: the old barrier's answer may be lost
    assert barriers(actions) == [(R1, 10)]
    new = barrier_id(actions, R1)
    assert new != old
    t2, actions = t.request(20, 0.2)
    assert barriers(actions) == [], "one barrier in flight"
    # The old connection's late answer still reports real durability.
    actions = t.acked(R1, 10, old, 0.3)
    assert completed(actions) == {t1}
    assert barriers(actions) == [(R1, 20)], "the answer covered the barrier in flight"
    assert completed(t.acked(R1, 20, barrier_id(actions, R1), 0.4)) == {t2}


# ---- coming back in sync ------------------------------------------------------------------


def mark_in_sync(actions: list[Action]) -> list[str]:
    return [a.replica for a in of(actions, MarkInSync)]


def test_a_caught_up_replica_joins_for_new_waiters_only() -> None:
    t = tracker(ALL, R1, out=(R2,))
    old, actions = t.request(10, 0.0)
    assert barriers(actions) == [(R1, 10)], "an out-of-sync replica gets no barrier"
    t.caught_up(R2, 0.1)
    assert t.state_of(R2) == "joining"
    new, actions = t.request(20, 0.2)
    assert barriers(actions) == [(R2, 20)], "a joining replica counts for new flushes"
    # The older flush does not wait for R2; the newer one does.
    actions = t.acked(R1, 20, 0, 0.3)
    assert completed(actions) == {old}
    assert t.waiting == 1
    assert completed(t.acked(R2, 20, 0, 0.4)) == {new}


def test_a_joining_replica_is_marked_in_sync_once_it_holds_every_acknowledged_flush() -> None:
    t = tracker(ALL, R1, out=(R2,))
    _, actions = t.request(10, 0.0)
    t.acked(R1, 10, barrier_id(actions, R1), 0.1)  # acknowledged without R2
    actions = t.caught_up(R2, 0.2)
    assert mark_in_sync(actions) == [], "R2 is not durable up to LSN 10 yet"
    actions = t.acked(R2, 9, 0, 0.3)
    assert mark_in_sync(actions) == []
    actions = t.acked(R2, 10, 0, 0.4)
    assert mark_in_sync(actions) == [R2]
    assert mark_in_sync(t.tick(0.5)) == [], "asked once while the mark is persisted"
    assert t.in_sync() == [R1]
    t.marked_in_sync(R2, True, 0.6)
    assert t.in_sync() == [R1, R2]
    assert t.state_of(R2) == "in_sync"


def test_an_in_sync_mark_that_cannot_be_persisted_is_asked_again() -> None:
    t = tracker(ALL, R1, out=(R2,))
    actions = t.caught_up(R2, 0.0)
    assert mark_in_sync(actions) == [R2]
    actions = t.marked_in_sync(R2, False, 0.1)
    assert t.state_of(R2) == "joining"
    assert mark_in_sync(actions) == [R2], "asked again"
    # Still counted for new flushes while joining.
    token, actions = t.request(5, 0.2)
    assert sorted(barriers(actions)) == [(R1, 5), (R2, 5)]
    del token


def test_a_joining_replica_that_misses_a_barrier_is_marked_out_again() -> None:
    t = tracker(ALL, R1, out=(R2,))
    t.caught_up(R2, 0.0)
    t.marked_in_sync(R2, False, 0.0)
    token, actions = t.request(10, 1.0)
    t.acked(R1, 10, barrier_id(actions, R1), 1.1)
    actions = t.tick(1.0 + BARRIER_TIMEOUT_S)
    assert marks(actions) == [R2] and not completed(actions)
    # A late in-sync mark does not bring it back.
    t.marked_in_sync(R2, True, 1.0 + BARRIER_TIMEOUT_S)
    assert t.state_of(R2) == "marking"
    assert completed(t.marked(R2, True, 7.0)) == {token}
    assert t.state_of(R2) == "out_of_sync"


def test_only_an_out_of_sync_replica_can_catch_up() -> None:
    t = tracker(ALL, R1, R2)
    t.disconnected(R2, 0.0)
    t.caught_up(R2, 0.1)
    assert t.state_of(R2) == "marking", "its out-of-sync mark is not durable yet"
    t.caught_up(R1, 0.2)
    assert t.state_of(R1) == "in_sync"


def test_a_replica_that_needs_a_resync_stops_counting_once_marked() -> None:
    """It reconnected in sync (say, after a restart of the primary) but its plan is a resync:
    its acknowledgements must not count while its copy is not whole."""
    t = tracker(ALL, R1, R2)
    token, actions = t.request(10, 0.0)
    t.acked(R1, 10, barrier_id(actions, R1), 0.1)
    actions = t.behind(R2, "it needs a delta resync", 0.2)
    assert marks(actions) == [R2]
    actions = t.acked(R2, 10, 0, 0.3)
    assert not completed(actions), "acknowledgements of a copy that is not whole"
    assert completed(t.marked(R2, True, 0.4)) == {token}
    assert marks(t.behind(R2, "again", 0.5)) == [], "already out of sync"


def test_a_replica_marked_in_sync_holds_every_flush_acknowledged_before() -> None:
    """A flush that was waiting when a replica joined (so it does not count the replica) can
    be acknowledged after the replica is marked in sync: the mark must wait until the replica
    holds it too, or a promotable copy lacks an acknowledged write."""
    t = tracker(ALL, R1, out=(R2,))
    token, actions = t.request(20, 0.0)  # R2 does not count for it
    first = barrier_id(actions, R1)
    actions = t.caught_up(R2, 0.1)  # e.g. its catch-up ended at LSN 5
    t.acked(R2, 5, 0, 0.2)
    for a in of(actions + t.tick(0.3), MarkInSync):
        t.marked_in_sync(a.replica, True, 0.3)
    actions = t.acked(R1, 20, first, 0.4)
    assert completed(actions) == {token}
    for r in t.in_sync():
        assert t.durable_lsn(r) >= 20, f"{r} is in sync but not durable up to acknowledged 20"


def test_an_out_of_sync_replica_never_counts_for_quorum() -> None:
    t = tracker(QUORUM, R1, out=(R2,))
    t.disconnected(R1, 0.0)
    t.marked(R1, True, 0.1)
    # R2 is durable far ahead, but it is out of sync: it does not make a majority.
    t.acked(R2, 100, 0, 0.2)
    token, actions = t.request(10, 0.3)
    assert not completed(actions) and not failed(actions)
    assert failed(t.tick(0.3 + BARRIER_TIMEOUT_S)) == {token}


# ---- receipts: a plain write waits until the counted replicas received it --------------------


def test_a_receipt_waits_for_every_in_sync_replica_without_a_barrier() -> None:
    t = tracker(ALL, R1, R2)
    token, actions = t.request(10, 0.0, durable=False)
    assert not barriers(actions), "a receipt needs no barrier: the replica reports it unasked"
    assert not completed(actions)
    assert not completed(t.acked(R1, 0, 0, 0.1, applied_lsn=10))
    assert not completed(t.acked(R2, 0, 0, 0.2, applied_lsn=9)), "received short of the LSN"
    assert completed(t.acked(R2, 0, 0, 0.3, applied_lsn=10)) == {token}
    # A receipt is not durability: a flush at the same LSN still needs barriers.
    _, actions = t.request(10, 0.4)
    assert sorted(barriers(actions)) == [(R1, 10), (R2, 10)]
    assert t.committed_lsn == 0 and t.received_committed_lsn == 10
    # Durable implies received.
    t.acked(R1, 12, 0, 0.5)
    t.acked(R2, 12, 0, 0.5)
    write, actions = t.request(12, 0.6, durable=False)
    assert completed(actions) == {write}


def test_an_applied_lsn_does_not_satisfy_a_flush() -> None:
    t = tracker(ALL, R1)
    token, _ = t.request(10, 0.0)
    assert not completed(t.acked(R1, 5, 0, 0.1, applied_lsn=50))
    assert completed(t.acked(R1, 10, 0, 0.2, applied_lsn=50)) == {token}


def test_a_missing_receipt_times_out_and_completes_only_once_marked() -> None:
    t = tracker(ALL, R1, R2)
    token, _ = t.request(10, 100.0, durable=False)
    t.acked(R1, 0, 0, 100.1, applied_lsn=10)
    assert t.tick(100.0 + BARRIER_TIMEOUT_S - 0.01) == []
    actions = t.tick(100.0 + BARRIER_TIMEOUT_S)
    assert marks(actions) == [R2] and not completed(actions)
    (mark,) = of(actions, MarkOutOfSync)
    assert "receipt" in mark.reason
    assert completed(t.marked(R2, True, 101.0 + BARRIER_TIMEOUT_S)) == {token}


def test_a_receipt_fails_while_the_mark_cannot_be_persisted() -> None:
    t = tracker(ALL, R1)
    token, _ = t.request(10, 0.0, durable=False)
    actions = t.disconnected(R1, 0.1)
    assert marks(actions) == [R1] and not completed(actions)
    actions = t.marked(R1, False, 0.2)
    assert failed(actions) == {token}
    (fail,) = of(actions, Fail)
    assert "not received by enough copies" in fail.reason


def test_a_receipt_counts_only_on_its_connection() -> None:
    t = tracker(ALL, R1)
    t.acked(R1, 0, 0, 0.0, applied_lsn=10)
    t.disconnected(R1, 0.1)
    t.marked(R1, True, 0.2)
    t.connected(R1, 0.3)
    t.caught_up(R1, 0.4)
    # Joining again: what it reported receiving before the drop does not count.
    token, actions = t.request(10, 0.5, durable=False)
    assert not completed(actions)
    assert completed(t.acked(R1, 0, 0, 0.6, applied_lsn=10)) == {token}


def test_quorum_rf3_receipt_needs_one_replica_and_best_effort_none() -> None:
    t = tracker(QUORUM, R1, R2)
    token, _ = t.request(10, 0.0, durable=False)
    assert completed(t.acked(R2, 0, 0, 0.1, applied_lsn=10)) == {token}
    b = tracker(BEST, R1, R2)
    token, actions = b.request(10, 0.0, durable=False)
    assert completed(actions) == {token}


def test_a_joining_replica_must_hold_writes_acknowledged_on_receipt_before_it_is_in_sync() -> None:
    # A write acknowledged on R1's receipt alone (R2 out of sync) is an acknowledged write:
    # R2 must be durable up to it before it may be promoted, even with no flush since.
    t = tracker(ALL, R1, out=(R2,))
    token, _ = t.request(10, 0.0, durable=False)
    assert completed(t.acked(R1, 0, 0, 0.1, applied_lsn=10)) == {token}
    assert t.committed_lsn == 0
    actions = t.caught_up(R2, 0.2)
    assert mark_in_sync(actions) == []
    assert mark_in_sync(t.acked(R2, 9, 0, 0.3, applied_lsn=10)) == [], "received is not enough"
    assert mark_in_sync(t.acked(R2, 10, 0, 0.4)) == [R2]


# ---- random schedules ---------------------------------------------------------------------

REPLICAS = (R1, R2)


class TrackerMachine(RuleBasedStateMachine):
    """Random events against the tracker, with a plain model of each replica's state.

    Safety, checked on every verdict: a flush completes only if (sync_all) each replica that
    counted when it arrived acknowledged its LSN durably or was durably marked out of sync
    first; (quorum) a majority of copies acknowledged it. A flush never both completes and
    fails, and fails only while a mark cannot be persisted or a majority became impossible.
    Under sync_all, a replica durably marked in sync holds every acknowledged flush (it may be
    promoted)."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = ALL
        self.t: CommitTracker | None = None
        self.now = 0.0
        self.lsn = 0
        self.durable: dict[str, int] = dict.fromkeys(REPLICAS, 0)
        #: Applied (not synced) as reported on the current connection; and ever.
        self.received: dict[str, int] = dict.fromkeys(REPLICAS, 0)
        self.received_ever: dict[str, int] = dict.fromkeys(REPLICAS, 0)
        #: Waiters that are receipts (plain writes), not flushes.
        self.receipts: set[int] = set()
        self.receipt_committed = 0
        #: in_sync | joining | marking | unmarkable | out
        self.state: dict[str, str] = {}
        self.flag: dict[str, bool] = {}  # the durable in-sync flag
        self.promoting: set[str] = set()
        self.connected_: set[str] = set()
        self.counted: dict[int, tuple[int, frozenset[str]]] = {}
        self.since: dict[int, float] = {}
        self.done: set[int] = set()
        self.committed = 0
        self.inflight: dict[str, tuple[int, int]] = {}

    @initialize(mode=st.sampled_from([ALL, QUORUM, BEST]), out=st.sets(st.sampled_from(REPLICAS)))
    def start(self, mode: DurabilityMode, out: set[str]) -> None:
        self.mode = mode
        self.t = CommitTracker(
            mode, in_sync=[r for r in REPLICAS if r not in out], out_of_sync=sorted(out)
        )
        self.state = {r: "out" if r in out else "in_sync" for r in REPLICAS}
        self.flag = {r: r not in out for r in REPLICAS}

    def _run(self, actions: list[Action]) -> None:
        assert self.t is not None
        for a in actions:
            if isinstance(a, SendBarrier):
                assert a.replica in self.connected_
                assert a.replica not in self.inflight, "one barrier in flight per replica"
                assert self.state[a.replica] in ("in_sync", "joining")
                # The newest LSN any flush counting the replica waits for (group commit);
                # receipts need no barrier.
                want = max(
                    lsn
                    for token, (lsn, c) in self.counted.items()
                    if a.replica in c and token not in self.receipts
                )
                assert a.lsn == want, (a, want)
                self.inflight[a.replica] = (a.barrier_id, a.lsn)
            elif isinstance(a, MarkOutOfSync):
                assert self.state[a.replica] in ("in_sync", "joining"), a
                self.state[a.replica] = "marking"
                self.promoting.discard(a.replica)
            elif isinstance(a, MarkInSync):
                assert self.state[a.replica] == "joining", a
                self.promoting.add(a.replica)
            elif isinstance(a, Complete):
                assert a.token not in self.done
                self.done.add(a.token)
                lsn, counted = self.counted.pop(a.token)
                receipt = a.token in self.receipts
                acked = {
                    r
                    for r in counted
                    if self._holds(r, lsn, receipt) and self.state[r] in ("in_sync", "joining")
                }
                if self.mode is BEST:
                    pass
                elif self.mode is ALL:
                    for r in counted - acked:
                        assert self.state[r] == "out", (r, self.state[r], lsn)
                else:
                    assert 1 + len(acked) >= 2, (acked, lsn)
                if receipt:
                    self.receipt_committed = max(self.receipt_committed, lsn)
                else:
                    self.committed = max(self.committed, lsn)
            elif isinstance(a, Fail):
                assert a.token not in self.done
                self.done.add(a.token)
                lsn, counted = self.counted.pop(a.token)
                unmarkable = [r for r in counted if self.state[r] == "unmarkable"]
                # A waiter counts the replicas that counted when it arrived (one that joins
                # later does not hold it up, nor make its majority).
                expired = self.now - self.since[a.token] >= BARRIER_TIMEOUT_S
                possible = 1 + len([r for r in counted if self.state[r] != "out" or not expired])
                assert unmarkable or (self.mode is QUORUM and possible < 2), a.reason

    @rule(dt=st.sampled_from([0.0, 0.5, BARRIER_TIMEOUT_S]))
    def tick(self, dt: float) -> None:
        assert self.t is not None
        self.now += dt
        self._run(self.t.tick(self.now))

    def _holds(self, r: str, lsn: int, receipt: bool) -> bool:
        return self.durable[r] >= lsn or (receipt and self.received[r] >= lsn)

    @rule(advance=st.integers(0, 3), receipt=st.booleans())
    def flush(self, advance: int, receipt: bool) -> None:
        """A flush, or (``receipt``) a plain write that waits for the replicas' receipt."""
        assert self.t is not None
        self.lsn += advance
        # Every replica not durably out of sync counts: in sync, joining, or being marked (one
        # whose mark could not be persisted yet is still promotable).
        # (sync_quorum: every replica — an out-of-sync one may join and make the majority,
        # until the waiter is older than the barrier timeout.)
        if self.mode is QUORUM:
            counted = frozenset(REPLICAS)
        else:
            counted = frozenset(r for r in REPLICAS if self.state[r] != "out")
        token, actions = self.t.request(self.lsn, self.now, durable=not receipt)
        self.counted[token] = (self.lsn, counted)
        self.since[token] = self.now
        if receipt:
            self.receipts.add(token)
        self._run(actions)

    @rule(r=st.sampled_from(REPLICAS), upto=st.integers(0, 3))
    def report_received(self, r: str, upto: int) -> None:
        """A receipt: the replica applied records up to some LSN, not yet synced."""
        assert self.t is not None
        if r not in self.connected_:
            return
        self.received[r] = max(self.received[r], self.lsn - upto)
        self.received_ever[r] = max(self.received_ever[r], self.received[r])
        self._run(self.t.acked(r, self.durable[r], 0, self.now, self.received[r]))

    @rule(r=st.sampled_from(REPLICAS))
    def connect(self, r: str) -> None:
        assert self.t is not None
        self.connected_.add(r)
        self.inflight.pop(r, None)
        self._run(self.t.connected(r, self.now))

    @rule(r=st.sampled_from(REPLICAS))
    def disconnect(self, r: str) -> None:
        assert self.t is not None
        self.connected_.discard(r)
        self.inflight.pop(r, None)
        self.received[r] = 0  # the tracker counts receipts per connection
        counted = self.state[r] in ("in_sync", "joining")
        self._run(self.t.disconnected(r, self.now))
        if counted:
            assert self.state[r] == "marking", "a counted replica that drops is marked"

    @rule(r=st.sampled_from(REPLICAS))
    def needs_resync(self, r: str) -> None:
        assert self.t is not None
        self._run(self.t.behind(r, "it needs a resync", self.now))

    @rule(r=st.sampled_from(REPLICAS), extra=st.integers(0, 2))
    def answer_barrier(self, r: str, extra: int) -> None:
        assert self.t is not None
        if r not in self.inflight:
            return
        bid, lsn = self.inflight.pop(r)
        self.durable[r] = max(self.durable[r], min(lsn + extra, self.lsn))
        self._run(self.t.acked(r, self.durable[r], bid, self.now))

    @rule(r=st.sampled_from(REPLICAS), upto=st.integers(0, 3))
    def report_durable(self, r: str, upto: int) -> None:
        """An unsolicited Ack (the replica flushed on its own)."""
        assert self.t is not None
        if r not in self.connected_:
            return
        self.durable[r] = max(self.durable[r], self.lsn - upto)
        if r in self.inflight and self.durable[r] >= self.inflight[r][1]:
            del self.inflight[r]  # an answer that covers the barrier frees the slot
        self._run(self.t.acked(r, self.durable[r], 0, self.now))

    @rule(r=st.sampled_from(REPLICAS), ok=st.booleans())
    def persist_out_of_sync(self, r: str, ok: bool) -> None:
        assert self.t is not None
        if self.state[r] not in ("marking", "unmarkable"):
            return
        if ok:
            self.state[r] = "out"
            self.flag[r] = False
        else:
            self.state[r] = "unmarkable"
        self._run(self.t.marked(r, ok, self.now))

    @rule(r=st.sampled_from(REPLICAS), ok=st.booleans())
    def persist_in_sync(self, r: str, ok: bool) -> None:
        assert self.t is not None
        if r not in self.promoting:
            return
        self.promoting.discard(r)
        if ok and self.state[r] == "joining":
            self.state[r] = "in_sync"
            self.flag[r] = True
        self._run(self.t.marked_in_sync(r, ok, self.now))

    @rule(r=st.sampled_from(REPLICAS), behind=st.integers(0, 3))
    def caught_up(self, r: str, behind: int) -> None:
        """The session says the replica caught up: durable up to what was written when its
        feed first ran dry (some LSN not above the newest)."""
        assert self.t is not None
        if self.state[r] != "out" or r not in self.connected_:
            return
        self.durable[r] = max(self.durable[r], self.lsn - behind)
        if r in self.inflight and self.durable[r] >= self.inflight[r][1]:
            del self.inflight[r]
        self._run(self.t.acked(r, self.durable[r], 0, self.now))
        self.state[r] = "joining"
        self._run(self.t.caught_up(r, self.now))

    @invariant()
    def states_agree(self) -> None:
        if self.t is None:
            return
        for r in REPLICAS:
            state = self.t.state_of(r)
            want = {"out": "out_of_sync"}.get(self.state[r], self.state[r])
            assert state == want, (r, state, self.state[r])

    @invariant()
    def a_promotable_replica_holds_every_acknowledged_flush(self) -> None:
        if self.t is None or self.mode is not ALL:
            return
        for r in REPLICAS:
            if self.flag[r]:
                assert self.durable[r] >= self.committed, (r, self.durable[r], self.committed)
                # And every write acknowledged on receipt: it is in its WAL, synced or not.
                held = max(self.durable[r], self.received_ever[r])
                assert held >= self.receipt_committed, (r, held, self.receipt_committed)

    @invariant()
    def a_replica_that_misses_the_timeout_is_being_marked(self) -> None:
        if self.t is None or self.mode is BEST:
            return
        for token, (lsn, counted) in self.counted.items():
            if self.now - self.since[token] < BARRIER_TIMEOUT_S:
                continue
            for r in counted:
                if self.state[r] in ("in_sync", "joining"):
                    assert self._holds(r, lsn, token in self.receipts), (
                        f"{r} missed LSN {lsn} past the timeout"
                    )

    @invariant()
    def nothing_waits_that_could_be_decided(self) -> None:
        """Liveness of the rule: a waiter whose replicas all acknowledged is never left."""
        if self.t is None:
            return
        for token, (lsn, counted) in self.counted.items():
            if any(self.state[r] in ("marking", "unmarkable") for r in counted):
                continue
            receipt = token in self.receipts
            if self.mode is QUORUM:
                # A majority decides at once; short of one, an out-of-sync replica is waited
                # for until the barrier timeout.
                acked = [
                    r
                    for r in counted
                    if self._holds(r, lsn, receipt) and self.state[r] in ("in_sync", "joining")
                ]
                expired = self.now - self.since[token] >= BARRIER_TIMEOUT_S
                if 1 + len(acked) < 2 and not expired:
                    continue
            if all(self._holds(r, lsn, receipt) or self.state[r] == "out" for r in counted):
                raise AssertionError(f"flush {token} at LSN {lsn} is decidable but waits")


TestTrackerMachine = TrackerMachine.TestCase
# Cheap steps: more of them than the profile's default finds rare interleavings.
TestTrackerMachine.settings = settings(
    max_examples=settings().max_examples * 4, stateful_step_count=40
)


@given(st.lists(st.integers(1, 50), min_size=1, max_size=20))
def test_completions_follow_acknowledgements_in_lsn_order(lsns: list[int]) -> None:
    t = tracker(ALL, R1)
    tokens = {}
    for lsn in lsns:
        token, _ = t.request(lsn, 0.0)
        tokens[token] = lsn
    done: set[int] = set()
    for durable in range(0, 51):
        for token in completed(t.acked(R1, durable, 0, 0.0)):
            assert tokens[token] <= durable
            done.add(token)
        assert {k for k, v in tokens.items() if v <= durable} == done


@pytest.mark.parametrize("mode", [ALL, QUORUM])
def test_a_replica_durable_beyond_the_lsn_before_the_timeout_is_not_marked(
    mode: DurabilityMode,
) -> None:
    t = tracker(mode, R1, R2)
    token, _ = t.request(10, 0.0)
    t.acked(R1, 10, 0, 0.1)
    t.acked(R2, 10, 0, 0.1)
    assert marks(t.tick(BARRIER_TIMEOUT_S * 3)) == []
    del token


# ---- the durable in-sync flag (VolumeReplication) -----------------------------------------


def test_a_slow_in_sync_mark_never_lands_after_the_out_of_sync_mark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tracker asks for the in-sync mark (the replica joined and caught up); before that
    write is done the replica drops and is marked out of sync. replication.json must end
    saying out of sync, or after a restart of the primary (or for a master choosing whom to
    promote) a copy that misses acknowledged writes counts as in sync."""
    store = VolumeStore(str(tmp_path / "data"), background_flusher=False)
    vol = store.create("v", 1 << 20)
    vol.set_role(Role.PRIMARY, epoch=1)
    state = PrimaryState(ALL, (ReplicaEntry(R1, False),))
    save_primary_state(vol.directory, state)
    out_written = threading.Event()
    real_save = primary_mod.save_primary_state

    def save(directory: str, st: PrimaryState) -> None:
        entry = st.replica(R1)
        if entry is not None and entry.in_sync:
            out_written.wait(2.0)  # a slow fdatasync: lands after the other write
        real_save(directory, st)
        if entry is not None and not entry.in_sync:
            out_written.set()

    monkeypatch.setattr(primary_mod, "save_primary_state", save)

    async def scenario() -> VolumeReplication:
        with ThreadPoolExecutor(4) as executor:
            vr = VolumeReplication(vol, state, executor=executor, primary_id="p:1")
            vr.loop = asyncio.get_running_loop()
            vr._run(vr.tracker.connected(R1, 0.0))
            actions = vr.tracker.caught_up(R1, 0.1)
            assert mark_in_sync(actions) == [R1]
            vr._run(actions)
            await asyncio.sleep(0.05)  # the in-sync write is under way
            vr._run(vr.tracker.disconnected(R1, 0.2))
            async with asyncio.timeout(30):
                while vr._tasks:
                    await asyncio.sleep(0.01)
            return vr

    vr = asyncio.run(scenario())
    try:
        assert vr.tracker.state_of(R1) == "out_of_sync"
        on_disk = load_primary_state(vol.directory)
        assert on_disk is not None and on_disk.replica(R1) == ReplicaEntry(R1, False)
        assert vr.state.replica(R1) == ReplicaEntry(R1, False)
    finally:
        vol.close()
