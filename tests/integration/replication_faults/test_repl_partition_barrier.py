"""A partition between a sync_all primary and its replica during a flush (SYNCHRONIZE CACHE)
with real `blockyard serve` processes and the userspace iSCSI initiator.

The rule under test (replication/commit.py, degrade_or_fail): the flush either succeeds with the
replica durable, or the replica is durably marked out of sync *before* the flush is
acknowledged, or the flush fails — never an acknowledgement the replica does not hold. The
flush is bounded by the barrier timeout plus a few seconds. After the partition heals the
replica catches up and holds the primary's bytes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from fault_helpers import (
    FLUSH_BOUND_S,
    FlushResult,
    Model,
    Rig,
    assert_degraded_before_ack,
    describe,
    watch_state,
)

from blockyard.testing.faultproxy import Direction, FaultProxy

PARTITIONS: dict[str, Callable[[FaultProxy], None]] = {
    "blackhole-both-ways": lambda p: p.blackhole(),
    "blackhole-to-replica": lambda p: p.blackhole(Direction.TO_TARGET),
    "blackhole-to-primary": lambda p: p.blackhole(Direction.TO_CLIENT),
    "hold-both-ways": lambda p: p.hold(),
}


def flush_timed(model: Model) -> tuple[FlushResult, int]:
    result = model.flush()
    return result, time.time_ns()


def heal_and_converge(rig: Rig, model: Model) -> None:
    rig.proxy.heal()
    # The volume stays live while the replica catches up: one write every half second (an
    # idle volume is test_bug_idle_replica_never_back_in_sync.py).
    rig.wait_in_sync_while_writing(model)
    final = model.flush()
    assert final.error is None, final.error
    model.verify()
    rig.assert_same_bytes()


@pytest.mark.parametrize("partition", sorted(PARTITIONS))
def test_partition_before_the_barrier(rig: Rig, partition: str) -> None:
    dev = rig.attach()
    model = Model(dev)
    model.write_range(range(0, 64))
    baseline = model.flush()
    assert baseline.error is None, baseline.error
    baseline_lsn = rig.info().last_lsn
    # The replica made it durable before the flush was acknowledged (its own durable LSN; the
    # replica keeps the primary's LSNs).
    assert rig.replica_info().durable_lsn >= baseline_lsn
    assert rig.report().state == "in_sync" and rig.file_in_sync()

    model.write_range(range(64, 96))  # written, not flushed, then the partition
    PARTITIONS[partition](rig.proxy)
    # One more write after the partition: its record can neither reach the replica nor be
    # acknowledged, whatever the direction cut, so the flush below needs a barrier that
    # cannot complete.
    model.write(200)
    flushed_lsn = rig.info().last_lsn
    with watch_state(rig) as evidence:
        result, returned_ns = flush_timed(model)
        mark = evidence()
    print(f"{partition}: {describe(result, mark)}")
    assert_degraded_before_ack(rig, result, flushed_lsn, returned_ns, mark)
    assert result.error is None, f"the mark could be persisted, so the flush must degrade: {result}"
    heal_and_converge(rig, model)


def test_partition_while_the_barrier_ack_is_in_flight(rig: Rig) -> None:
    """The replica made the flush durable and acknowledged it, and the acknowledgement is lost
    in the partition: the primary cannot know, so it must still mark before it acknowledges."""
    dev = rig.attach()
    model = Model(dev)
    model.write_range(range(0, 32))
    assert model.flush().error is None
    # Everything from the replica arrives 3 s late: time to see the replica durable and cut the
    # link while its acknowledgement is still on the way.
    rig.proxy.set_delay(3.0, Direction.TO_CLIENT)
    model.write_range(range(32, 64))
    flushed_lsn = rig.info().last_lsn
    box: list[tuple[FlushResult, int]] = []
    with watch_state(rig) as evidence:
        flusher = threading.Thread(target=lambda: box.append(flush_timed(model)))
        flusher.start()
        deadline = time.monotonic() + 2.5
        while rig.replica_info().durable_lsn < flushed_lsn:
            assert time.monotonic() < deadline, "the barrier did not reach the replica in 2.5 s"
            time.sleep(0.01)
        rig.proxy.blackhole()
        assert not box, "the flush returned before the replica's acknowledgement could arrive"
        flusher.join(FLUSH_BOUND_S + 10)
        assert box, "the flush did not return"
        result, returned_ns = box[0]
        mark = evidence()
    assert rig.proxy.stats().dropped_to_client_bytes > 0, "no acknowledgement was lost"
    print(f"ack lost in flight: {describe(result, mark)}")
    assert_degraded_before_ack(rig, result, flushed_lsn, returned_ns, mark)
    assert result.error is None, result.error
    rig.proxy.set_delay(0.0)
    heal_and_converge(rig, model)
