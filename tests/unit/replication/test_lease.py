"""The primary's lease and the replica's promise (replication/lease.py), on a fake clock."""

from __future__ import annotations

import pytest

from blockyard.errors import FencedError, LeaseExpiredError
from blockyard.replication.lease import (
    DEFAULT_LEASE_TTL_NS,
    LEASE_MARGIN_NS,
    MAX_LEASE_TTL_NS,
    MIN_LEASE_TTL_NS,
    NO_DEADLINE_NS,
    AnswerLog,
    PrimaryLease,
    may_answer,
)

S = 1_000_000_000
MS = 1_000_000
TTL = DEFAULT_LEASE_TTL_NS


class FakeClock:
    def __init__(self, now_ns: int = 1000 * S) -> None:
        self.now_ns = now_ns

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, ns: int) -> None:
        self.now_ns += ns


def lease(clock: FakeClock, replicas: tuple[str, ...] = ("r1",), epoch: int = 5) -> PrimaryLease:
    le = PrimaryLease("vol", epoch=epoch, clock=clock)
    le.set_replicas(replicas)
    return le


# ---- no lease needed ----------------------------------------------------------------------


def test_no_replicas_needs_no_lease() -> None:
    clock = FakeClock()
    le = PrimaryLease("vol", epoch=1, clock=clock)
    assert not le.required
    assert le.allows()
    le.check()
    clock.advance(3600 * S)
    assert le.allows()
    assert le.deadline_ns == NO_DEADLINE_NS


def test_replicas_leaving_the_set_lift_the_need() -> None:
    clock = FakeClock()
    le = lease(clock)
    assert le.required and not le.allows()
    le.set_replicas(())
    assert le.allows()


def test_a_replica_set_without_any_evidence_fences() -> None:
    clock = FakeClock()
    le = lease(clock)
    assert not le.allows()
    with pytest.raises(LeaseExpiredError, match="no lease yet"):
        le.check()


def test_lease_expired_is_a_fenced_error() -> None:
    assert issubclass(LeaseExpiredError, FencedError)


# ---- master lease -------------------------------------------------------------------------


def test_master_grant_runs_from_the_heartbeat_send_time() -> None:
    clock = FakeClock()
    le = lease(clock)
    sent = clock()
    clock.advance(300 * MS)  # the reply takes 300 ms to come back
    le.grant(5, sent, TTL)
    assert le.deadline_ns == sent + TTL
    clock.advance(TTL - 300 * MS - 1)
    assert le.allows()
    clock.advance(1)
    assert not le.allows()
    with pytest.raises(LeaseExpiredError, match=r"for 0\.00 s"):
        le.check()


def test_grant_for_another_epoch_is_ignored() -> None:
    clock = FakeClock()
    le = lease(clock, epoch=5)
    le.grant(4, clock(), TTL)
    assert not le.allows()
    le.grant(6, clock(), TTL)
    assert not le.allows()
    le.grant(5, clock(), TTL)
    assert le.allows()


def test_an_older_reply_never_shortens_the_lease() -> None:
    clock = FakeClock()
    le = lease(clock)
    first = clock()
    clock.advance(500 * MS)
    second = clock()
    le.grant(5, second, TTL)
    le.grant(5, first, TTL)  # a reply to the earlier heartbeat arrives late
    assert le.deadline_ns == second + TTL


def test_grant_ttl_is_clamped() -> None:
    clock = FakeClock()
    le = lease(clock)
    le.grant(5, clock(), 10**15)
    assert le.deadline_ns == clock() + MAX_LEASE_TTL_NS
    le2 = lease(clock)
    le2.grant(5, clock(), 1)
    assert le2.deadline_ns == clock() + MIN_LEASE_TTL_NS


def test_renewals_keep_it_and_a_lapse_resumes_on_the_next_grant() -> None:
    clock = FakeClock()
    le = lease(clock)
    for _ in range(10):
        le.grant(5, clock(), TTL)
        clock.advance(500 * MS)
        assert le.allows()
    clock.advance(TTL)
    assert not le.allows()
    le.grant(5, clock(), TTL)
    assert le.allows()


