"""Lease arithmetic of the master (pure; the clock is passed in as monotonic nanoseconds).

The primary of a volume holds a lease for ``ttl`` from the monotonic time *it* sent the
heartbeat that a grant answers, so its lease always ends before the master's view of it: the
master records a grant when it sends it, which is after the server sent its heartbeat.

The master may promote another copy of ``(volume, epoch)`` only once ``ttl + margin`` has
passed since the last grant it sent for that epoch. The margin (0.5 s) covers clock *rate*
drift between the two monotonic clocks (under 1e-3, so under 2 ms over a 2 s lease), the time
between a primary's lease check and its answer leaving, and heartbeat processing on both
sides; drift of the clocks' *values* does not matter, since neither compares the other's.

A master that has just started or just been elected cannot see grants a previous incarnation
sent, so it promotes nothing until ``ttl + margin`` after it took over. It may grant at once:
grants follow the store's (primary, epoch), which every incarnation agrees on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: Defaults (docs/ARCHITECTURE.md "Control plane"): a 2 s lease renewed by 500 ms heartbeats.
DEFAULT_LEASE_TTL_S: Final = 2.0
LEASE_MARGIN_S: Final = 0.5
_NS_PER_S: Final = 1_000_000_000


@dataclass(frozen=True, slots=True)
class LeasePolicy:
    ttl_ns: int = int(DEFAULT_LEASE_TTL_S * _NS_PER_S)
    margin_ns: int = int(LEASE_MARGIN_S * _NS_PER_S)

    def __post_init__(self) -> None:
        assert self.ttl_ns > 0 and self.margin_ns >= 0

    @classmethod
    def from_seconds(cls, ttl_s: float, margin_s: float = LEASE_MARGIN_S) -> LeasePolicy:
        return cls(int(ttl_s * _NS_PER_S), int(margin_s * _NS_PER_S))

    @property
    def promotion_delay_ns(self) -> int:
        return self.ttl_ns + self.margin_ns

    @property
    def ttl_ms(self) -> int:
        return self.ttl_ns // 1_000_000


class LeaseTable:
    """The last grant sent per volume, for the volume's current epoch only (one entry per
    volume: bounded by the registry)."""

    def __init__(self, policy: LeasePolicy, took_over_ns: int) -> None:
        self.policy = policy
        self.took_over_ns = took_over_ns
        self._last: dict[str, tuple[int, int]] = {}

    def granted(self, volume: str, epoch: int, now_ns: int) -> None:
        prev = self._last.get(volume)
        assert prev is None or prev[0] <= epoch, "a grant for an epoch older than one granted"
        self._last[volume] = (epoch, now_ns)

    def last_grant_ns(self, volume: str, epoch: int) -> int | None:
        entry = self._last.get(volume)
        return entry[1] if entry is not None and entry[0] == epoch else None

    def forget(self, volume: str) -> None:
        self._last.pop(volume, None)

    def promotions_allowed(self, now_ns: int) -> bool:
        return now_ns >= self.took_over_ns + self.policy.promotion_delay_ns

    def expiry_ns(self, volume: str, epoch: int) -> int:
        """When the primary of ``(volume, epoch)`` has certainly stopped acknowledging (by this
        master's clock), given no further grant."""
        last = self.last_grant_ns(volume, epoch)
        start = self.took_over_ns if last is None else max(last, self.took_over_ns)
        return start + self.policy.promotion_delay_ns

    def may_promote(self, volume: str, epoch: int, now_ns: int) -> bool:
        return now_ns >= self.expiry_ns(volume, epoch)
