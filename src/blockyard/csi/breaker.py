"""A per-volume circuit breaker for NodeStageVolume, kept on disk.

rds-csi's lesson: a volume whose attach keeps failing (an unreachable portal, a damaged file
system) must not be retried in a tight loop by kubelet, piling up sessions, daemons and log
noise. After :data:`FAILURE_THRESHOLD` consecutive failures the breaker opens for
:data:`OPEN_DURATION_S`: NodeStageVolume then answers UNAVAILABLE at once, saying so. When the
time is up one attempt goes through (half-open): success closes the breaker, failure opens it
again. Failures that are the caller's fault (INVALID_ARGUMENT) do not count.

State: ``DIR/<volume>.json`` (failures, when it opened, the last error), wall-clock times so
the breaker survives a plugin restart.

Reset, by hand, once the cause is fixed::

    touch DIR/<volume>.reset      # one volume
    touch DIR/reset               # every volume

(DIR is ``<node state dir>/breaker``, by default ``/run/blockyard/csi-node/breaker``.) The
plugin notices the file on the volume's next NodeStageVolume, closes the breaker(s) and
removes the file.

Not thread-safe by itself: the node service calls it under the volume's operation lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from blockyard.csi.node_errors import BreakerOpenError
from blockyard.fileutil import atomic_write

log = logging.getLogger("blockyard.csi.breaker")

#: rds-csi: three consecutive failures open the breaker ...
FAILURE_THRESHOLD: Final = 3
#: ... for five minutes.
OPEN_DURATION_S: Final = 300.0
RESET_ALL_FILE: Final = "reset"
RESET_SUFFIX: Final = ".reset"
STATE_FILE_MAX_BYTES: Final = 64 << 10
LAST_ERROR_MAX_CHARS: Final = 500


@dataclass(frozen=True, slots=True)
class BreakerState:
    failures: int = 0
    opened_at: float | None = None
    last_error: str = ""


class CircuitBreakers:
    def __init__(
        self,
        directory: Path,
        *,
        threshold: int = FAILURE_THRESHOLD,
        open_s: float = OPEN_DURATION_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.threshold = threshold
        self.open_s = open_s
        self._clock = clock
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, volume_id: str) -> Path:
        return self.directory / f"{volume_id}.json"

    def state(self, volume_id: str) -> BreakerState:
        self._apply_resets(volume_id)
        try:
            with self._path(volume_id).open("rb") as f:
                raw = json.loads(f.read(STATE_FILE_MAX_BYTES))
            opened = raw.get("opened_at")
            return BreakerState(
                failures=int(raw["failures"]),
                opened_at=None if opened is None else float(opened),
                last_error=str(raw.get("last_error", "")),
            )
        except FileNotFoundError:
            return BreakerState()
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("breaker state of %s is damaged (%s); starting closed", volume_id, exc)
            return BreakerState()

    def check(self, volume_id: str) -> None:
        """Raise :class:`BreakerOpenError` while the volume's breaker is open."""
        st = self.state(volume_id)
        if st.opened_at is None:
            return
        left_s = st.opened_at + self.open_s - self._clock()
        if left_s <= 0:
            log.info("breaker of %s half-open: letting one attempt through", volume_id)
            return
        raise BreakerOpenError(
            f"circuit breaker open for volume {volume_id}: {st.failures} consecutive "
            f"NodeStageVolume failures, last: {st.last_error}. Not retrying for another "
            f"{left_s:.0f} s. Fix the cause, then reset it with "
            f"`touch {self.directory / (volume_id + RESET_SUFFIX)}`"
        )

    def record_failure(self, volume_id: str, error: str) -> BreakerState:
        st = self.state(volume_id)
        failures = st.failures + 1
        opened_at = st.opened_at
        if failures >= self.threshold:
            opened_at = self._clock()
            log.warning(
                "breaker of %s opened for %.0f s after %d failures",
                volume_id,
                self.open_s,
                failures,
            )
        new = BreakerState(failures, opened_at, error[:LAST_ERROR_MAX_CHARS])
        self._write(volume_id, new)
        return new

    def record_success(self, volume_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(volume_id).unlink()

    def reset(self, volume_id: str) -> None:
        self.record_success(volume_id)

    def _apply_resets(self, volume_id: str) -> None:
        one = self.directory / f"{volume_id}{RESET_SUFFIX}"
        every = self.directory / RESET_ALL_FILE
        if one.exists():
            log.info("breaker of %s reset by %s", volume_id, one)
            self.reset(volume_id)
            one.unlink(missing_ok=True)
        if every.exists():
            log.info("every breaker reset by %s", every)
            for path in self.directory.glob("*.json"):
                path.unlink(missing_ok=True)
            every.unlink(missing_ok=True)

    def _write(self, volume_id: str, st: BreakerState) -> None:
        data = json.dumps(
            {"failures": st.failures, "opened_at": st.opened_at, "last_error": st.last_error}
        )
        atomic_write(str(self._path(volume_id)), data.encode(), mode=0o644)
