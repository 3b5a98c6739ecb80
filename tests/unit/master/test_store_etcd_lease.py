"""The etcd leader's local lease deadline, on a fake clock: the lease counts from the *send*
time of the keepalive etcd answered (never later than etcd's own expiry), less the margin."""

from __future__ import annotations

import pytest

from blockyard.master.etcd_lease import EXPIRY_MARGIN_S, LeaseDeadline


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
