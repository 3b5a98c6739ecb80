"""The replica lease counts only the replicas the master may promote: a replica the master
recorded out of sync (MarkOutOfSync answered) no longer holds the lease up, so a degraded
volume keeps acknowledging through a master outage; a replica dropped only locally still
counts. Fake monotonic clock, no sleeps."""

from __future__ import annotations

from blockyard.replication.lease import DEFAULT_LEASE_TTL_NS, NO_DEADLINE_NS, PrimaryLease

S = 1_000_000_000
TTL = DEFAULT_LEASE_TTL_NS


class Clock:
    def __init__(self) -> None:
        self.now_ns = 1000 * S

    def __call__(self) -> int:
        return self.now_ns


def lease_with(*replicas: str) -> tuple[PrimaryLease, Clock]:
    clock = Clock()
    lease = PrimaryLease("v", epoch=4, clock=clock)
    lease.set_replicas(replicas)
    return lease, clock


def test_a_replica_the_master_marked_out_of_sync_no_longer_holds_the_lease_up() -> None:
    lease, clock = lease_with("a", "b")
    lease.answered("a", 4, clock.now_ns)
    # "b" is silent (its server is stopped) and no master grants: fenced, as before.
    assert not lease.allows()
    lease.set_out_of_sync({"b"})
    assert lease.counted == {"a"}
    assert lease.deadline_ns == clock.now_ns + TTL
    assert lease.allows()
    clock.now_ns += TTL - 1
    assert lease.allows()
    clock.now_ns += 1
    assert not lease.allows()  # "a" must keep answering


def test_every_replica_marked_out_of_sync_needs_no_lease() -> None:
    lease, clock = lease_with("a")
    assert not lease.allows()
    lease.set_out_of_sync({"a"})
    assert lease.deadline_ns == NO_DEADLINE_NS
    clock.now_ns += 100 * TTL
    assert lease.allows()
    assert lease.required  # it still probes "a", so its answers count when it is back


def test_a_replica_back_in_sync_counts_at_once_with_the_answers_it_gave_meanwhile() -> None:
    lease, clock = lease_with("a")
    lease.set_out_of_sync({"a"})
    lease.answered("a", 4, clock.now_ns)
    lease.set_out_of_sync(())
    assert lease.deadline_ns == clock.now_ns + TTL


def test_marks_end_with_the_role_and_the_replica_set() -> None:
    lease, _ = lease_with("a", "b")
    lease.set_out_of_sync({"a", "b", "stranger"})
    assert lease.counted == frozenset()
    # A new epoch on the same primary keeps the master's marks (its record keeps them) ...
    lease.set_epoch(5, stays_primary=True)
    assert lease.counted == frozenset()
    # ... a role change forgets them: the marks were made at an older epoch.
    lease.set_epoch(6, stays_primary=False)
    assert lease.counted == {"a", "b"}
    assert not lease.allows()
    lease.set_out_of_sync({"b"})
    lease.set_replicas({"a"})
    lease.set_replicas({"a", "b"})  # "b" left and came back: out of sync here, not at the master
    assert lease.counted == {"a", "b"}
