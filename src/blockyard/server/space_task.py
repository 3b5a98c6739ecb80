"""The volume server's periodic space check: drives :class:`~blockyard.server.space.SpaceWatch`
with readings of the data directory and acts on its transitions.

Every :data:`~blockyard.server.space.CHECK_INTERVAL_S` (and once at start) the free space of
the data directory's filesystem is read with ``statvfs`` in the volume manager's thread pool —
never on the event loop, where a hung filesystem would stall every session — and fed to the
watch. On LOW: one warning, THIN PROVISIONING SOFT THRESHOLD REACHED (38/07) raised on every
served logical unit, the low-space metric set. On RECOVERED: one line, the metric cleared; the
next LOW raises the unit attention again. A reading that fails is logged once per failing spell
and retried at the next interval. See docs/ARCHITECTURE.md, "Space policy".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from blockyard.errors import BlockyardError
from blockyard.server.space import (
    CHECK_INTERVAL_S,
    DEFAULT_SOFT_THRESHOLD_FRACTION,
    DEFAULT_SOFT_THRESHOLD_MIN_BYTES,
    SpaceEvent,
    SpaceReading,
    SpaceWatch,
)

if TYPE_CHECKING:
    from blockyard.engine.volume import Volume
    from blockyard.scsi.lu import LogicalUnit
    from blockyard.server.backend import CapacityInfo
    from blockyard.server.metrics import ServerMetrics

log = logging.getLogger("blockyard.server.space")

#: How long stopping waits for a check in progress (its statvfs runs in the pool, bounded by
#: the manager's operation timeout; the task is cancelled, not the call).
STOP_TIMEOUT_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class SoftThreshold:
    """``--space-soft-threshold``: low when free space is below ``fraction`` of the filesystem
    or below ``min_bytes`` (capped at half the filesystem), whichever is larger. Both 0: never
    low."""

    fraction: float = DEFAULT_SOFT_THRESHOLD_FRACTION
    min_bytes: int = DEFAULT_SOFT_THRESHOLD_MIN_BYTES

    def watch(self) -> SpaceWatch:
        return SpaceWatch(threshold_fraction=self.fraction, threshold_min_bytes=self.min_bytes)

    def __str__(self) -> str:
        parts = []
        if self.fraction:
            parts.append(f"{self.fraction * 100:g}%")
        if self.min_bytes:
            parts.append(f"{self.min_bytes} bytes")
        return " or ".join(parts) or "off"


DEFAULT_SOFT_THRESHOLD: Final = SoftThreshold()


class SpaceHost(Protocol):
    """What the check needs from the volume manager."""

    data_dir: str

    async def get_capacity(self) -> CapacityInfo:
        """Free and total bytes of the data directory, read in the manager's pool."""
        ...

    def served(self) -> Sequence[tuple[Volume, LogicalUnit]]:
        """Every served volume and its logical unit (on the event loop)."""
        ...


class SpaceTask:
    """See the module docstring. :meth:`start` and :meth:`stop` run on the server's loop."""

    def __init__(
        self,
        host: SpaceHost,
        metrics: ServerMetrics,
        threshold: SoftThreshold = DEFAULT_SOFT_THRESHOLD,
        *,
        interval_s: float = CHECK_INTERVAL_S,
    ) -> None:
        self._host = host
        self._metrics = metrics
        self._threshold = threshold
        self._watch = threshold.watch()
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    @property
    def low(self) -> bool:
        return self._watch.low

    async def start(self) -> None:
        """Check once now (so the state is known when the server reports ready), then every
        interval until :meth:`stop`."""
        await self.check()
        self._task = asyncio.create_task(self._run(), name="space-check")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({task}, timeout=STOP_TIMEOUT_S)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.check()

    async def check(self) -> SpaceEvent | None:
        """Read the free space once and act on the transition it causes, if any."""
        try:
            capacity = await self._host.get_capacity()
        except (BlockyardError, OSError) as exc:
            if not self._failing:
                log.warning(
                    "cannot read the free space of %s: %s; retrying every %.0f s",
                    self._host.data_dir,
                    exc,
                    self._interval_s,
                )
            self._failing = True
            return None
        if self._failing:
            log.info("reading the free space of %s works again", self._host.data_dir)
        self._failing = False
        reading = SpaceReading(capacity.available_bytes, capacity.total_bytes)
        event = self._watch.update(reading)
        threshold_bytes = self._watch.threshold_bytes(reading.total_bytes)
        self._metrics.space_checked(reading, threshold_bytes, self._watch.low)
        if event is SpaceEvent.LOW:
            lus = [lu for _volume, lu in self._host.served()]
            for lu in lus:
                lu.notify_soft_threshold()
            log.warning(
                "data directory %s is low on space: %d of %d bytes free, below the soft "
                "threshold of %d bytes (%s); %d volumes were told (THIN PROVISIONING SOFT "
                "THRESHOLD REACHED). Writes that need new blocks fail with SPACE ALLOCATION "
                "FAILED once it runs out: free space, grow the filesystem or move volumes",
                self._host.data_dir,
                reading.free_bytes,
                reading.total_bytes,
                threshold_bytes,
                self._threshold,
                len(lus),
            )
        elif event is SpaceEvent.RECOVERED:
            log.info(
                "data directory %s has space again: %d of %d bytes free (soft threshold %d bytes)",
                self._host.data_dir,
                reading.free_bytes,
                reading.total_bytes,
                threshold_bytes,
            )
        return event