# ---- replica lease ------------------------------------------------------------------------


def test_every_replica_must_have_answered() -> None:
    clock = FakeClock()
    le = lease(clock, replicas=("r1", "r2"))
    t0 = clock()
    le.answered("r1", 5, t0)
    assert not le.allows()
    clock.advance(100 * MS)
    le.answered("r2", 5, clock())
    # The lease runs from the older of the two answers' probes.
    assert le.deadline_ns == t0 + TTL
    clock.advance(TTL - 100 * MS)
    assert not le.allows()


def test_answer_at_another_epoch_or_from_a_stranger_counts_nothing() -> None:
    clock = FakeClock()
    le = lease(clock)
    le.answered("r1", 4, clock())
    le.answered("r9", 5, clock())
    assert not le.allows()
    le.answered("r1", 5, clock())
    assert le.allows()


def test_answer_to_an_older_probe_never_shortens() -> None:
    clock = FakeClock()
    le = lease(clock)
    t0 = clock()
    clock.advance(400 * MS)
    le.answered("r1", 5, clock())
    le.answered("r1", 5, t0)
    assert le.deadline_ns == t0 + 400 * MS + TTL


def test_replica_lease_uses_the_ttl_the_master_grants() -> None:
    clock = FakeClock()
    le = lease(clock)
    le.grant(5, clock() - 10 * S, 1 * S)  # long expired, but teaches the TTL
    le.answered("r1", 5, clock())
    assert le.deadline_ns == clock() + 1 * S


