"""sw-block refused the None → Rebuilding transition, so a copy placed on a fresh server could
never start its rebuild. A pending copy (no role yet) must go to rebuilding when its server
takes the assignment or its primary starts filling it."""

from __future__ import annotations

from master_harness import Harness, primary_report, replica_report, volume_record

from blockyard.engine.epoch import Role
from blockyard.master.model import CopyState, VolumeStatus, check_copy_transition


def test_pending_copy_becomes_rebuilding_from_its_own_report() -> None:
    h = Harness.make(("s1", "s2"), (volume_record(replica_state=CopyState.PENDING),))
    h.heartbeat("s2", (replica_report(h.volume(), role=Role.REBUILDING),))
    copy = h.volume().copy_on("s2")
    assert copy is not None and copy.state is CopyState.REBUILDING
    assert h.volume().status is VolumeStatus.DEGRADED


def test_pending_copy_becomes_rebuilding_from_the_primary() -> None:
    h = Harness.make(("s1", "s2"), (volume_record(replica_state=CopyState.PENDING),))
    rec = h.volume()
    h.heartbeat("s1", (primary_report(rec, replicas_in_sync=False, phase="resyncing"),))
    assert h.volume().copy_on("s2").state is CopyState.REBUILDING  # type: ignore[union-attr]
    h.heartbeat("s1", (primary_report(rec, replicas_in_sync=True),))
    assert h.volume().copy_on("s2").state is CopyState.IN_SYNC  # type: ignore[union-attr]
    assert h.volume().status is VolumeStatus.ACTIVE


def test_transition_table_allows_it() -> None:
    check_copy_transition("v", "s2", CopyState.PENDING, CopyState.REBUILDING)
