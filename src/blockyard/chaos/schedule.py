"""The seeded fault schedule: the same seed gives the same sequence of faults (kind, which
volume's primary or replica, how long each is held, how long the cluster then stays quiet).
Pure: no clock, no I/O. Faults run one at a time; each is followed by a wait for the cluster
to heal and a quiet period, so the real duration of a run is not a function of the seed (the
timing of real processes varies)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

#: Every fault the harness can inject, with the range its hold time is drawn from (seconds).
#: A pause or partition held past the lease TTL (2 s) makes the master fail the volume over
#: while the old primary still runs: the case fencing exists for.
HOLD_S: Final = {
    "kill": (0.5, 4.0),  # SIGKILL, then restart on the same data directory and ports
    "pause": (0.5, 5.0),  # SIGSTOP, then SIGCONT
    "partition": (1.0, 6.0),  # the server's only link down, then up
    "master": (0.5, 3.0),  # SIGKILL of the master, then restart on its store
    "delay": (1.0, 6.0),  # the links to a server's replica copies delayed, then not
    # The links to a replica of the volume delayed, then the volume's primary killed -9 while
    # that replica lags; restarted after the hold. What an acknowledgement given before the
    # replica holds the write would lose.
    "kill-lagging": (0.5, 3.0),
    # A server's link to the master silent while it still reaches its peers and the
    # initiator: past the lease the master fails its volumes over though it is alive.
    "master-partition": (2.0, 6.0),
    # SIGKILL, then a restart in a time namespace whose monotonic clock is hours or days
    # ahead of or behind the others': nothing may compare one process's clock with another's.
    "clock": (0.5, 2.0),
    # The filesystem under a server's data directory filled to the last block, then freed:
    # writes that need space fail (not lost); replicas that cannot apply fall out of sync.
    "disk-full": (2.0, 6.0),
}
KINDS: Final = tuple(HOLD_S)
#: One-way delay of a delay fault, drawn from this range (seconds): from a slow LAN to a WAN
#: link, under the 1 s of a replica's barrier budget.
DELAY_S: Final = (0.02, 0.4)
#: Quiet time after a fault healed, before the next one.
SETTLE_S: Final = (1.0, 3.0)
#: Share of server faults aimed at a volume's primary (the rest at one of its replicas).
PRIMARY_SHARE: Final = 0.6


@dataclass(frozen=True)
class FaultSpec:
    number: int
    kind: str
    volume: int  # whose copy is the target (not used by "master")
    role: str  # "primary" or "replica"
    pick: int  # which replica, modulo their count
    hold_s: float
    settle_s: float
    delay_s: float  # one way, for delay faults

    def clock_offset_s(self, host_monotonic_s: float) -> int:
        """A clock fault's offset: 1 hour to 30 days, ahead or behind (but never before the
        clock's zero, which a time namespace refuses)."""
        magnitude = 3600 * (1 + (self.pick >> 1) % 720)
        if self.pick & 1:
            return magnitude
        return -min(magnitude, max(0, int(host_monotonic_s) - 60))

    def describe(self) -> str:
        if self.kind == "master":
            return f"#{self.number} {self.kind}"
        if self.kind == "kill-lagging":
            return f"#{self.number} {self.kind} (volume {self.volume})"
        return f"#{self.number} {self.kind} {self.role} of volume {self.volume}"


def schedule(seed: int, kinds: Sequence[str], volumes: int) -> Iterator[FaultSpec]:
    """An endless schedule of faults of ``kinds`` (each in :data:`KINDS`)."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise ValueError(f"unknown fault kinds {unknown}; known: {', '.join(KINDS)}")
    rng = random.Random(f"chaos-schedule/{seed}")
    number = 0
    while True:
        number += 1
        kind = rng.choice(list(kinds))
        lo, hi = HOLD_S[kind]
        yield FaultSpec(
            number=number,
            kind=kind,
            volume=rng.randrange(volumes),
            role="primary" if rng.random() < PRIMARY_SHARE else "replica",
            pick=rng.randrange(1 << 16),
            hold_s=round(rng.uniform(lo, hi), 2),
            settle_s=round(rng.uniform(*SETTLE_S), 2),
            delay_s=round(rng.uniform(*DELAY_S), 3),
        )