def test_either_lease_is_enough() -> None:
    clock = FakeClock()
    le = lease(clock)
    le.grant(5, clock(), TTL)
    clock.advance(TTL // 2)
    le.answered("r1", 5, clock())  # the master goes away; the replica keeps answering
    clock.advance(TTL - 1)
    assert le.allows()
    clock.advance(1)
    assert not le.allows()


def test_new_replica_must_answer_before_the_replica_lease_holds() -> None:
    clock = FakeClock()
    le = lease(clock)
    le.answered("r1", 5, clock())
    assert le.allows()
    le.set_replicas(("r1", "r2"))
    assert not le.allows()
    le.answered("r2", 5, clock())
    assert le.allows()


def test_removed_replica_forgets_its_answers() -> None:
    clock = FakeClock()
    le = lease(clock, replicas=("r1", "r2"))
    le.answered("r1", 5, clock())
    le.answered("r2", 5, clock())
    le.set_replicas(("r1",))
    le.set_replicas(("r1", "r2"))
    assert not le.allows()


# ---- epochs -------------------------------------------------------------------------------


def test_staying_primary_at_a_new_epoch_keeps_the_lease() -> None:
    clock = FakeClock()
    le = lease(clock)
    le.grant(5, clock(), TTL)
    le.set_epoch(6, stays_primary=True)
    assert le.epoch == 6
    assert le.allows()
    le.grant(5, clock() + S, TTL)  # a late grant for the old epoch adds nothing
    assert le.deadline_ns == clock() + TTL


def test_becoming_primary_starts_without_a_lease() -> None:
    clock = FakeClock()
    le = lease(clock)
    le.grant(5, clock(), TTL)
    le.answered("r1", 5, clock())
    le.set_epoch(7, stays_primary=False)
    assert not le.allows()
    le.grant(7, clock(), TTL)
    assert le.allows()


# ---- the promoted replica's hold ----------------------------------------------------------


def test_hold_refuses_until_it_ends_even_with_a_grant() -> None:
    clock = FakeClock()
    le = lease(clock)
    le.grant(5, clock(), TTL)
    le.hold_until(clock() + 700 * MS)
    assert not le.allows()
    with pytest.raises(LeaseExpiredError, match="just promoted"):
        le.check()
    clock.advance(700 * MS)
    assert le.allows()


def test_hold_applies_without_replicas_too() -> None:
    clock = FakeClock()
    le = PrimaryLease("vol", epoch=1, clock=clock)
    le.hold_until(clock() + S)
    assert not le.allows()
    clock.advance(S)
    assert le.allows()


def test_hold_never_moves_back() -> None:
    clock = FakeClock()
    le = PrimaryLease("vol", clock=clock)
    le.hold_until(clock() + S)
    le.hold_until(clock())
    assert le.not_before_ns == clock() + S


# ---- the whole promise, end to end on one clock -------------------------------------------


def test_old_primary_and_promoted_replica_never_both_acknowledge() -> None:
    """The old primary probes every TTL/4 and the replica answers after a delay; the master
    is gone (no grants). At some point the replica is promoted: from then on it answers
    nothing, and its first acknowledgement comes only after the old primary's last one."""
    for answer_delay_ms in (0, 1, 250, 1999):
        for promote_after_ms in (0, 123, 1000, 1777):
            clock = FakeClock()
            old = lease(clock)
            log = AnswerLog(clock=clock)
            probes: list[int] = []
            # Run the exchange for 3 s before the promotion.
            end = clock() + 3 * S + promote_after_ms * MS
            while clock() < end:
                probes.append(clock())
                sent = clock()
                clock.advance(answer_delay_ms * MS)
                if clock() >= end:
                    break
                log.answered("vol")  # the replica answers...
                old.answered("r1", 5, sent)  # ...and the primary hears it
                clock.advance(TTL // 4 - answer_delay_ms * MS if answer_delay_ms < 500 else 0)
            clock.now_ns = end
            new = PrimaryLease("vol", epoch=6, clock=clock)
            new.hold_until(log.hold_until("vol"))
            old_last = old.deadline_ns - 1
            assert not new.allows()
            assert new.not_before_ns > old_last
            assert new.not_before_ns - old_last >= LEASE_MARGIN_NS


def test_may_answer_only_at_the_connection_epoch() -> None:
    assert may_answer(5, 5)
    assert not may_answer(6, 5)


# ---- answer log ---------------------------------------------------------------------------


def test_answer_log_hold() -> None:
    clock = FakeClock()
    log = AnswerLog(clock=clock)
    assert log.hold_until("vol") == 0
    log.answered("vol")
    assert log.hold_until("vol") == clock() + TTL + LEASE_MARGIN_NS
    assert AnswerLog(clock=clock, ttl_ns=4 * S).ttl_ns == 4 * S
    log.forget("vol")
    assert log.hold_until("vol") == 0


def test_answer_log_is_bounded_and_stays_safe() -> None:
    clock = FakeClock()
    log = AnswerLog(clock=clock, max_entries=3)
    for name in ("a", "b", "c"):
        log.answered(name)
        clock.advance(MS)
    log.answered("d")  # full of live holds: the oldest goes, remembered as a floor
    assert len(log) == 3
    assert log.hold_until("a") == clock() - 3 * MS + TTL + LEASE_MARGIN_NS
    clock.advance(10 * S)
    log.answered("e")  # every hold is over: they are pruned
    assert len(log) == 1


def test_suspended_refuses_everything_until_resumed() -> None:
    clock = FakeClock()
    le = PrimaryLease("vol", clock=clock)
    assert le.allows()
    le.suspend()
    assert not le.allows()
    with pytest.raises(LeaseExpiredError, match="changing role"):
        le.check()
    le.set_replicas(())  # updates while suspended do not lift it
    le.grant(0, clock(), TTL)
    assert not le.allows()
    le.resume()
    assert le.allows()


def test_a_long_master_ttl_never_stretches_the_replica_lease() -> None:
    """A replica server that never got a grant holds a promotion for the default TTL plus the
    margin only: a primary's replica lease must not outlast that, whatever the master's TTL."""
    clock = FakeClock()
    le = lease(clock)
    le.grant(5, clock() - 60 * S, 10 * S)  # expired; teaches a 10 s TTL
    le.answered("r1", 5, clock())
    assert le.deadline_ns == clock() + DEFAULT_LEASE_TTL_NS
    replica_side = AnswerLog(clock=clock)  # never learnt the 10 s
    replica_side.answered("vol")
    assert replica_side.hold_until("vol") - le.deadline_ns >= LEASE_MARGIN_NS
