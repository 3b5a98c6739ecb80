"""How long an etcd-elected leader may count on its lease, by its own monotonic clock (pure: the
clock is passed in, so the arithmetic is tested with a fake one).

etcd restarts a lease's TTL when it *processes* a keepalive, which is after the master *sent*
it. So ``send time + granted TTL`` is never later than etcd's own expiry of the lease (clock
rates differ by < 1e-3, under 3 ms over a few seconds' TTL), and a master that stops calling
itself leader at that point, less :data:`EXPIRY_MARGIN_S`, stops before etcd can let another
master win the election. The margin covers the clock-rate drift and the time between the check
and the leader's last act (a heartbeat reply already on its way). The store's writes are fenced
by etcd anyway (the leader key's create revision); this bound is for what the master does
without the store, like granting volume leases.
"""

from __future__ import annotations

from typing import Final

#: Subtracted from every computed lease expiry (see the module docstring).
EXPIRY_MARGIN_S: Final = 0.25


class LeaseDeadline:
    """The local expiry of one etcd lease: the latest ``sent + ttl`` of a keepalive (or the
    grant) that etcd answered with a positive TTL."""

    def __init__(self, *, margin_s: float = EXPIRY_MARGIN_S) -> None:
        self._margin_s = margin_s
        self._expiry_s: float | None = None
        self._revoked = False

    def confirmed(self, sent_s: float, ttl_s: float) -> None:
        """etcd answered a grant or keepalive sent at ``sent_s`` with ``ttl_s`` (> 0) left."""
        if self._revoked:
            return
        if ttl_s <= 0:
            self.revoke()
            return
        expiry_s = sent_s + ttl_s - self._margin_s
        if self._expiry_s is None or expiry_s > self._expiry_s:
            self._expiry_s = expiry_s

    def revoke(self) -> None:
        """The lease is gone (etcd answered TTL <= 0, or we revoked it): expired for good."""
        self._revoked = True
        self._expiry_s = None

    def expired(self, now_s: float) -> bool:
        return self._expiry_s is None or now_s >= self._expiry_s

    def remaining_s(self, now_s: float) -> float:
        """Seconds until the local expiry (0 once expired)."""
        if self._expiry_s is None:
            return 0.0
        return max(0.0, self._expiry_s - now_s)


#: A keepalive unanswered for this share of the TTL is given up and sent again on a new
#: stream. One attempt must not spend the whole lease: a stream to a member that was just
#: killed, or to a follower waiting for an etcd election, may never answer, while a new one
#: reaches a live member (or the new etcd leader, elected about 1 to 2 s after a leader's death
#: with etcd's default 1 s election timeout) in time.
KEEPALIVE_ATTEMPT_FRACTION: Final = 1 / 6
#: Pause before re-sending a keepalive that failed: short, the lease is running out.
KEEPALIVE_RETRY_PAUSE_S: Final = 0.05


def keepalive_timeout_s(ttl_s: float, remaining_s: float, op_timeout_s: float) -> float:
    """How long one keepalive attempt may wait for etcd's answer."""
    return max(0.01, min(op_timeout_s, remaining_s, ttl_s * KEEPALIVE_ATTEMPT_FRACTION))


def keepalive_pause_s(answered: bool, ttl_s: float, remaining_s: float) -> float:
    """How long to wait before the next keepalive: a third of the TTL after an answer (two
    more chances before the lease runs out), a moment after a failure; never past the local
    expiry."""
    pause_s = ttl_s / 3 if answered else KEEPALIVE_RETRY_PAUSE_S
    return max(0.0, min(pause_s, remaining_s))
