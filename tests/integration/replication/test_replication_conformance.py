"""A replicated volume holds the BlockDevice contract and the commit point's promises, with real
``blockyard serve`` processes and the userspace initiator:

- ``check_block_device`` (the engine conformance suite) passes through the primary of a
  sync_all RF2 volume, and the replica ends with the primary's checksum after every check;
- sync_all with the replica gone: the first flush after a kill -9 of the replica completes only
  once the replica is durably marked out of sync (``replication.json`` says ``in_sync: false``,
  GetReplication ``out_of_sync``), at once (the connection reset tells the primary), and with a
  hung replica (SIGSTOP) after the barrier timeout and within a bound; flushes then continue
  without waiting for it.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import pytest
from repl_helpers import (
    BLOCK_BYTES,
    VolumeModel,
    Workload,
    freeze,
    open_device,
    replica_report,
    settle,
    show,
    thaw,
    wait_report,
)

from blockyard.attach.initiator import IscsiBlockDevice
from blockyard.blockdev import BlockDevice
from blockyard.replication.commit import BARRIER_TIMEOUT_S
from blockyard.replication.state import PRIMARY_STATE_FILE
from blockyard.testing.blockdev import CHECKS, check_block_device
from blockyard.testing.cluster import LocalCluster, ServerProc

pytestmark = pytest.mark.slow

CONFORMANCE_VOLUME_BYTES = 8 << 20
VOLUME_BYTES = 32 << 20
#: A hung replica's flush resolves after the barrier timeout, plus the tracker's tick (0.25 s)
#: and persisting the mark; the rest is slack for a shared two-core machine.
HUNG_FLUSH_MAX_S = BARRIER_TIMEOUT_S + 5.0
#: Flushes after the replica was marked out of sync no longer wait for it: each is a local
#: fdatasync, far below the barrier timeout.
DEGRADED_FLUSH_MAX_S = BARRIER_TIMEOUT_S / 2
DEGRADED_FLUSHES = 50


def test_check_block_device_through_the_primary(
    make_cluster: Callable[[int], LocalCluster],
) -> None:
    """Every conformance check gets a fresh sync_all RF2 volume; after each, the replica holds
    exactly the primary's bytes."""
    cluster = make_cluster(2)
    opened: list[str] = []
    compared: list[str] = []

    def factory() -> tuple[BlockDevice, Callable[[], None]]:
        name = f"conf{len(opened)}"
        opened.append(name)
        cluster.replicate(name, CONFORMANCE_VOLUME_BYTES)
        cluster.wait_in_sync(name)
        device = open_device(cluster.servers[0], name)

        def cleanup() -> None:
            try:
                device.flush()
                cluster.wait_in_sync(name)
                device.flush()
                primary = cluster.checksum(name, 0)
                replica = cluster.checksum(name, 1)
                assert replica == primary, f"{name}: replica {replica}, primary {primary}"
                compared.append(name)
            finally:
                device.close()

        return device, cleanup

    check_block_device(factory)
    assert len(opened) == len(CHECKS)
    assert compared == opened


def _in_sync_on_disk(server: ServerProc, name: str) -> bool:
    doc = json.loads((server.data_dir / name / PRIMARY_STATE_FILE).read_text())
    (replica,) = doc["replicas"]
    return bool(replica["in_sync"])


def _write_and_flush(device: IscsiBlockDevice, work: Workload, block: int) -> float:
    """One write, then a SYNCHRONIZE CACHE (recorded in the model), timed together: in
    sync_all the write waits for the replica's receipt and the flush for its durability, so
    either may be the one that waits out the degrade."""
    started = time.monotonic()
    work.write(block, 1, fua=False)
    covered = work.model.flush_begin()
    device.flush()
    work.model.flush_end(covered)
    return time.monotonic() - started


def _degraded_flushes(device: IscsiBlockDevice, work: Workload) -> list[float]:
    return [_write_and_flush(device, work, 100 + i) for i in range(DEGRADED_FLUSHES)]


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_sync_all_flush_waits_for_the_out_of_sync_mark(
    make_cluster: Callable[[int], LocalCluster], fault: str
) -> None:
    cluster = make_cluster(2)
    primary, replica = cluster.servers
    cluster.replicate("degrade", VOLUME_BYTES)
    cluster.wait_in_sync("degrade")
    model = VolumeModel(VOLUME_BYTES // BLOCK_BYTES)
    with open_device(primary, "degrade") as device:
        work = Workload(device, model, fault, threads=1)
        healthy = [_write_and_flush(device, work, i) for i in range(20)]
        assert _in_sync_on_disk(primary, "degrade")
        if fault == "kill":
            replica.kill()
        else:
            freeze(replica)
        try:
            # A new LSN the replica cannot have acknowledged.
            elapsed = _write_and_flush(device, work, 50)
            on_disk = _in_sync_on_disk(primary, "degrade")
            report = replica_report(cluster, "degrade", 0, 1)
            degraded = _degraded_flushes(device, work)
        finally:
            if fault == "hang":
                thaw(replica)
        assert not on_disk, "the flush completed before the replica was durably out of sync"
        assert (report.state, report.in_sync) == ("out_of_sync", False), show(report)
        if fault == "kill":
            # The connection reset tells the primary at once: no barrier timeout.
            assert elapsed < BARRIER_TIMEOUT_S, f"the flush took {elapsed:.2f} s"
        else:
            assert BARRIER_TIMEOUT_S <= elapsed < HUNG_FLUSH_MAX_S, (
                f"the flush took {elapsed:.2f} s"
            )
        assert max(degraded) < DEGRADED_FLUSH_MAX_S, (
            f"a flush after the degrade took {max(degraded):.2f} s"
        )
        print(
            f"{fault}: first flush {elapsed * 1e3:.0f} ms; flush median healthy "
            f"{statistics.median(healthy) * 1e3:.1f} ms, degraded "
            f"{statistics.median(degraded) * 1e3:.1f} ms"
        )
        if fault == "kill":
            replica.restart()
        wait_report(cluster, "degrade", lambda r: r.connected, "replica back")
        settle(cluster, device, model, "degrade")
        assert _in_sync_on_disk(primary, "degrade")
