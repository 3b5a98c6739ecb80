"""Lease arithmetic with an injected clock."""

from __future__ import annotations

import pytest

from blockyard.errors import InvalidArgumentError
from blockyard.master.core import MasterConfig
from blockyard.master.leases import LeasePolicy, LeaseTable

S = 1_000_000_000


def test_defaults_match_the_design() -> None:
    p = LeasePolicy()
    assert (p.ttl_ns, p.margin_ns, p.promotion_delay_ns, p.ttl_ms) == (
        2 * S,
        S // 2,
        5 * S // 2,
        2000,
    )


def test_expiry_is_last_grant_plus_ttl_plus_margin() -> None:
    t = LeaseTable(LeasePolicy(), took_over_ns=0)
    t.granted("v", 1, 10 * S)
    assert t.expiry_ns("v", 1) == 10 * S + 5 * S // 2
    assert not t.may_promote("v", 1, 10 * S + 5 * S // 2 - 1)
    assert t.may_promote("v", 1, 10 * S + 5 * S // 2)
    # A grant for another epoch says nothing about this one: the take-over bound applies.
    assert t.last_grant_ns("v", 2) is None and t.expiry_ns("v", 2) == 5 * S // 2


def test_take_over_bounds_every_expiry() -> None:
    t = LeaseTable(LeasePolicy(), took_over_ns=100 * S)
    assert not t.promotions_allowed(100 * S + 5 * S // 2 - 1)
    assert t.promotions_allowed(100 * S + 5 * S // 2)
    assert t.expiry_ns("never-granted", 1) == 100 * S + 5 * S // 2


def test_heartbeat_interval_must_keep_the_lease_alive() -> None:
    with pytest.raises(InvalidArgumentError, match="at most half the lease TTL"):
        MasterConfig("m", LeasePolicy(2 * S, S // 2), heartbeat_interval_ns=3 * S // 2)
