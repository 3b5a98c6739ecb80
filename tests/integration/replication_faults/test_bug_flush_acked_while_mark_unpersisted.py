"""A flush was acknowledged while a partitioned replica still counted as in sync on disk.

When a replica stops answering, the primary must persist that it is out of sync before any
flush may be acknowledged without it; if the mark cannot be persisted, flushes fail
(replication/commit.py, degrade_or_fail). The first flush did fail with MEDIUM ERROR, but the
replica then sat in the tracker's ``unmarkable`` state, and ``CommitTracker.request`` builds a
new waiter's replica set from the counted (in sync, joining) and ``marking`` replicas only —
not ``unmarkable`` ones. So the *second* flush waited for nobody and was acknowledged at once,
while replication.json still said the replica is in sync and the replica lacked the write: a
copy that may later be promoted did not hold an acknowledged write.

The primary's volume directory is made immutable (``chattr +i``) so that replication.json cannot
be replaced, and the replication link is blackholed by the fault proxy."""

from __future__ import annotations

import subprocess
import time

from fault_helpers import FLUSH_BOUND_S, VOLUME, Model, Rig, assert_degraded_before_ack, watch_state

from blockyard.attach.initiator import ScsiStatusError
from blockyard.replication.primary import MARK_RETRY_S
from blockyard.scsi.sense import SenseKey

#: The mark is retried every MARK_RETRY_S; generous for a loaded machine.
MARK_RETRY_BOUND_S = MARK_RETRY_S + 10.0


def test_every_flush_fails_while_the_out_of_sync_mark_cannot_be_persisted(rig: Rig) -> None:
    volume_dir = rig.primary.data_dir / VOLUME
    model = Model(rig.attach())
    model.write_range(range(0, 32))
    assert model.flush().error is None
    subprocess.run(["chattr", "+i", str(volume_dir)], check=True)
    try:
        rig.proxy.blackhole()
        # The write cannot reach the replica, and the replica cannot be marked out of sync:
        # in sync_all the write itself fails (it waited for a receipt that cannot come), as
        # does every flush after it.
        write = model.write_timed(100)
        flushed_lsn = rig.info().last_lsn
        assert isinstance(write.error, ScsiStatusError), write
        assert write.error.sense_key == SenseKey.MEDIUM_ERROR, write.error
        assert write.latency_s <= FLUSH_BOUND_S, write
        results = [model.flush() for _ in range(3)]
        print("flushes while unmarkable:", [(round(r.latency_s, 3), r.error) for r in results])
        assert rig.file_in_sync(), "replication.json changed in an immutable directory"
        rep = rig.report()
        assert rep.acked_lsn < flushed_lsn, rep
        for i, result in enumerate(results):
            assert isinstance(result.error, ScsiStatusError), (
                f"flush {i + 1} of LSN {flushed_lsn} was acknowledged while the replica still "
                f"counts as in sync on disk and never received the write: {result}, {rep}"
            )
            assert result.error.sense_key == SenseKey.MEDIUM_ERROR, result.error
            assert result.latency_s <= FLUSH_BOUND_S, result
    finally:
        subprocess.run(["chattr", "-i", str(volume_dir)], check=True)
    # Writable again: the mark is retried (every second) and goes through; then flushes
    # degrade.
    rig.wait_out_of_sync(timeout_s=MARK_RETRY_BOUND_S)
    assert not rig.file_in_sync()
    with watch_state(rig) as evidence:
        result = model.flush()
        returned_ns = time.time_ns()
        mark = evidence()
    assert_degraded_before_ack(rig, result, flushed_lsn, returned_ns, mark)
    assert result.error is None, result.error
    rig.proxy.heal()
    rig.wait_in_sync_while_writing(model)
    assert model.flush().error is None
    model.verify()
    rig.assert_same_bytes()
