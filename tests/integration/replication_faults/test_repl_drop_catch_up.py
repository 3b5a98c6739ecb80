"""The replication link drops mid-stream while a client keeps writing and flushing (sync_all,
real `blockyard serve` processes, the userspace iSCSI initiator): the replica is durably marked
out of sync, flushes go on degraded, and once the link heals the replica catches up — from the
WAL when it still holds what the replica missed, by a delta resync from the missed-write bitmap
when it does not — and ends with the primary's bytes."""

from __future__ import annotations

from fault_helpers import FLUSH_BOUND_S, Model, Rig, Writer

#: Writes made while the link is down in the catch-up case: ~0.9 MiB of WAL records, well
#: within what the primary retains for a replica (half its 4 MiB WAL).
OUTAGE_WRITES = 200
#: Bytes written while partitioned in the delta case: many times the retention bound.
PAST_RETENTION_BYTES = 24 << 20


def assert_flushes_ok(writer: Writer, rig: Rig) -> None:
    failed = [f for f in writer.flushes if f.error is not None]
    assert not failed, (failed, rig.log_tails())
    slowest = max(f.latency_s for f in writer.flushes)
    assert slowest <= FLUSH_BOUND_S, (slowest, rig.log_tails())


def test_cut_mid_stream_then_wal_catch_up(rig: Rig) -> None:
    model = Model(rig.attach())
    writer = Writer(model, blocks=2048, flush_every=8, seed=3)
    writer.start()
    try:
        writer.wait_writes(100)
        rig.proxy.refuse()
        assert rig.proxy.cut() == 1
        rep = rig.wait_out_of_sync()
        assert not rig.file_in_sync()
        print(f"cut: marked out of sync ({rep.last_error})")
        flushes_before = len(writer.flushes)
        writer.wait_writes(OUTAGE_WRITES)
        writer.pause()
        outage = writer.flushes[flushes_before:]
        assert outage, "no flush while the replica was away"
        assert all(f.error is None for f in outage), outage
        rig.proxy.refuse(False)
        rep = rig.wait_in_sync_while_writing(model)
        print(f"back in sync: {rep.plan} ({rep.plan_reason})")
        assert rep.plan == "catch_up", rep
        writer.resume()
        writer.wait_writes(50)
    finally:
        writer.finish()
    assert_flushes_ok(writer, rig)
    assert model.flush().error is None
    rig.wait_in_sync()
    model.verify()
    rig.assert_same_bytes()


def test_blackhole_mid_stream_past_the_wal_bound_then_delta_resync(rig: Rig) -> None:
    model = Model(rig.attach())
    # 64 KiB per write: the WAL fills quickly.
    writer = Writer(model, blocks=2048, flush_every=4, seed=5, burst=16)
    writer.start()
    try:
        writer.wait_writes(20)
        rig.proxy.blackhole()
        rep = rig.wait_out_of_sync()
        print(f"blackhole: marked out of sync ({rep.last_error})")
        writer.wait_writes(PAST_RETENTION_BYTES // (16 * 4096))
        rig.proxy.heal()
        rep = rig.wait_in_sync()
        print(f"back in sync: {rep.plan} ({rep.plan_reason}), {rep.resync_done_blocks} blocks")
        assert rep.plan == "delta", rep
        assert 0 < rep.resync_done_blocks <= 2048, rep
        writer.wait_writes(20)
    finally:
        writer.finish()
    assert_flushes_ok(writer, rig)
    assert model.flush().error is None
    rig.wait_in_sync()
    model.verify()
    rig.assert_same_bytes()
