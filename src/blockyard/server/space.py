"""Low-space watch for a data directory: the sans-IO core behind the thin-provisioning soft
threshold.

Volumes are sparse (thin provisioned): the data region takes space as blocks are written, so a
data directory can run out although every volume is within its size. The policy (see
docs/ARCHITECTURE.md, "Space policy"):

- the WAL is allocated in full when a volume is created, so appending to it never needs space;
- when the free space of the data directory's filesystem falls below the soft threshold, every
  exported LU raises THIN PROVISIONING SOFT THRESHOLD REACHED (38/07) once, the server logs a
  warning, and the metric ``blockyard_server_data_dir_low_space`` turns 1 — while writes still
  succeed;
- when space runs out, writes that need new blocks fail with SPACE ALLOCATION FAILED (07/27/07)
  and nothing acknowledged is lost (the WAL keeps what cannot be applied);
- the condition re-arms once free space is back above the threshold plus a hysteresis margin,
  so a directory hovering at the threshold does not raise a unit attention per check.

:class:`SpaceWatch` takes readings and says when to notify; it does no I/O and reads no clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

#: Free space below this share of the filesystem raises the soft threshold...
DEFAULT_SOFT_THRESHOLD_FRACTION: Final = 0.10
#: ...or below this many bytes, whichever is larger (small filesystems get a usable margin).
DEFAULT_SOFT_THRESHOLD_MIN_BYTES: Final = 256 << 20
#: Free space must climb this share of the filesystem above the threshold to re-arm.
HYSTERESIS_FRACTION: Final = 0.02
#: How often the volume server reads the free space of its data directory.
CHECK_INTERVAL_S: Final = 5.0


class SpaceEvent(enum.Enum):
    LOW = "low"
    RECOVERED = "recovered"


@dataclass(frozen=True, slots=True)
class SpaceReading:
    free_bytes: int
    total_bytes: int


class SpaceWatch:
    """Turns free-space readings into LOW / RECOVERED transitions (each reported once)."""

    def __init__(
        self,
        *,
        threshold_fraction: float = DEFAULT_SOFT_THRESHOLD_FRACTION,
        threshold_min_bytes: int = DEFAULT_SOFT_THRESHOLD_MIN_BYTES,
    ) -> None:
        if not 0.0 <= threshold_fraction < 1.0 or threshold_min_bytes < 0:
            raise ValueError("the soft threshold must be a fraction in [0, 1) and bytes >= 0")
        self._fraction = threshold_fraction
        self._min_bytes = threshold_min_bytes
        self.low = False
        self.last: SpaceReading | None = None

    def threshold_bytes(self, total_bytes: int) -> int:
        return max(int(total_bytes * self._fraction), min(self._min_bytes, total_bytes // 2))

    def update(self, reading: SpaceReading) -> SpaceEvent | None:
        """Feed one reading; returns the transition it causes, if any."""
        self.last = reading
        threshold = self.threshold_bytes(reading.total_bytes)
        if not self.low and reading.free_bytes < threshold:
            self.low = True
            return SpaceEvent.LOW
        rearm = threshold + int(reading.total_bytes * HYSTERESIS_FRACTION)
        if self.low and reading.free_bytes >= rearm:
            self.low = False
            return SpaceEvent.RECOVERED
        return None
