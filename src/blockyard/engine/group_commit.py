"""Durability barriers of a volume: ``flush()`` and group commit (a mixin of
:class:`~blockyard.engine.volume.Volume`).

Concurrent flushes share one ``fdatasync``: the first caller without a sync in flight leads one
that covers everyone who arrived before it started; the rest wait for it. When the previous sync
was shared, the leader first waits (up to about one sync's duration, capped) for as many
siblings as joined last time — the commit_delay / commit_siblings idea from database group
commit. A lone flusher never waits.

Lock: ``_sync_cv`` (a condition over its own lock), taken after ``_apply_lock`` and ``_lock``
when more than one is held.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from blockyard.engine.limits import GROUP_COMMIT_DELAY_MAX_S
from blockyard.errors import FlushTimeoutError

if TYPE_CHECKING:
    from blockyard.engine.volume import VolumeStats
    from blockyard.errors import VolumeFailedError


class GroupCommit:
    """``flush()`` and the shared ``fdatasync``; uses the volume's state (declared below)."""

    if TYPE_CHECKING:
        _sync_cv: threading.Condition
        _sync_running: bool
        _sync_waiters: int
        _sync_shared: bool
        _sync_delaying: bool
        _last_joined: int
        _last_sync_s: float
        _synced_seq: int
        _write_seq: int
        _last_lsn: int
        _durable_lsn: int
        _flush_timeout_s: float
        _name: str
        _offline: VolumeFailedError | None
        stats: VolumeStats

        def _check_usable(self) -> None: ...
        def _sync_file(self) -> None: ...

    def flush(self, timeout_s: float | None = None) -> None:
        """Durability barrier (SYNCHRONIZE CACHE). Concurrent callers share one fdatasync."""
        self._check_usable()
        with self._sync_cv:
            self.stats.flush_calls += 1
        self._sync_until(self._write_seq, timeout_s)

    def _sync_until(self, target: int, timeout_s: float | None = None) -> None:
        """Group commit: the first caller without a sync in flight leads one fdatasync that
        covers everyone who arrived before it started; the rest wait for it.

        When the previous sync was shared (other flushers are active), the leader first waits
        until as many siblings as last time have joined, for at most two syncs' duration
        (capped) — the commit_delay / commit_siblings idea from database group commit. A lone
        flusher never waits.
        """
        timeout = self._flush_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        cv = self._sync_cv
        with cv:
            self._sync_waiters += 1
            if self._sync_delaying:
                cv.notify_all()  # a leader gathering siblings counts arrivals
            try:
                while self._synced_seq < target:
                    if self._offline is not None:
                        self._check_usable()
                    if not self._sync_running:
                        self._lead_sync(cv)
                        continue
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise FlushTimeoutError(
                            f"volume {self._name!r}: flush did not complete within {timeout} s; "
                            "the data directory's device is stalled"
                        )
                    cv.wait(remaining)
            finally:
                self._sync_waiters -= 1

    def _lead_sync(self, cv: threading.Condition) -> None:
        """Run one shared fdatasync. Caller holds ``cv`` and found no sync in flight."""
        self._sync_running = True
        if self._sync_shared:
            # Gather as many siblings as joined last time, for at most about two syncs' time.
            deadline = time.monotonic() + min(2 * self._last_sync_s, GROUP_COMMIT_DELAY_MAX_S)
            self._sync_delaying = True
            while self._sync_waiters - 1 < self._last_joined:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                cv.wait(remaining)
            self._sync_delaying = False
        seq, lsn = self._write_seq, self._last_lsn
        joined = self._sync_waiters - 1
        cv.release()
        synced = False
        started = time.monotonic()
        try:
            self._sync_file()
            synced = True
        finally:
            cv.acquire()
            self._sync_running = False
            if synced:
                self._last_sync_s = time.monotonic() - started
                self._sync_shared = joined > 0 or self._sync_waiters > 1
                self._last_joined = joined
                self.stats.flush_syncs += 1
                self._note_synced(seq, lsn)
            cv.notify_all()

    def _note_synced(self, seq: int, lsn: int) -> None:
        """Record that everything written up to (seq, lsn) is durable. Caller holds _sync_cv."""
        self._synced_seq = max(self._synced_seq, seq)
        self._durable_lsn = max(self._durable_lsn, lsn)

    def _tracked_fdatasync(self) -> None:
        """An fdatasync outside the group-commit path that still advances what is durable."""
        seq, lsn = self._write_seq, self._last_lsn
        self._sync_file()
        self.stats.checkpoint_syncs += 1
        with self._sync_cv:
            self._note_synced(seq, lsn)
            self._sync_cv.notify_all()
