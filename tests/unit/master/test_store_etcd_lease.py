"""The etcd leader's local lease deadline, on a fake clock: the lease counts from the *send*
time of the keepalive etcd answered (never later than etcd's own expiry), less the margin."""

from __future__ import annotations

import pytest

from blockyard.master.etcd_lease import (
    EXPIRY_MARGIN_S,
    KEEPALIVE_RETRY_PAUSE_S,
    LeaseDeadline,
    keepalive_pause_s,
    keepalive_timeout_s,
)


def test_counts_from_the_send_time_less_the_margin() -> None:
    lease = LeaseDeadline()
    assert lease.expired(0.0)  # nothing confirmed yet
    lease.confirmed(sent_s=10.0, ttl_s=3.0)
    expiry = 13.0 - EXPIRY_MARGIN_S
    assert not lease.expired(expiry - 0.001)
    assert lease.expired(expiry)
    assert lease.remaining_s(11.0) == pytest.approx(expiry - 11.0)
    assert lease.remaining_s(20.0) == 0.0


def test_keepalives_extend_and_a_late_answer_to_an_old_one_never_shortens() -> None:
    lease = LeaseDeadline(margin_s=0.0)
    lease.confirmed(sent_s=10.0, ttl_s=3.0)
    lease.confirmed(sent_s=11.0, ttl_s=3.0)
    assert lease.remaining_s(11.0) == pytest.approx(3.0)
    lease.confirmed(sent_s=10.5, ttl_s=3.0)  # answered after the later one
    assert lease.remaining_s(11.0) == pytest.approx(3.0)
    assert lease.expired(14.0)


def test_a_zero_ttl_answer_or_a_revoke_ends_it_for_good() -> None:
    lease = LeaseDeadline()
    lease.confirmed(sent_s=0.0, ttl_s=3.0)
    lease.confirmed(sent_s=1.0, ttl_s=0.0)  # etcd: the lease is gone
    assert lease.expired(1.0)
    lease.confirmed(sent_s=2.0, ttl_s=3.0)  # a stale positive answer does not revive it
    assert lease.expired(2.0)
    other = LeaseDeadline()
    other.confirmed(sent_s=0.0, ttl_s=3.0)
    other.revoke()
    assert other.expired(0.0)
    assert other.remaining_s(0.0) == 0.0


def test_one_keepalive_attempt_never_spends_the_whole_lease() -> None:
    """A stream to a killed member may never answer: with a 3 s TTL an attempt is given up
    after 0.5 s and re-sent at once, so a lease whose last answer came just before an etcd
    leader's death gets several tries while etcd elects a new leader (1 to 2 s)."""
    ttl = 3.0
    lease = LeaseDeadline()
    lease.confirmed(sent_s=0.0, ttl_s=ttl)
    now = keepalive_pause_s(True, ttl, lease.remaining_s(0.0))
    assert now == pytest.approx(1.0)
    attempts = []
    while not lease.expired(now):
        timeout = keepalive_timeout_s(ttl, lease.remaining_s(now), op_timeout_s=5.0)
        attempts.append(now)
        now += timeout  # unanswered
        if lease.expired(now):
            break
        now += keepalive_pause_s(False, ttl, lease.remaining_s(now))
    assert attempts[0] == pytest.approx(1.0)
    assert len(attempts) >= 3, attempts
    assert attempts[-1] >= 2.0, "still trying after an etcd election's worth of time"
    assert now <= ttl, "never past etcd's own expiry"


def test_keepalive_pauses_stop_at_the_local_expiry() -> None:
    assert keepalive_pause_s(True, 3.0, 0.4) == pytest.approx(0.4)
    assert keepalive_pause_s(False, 3.0, 1.0) == pytest.approx(KEEPALIVE_RETRY_PAUSE_S)
    assert keepalive_pause_s(False, 3.0, 0.0) == 0.0
    assert keepalive_timeout_s(3.0, 0.2, 5.0) == pytest.approx(0.2)
    assert keepalive_timeout_s(60.0, 30.0, 5.0) == pytest.approx(5.0)
