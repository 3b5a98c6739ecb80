"""Kill -9 loops with real ``blockyard serve`` processes (issue 8, §4), seeded.

Each loop runs one fault per iteration while writer threads drive the primary through the
project's userspace iSCSI initiator (writes, FUA writes, SYNCHRONIZE CACHE; every completion
recorded in a :class:`~repl_helpers.VolumeModel`), and qemu-io (libiscsi) joins every third
iteration of the replica loop. After every iteration, with I/O quiesced,
:func:`~repl_helpers.settle` checks that every acknowledged write reads back on the primary
(acknowledged writes survive a kill -9 of the primary: its WAL is in the page cache) and, once
the replica is in sync, that its ChecksumVolume equals the primary's.

Faults: the replica killed mid-stream; the primary killed mid-stream (its link redials the
replica once it is back; sometimes the replica dies too while the primary is down); the replica
killed in the middle of a full rebuild of a volume with data and of a delta resync; the primary
killed in the middle of a full rebuild. Rebuilds are rate-limited (``resync_limit_bps``) so the
kill lands in their middle, and each must resume (GetReplication: a ``delta`` plan "a resync was
interrupted" owing fewer blocks than the first session), not restart.

The schedule (operation counts before each kill, rebuild fractions, write patterns) comes from
the ``seed`` fixture: BLOCKYARD_REPL_SEED replays it. BLOCKYARD_REPL_LOOP_SCALE multiplies the
iteration counts (a soak run); the default runs 50 kills in total.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable

import pytest
from repl_helpers import (
    BLOCK_BYTES,
    JOIN_TIMEOUT_S,
    VolumeModel,
    Workload,
    fill,
    fill_range,
    kill_replica,
    open_device,
    qemu_job,
    qemu_url,
    replica_report,
    require_qemu_io,
    run_qemu_io,
    settle,
    show,
    wait_report,
)

from blockyard.attach.initiator import IscsiBlockDevice
from blockyard.engine.limits import RETENTION_MAX_FRACTION, default_wal_size
from blockyard.replication.link import RESYNC_CHUNK_BLOCKS
from blockyard.replication.report import ReplicaReport
from blockyard.testing.cluster import LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

VOLUME_BYTES = 32 << 20
BLOCKS = VOLUME_BYTES // BLOCK_BYTES
#: The last blocks are qemu-io's; the initiator's writers stay below.
QEMU_BLOCKS = 256
SCALE = float(os.environ.get("BLOCKYARD_REPL_LOOP_SCALE", "1"))
#: Kills per loop (50 in all).
STREAM_REPLICA_KILLS = 15
STREAM_PRIMARY_KILLS = 12
FULL_REBUILD_REPLICA_KILLS = 8
DELTA_RESYNC_REPLICA_KILLS = 8
FULL_REBUILD_PRIMARY_KILLS = 7
#: Rebuild rate: slow enough that a kill lands mid-way, fast enough for many iterations.
REBUILD_LIMIT_BPS = 4 << 20
RESUMED_REASON = "a resync was interrupted"


def _iterations(count: int) -> int:
    return max(1, round(count * SCALE))


def _stream_volume(
    make_cluster: Callable[[int], LocalCluster], name: str, *, resync_limit_bps: int = 0
) -> tuple[LocalCluster, IscsiBlockDevice, VolumeModel]:
    cluster = make_cluster(2)
    cluster.replicate(name, VOLUME_BYTES, resync_limit_bps=resync_limit_bps)
    cluster.wait_in_sync(name)
    return cluster, open_device(cluster.servers[0], name), VolumeModel(BLOCKS)


def _workload(
    device: IscsiBlockDevice,
    model: VolumeModel,
    rng: random.Random,
    *,
    quiet: bool = False,
    pace_s: float = 0.0,
) -> Workload:
    """Two writer threads below qemu-io's blocks. ``quiet``: one block per write, paced, so a
    short outage stays within the WAL's retention (a WAL catch-up)."""
    return Workload(
        device,
        model,
        rng.randrange(1 << 32),
        block_count=BLOCKS - QEMU_BLOCKS,
        threads=2,
        extent_blocks=1 if quiet else 8,
        flush_p=rng.uniform(0.02, 0.2),
        fua_p=rng.uniform(0.0, 0.2),
        pace_s=0.05 if quiet else pace_s,
    )


class _Background:
    """Runs ``fn`` in a thread; :meth:`join` waits (bounded) and re-raises its error."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn = fn
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._fn()
        except BaseException as exc:  # re-raised by join()
            self._errors.append(exc)

    def join(self) -> None:
        self._thread.join(JOIN_TIMEOUT_S)
        assert not self._thread.is_alive(), f"background job still running after {JOIN_TIMEOUT_S} s"
        if self._errors:
            raise self._errors[0]


def test_kill_replica_mid_stream(make_cluster: Callable[[int], LocalCluster], seed: int) -> None:
    require_qemu_io()
    cluster, device, model = _stream_volume(make_cluster, "stream")
    url = qemu_url(cluster.servers[0], "stream")
    plans: list[str] = []
    with device:
        for i in range(_iterations(STREAM_REPLICA_KILLS)):
            rng = random.Random(f"{seed}:replica-stream:{i}")
            with_qemu = i % 3 == 2
            quiet = i % 3 == 1
            work = _workload(device, model, rng, quiet=quiet)
            work.start()
            qemu: _Background | None = None
            if with_qemu:
                job = qemu_job(url, rng, BLOCKS - QEMU_BLOCKS, QEMU_BLOCKS, rng.randint(20, 60))
                qemu = _Background(lambda job=job: run_qemu_io(job, model))
            ops = 20 if quiet else 200
            work.wait_ops(rng.randint(5, ops))
            kill_replica(cluster, "stream")
            # Flushes keep completing without the replica (it was marked out of sync).
            work.wait_ops(rng.randint(5, ops))
            cluster.servers[1].restart()
            work.wait_ops(rng.randint(0, ops))
            work.stop()
            if qemu is not None:
                qemu.join()
            settle(cluster, device, model, "stream")
            report = replica_report(cluster, "stream", 0, 1)
            # The replica kept its data: it never needs a full rebuild.
            assert report.plan in ("catch_up", "delta"), f"iteration {i}: {show(report)}"
            plans.append(report.plan)
    print(f"replica kills: {len(plans)}, plans: {plans}, writes {model.writes}")


def test_kill_primary_mid_stream(make_cluster: Callable[[int], LocalCluster], seed: int) -> None:
    cluster, device, model = _stream_volume(make_cluster, "pstream")
    primary, replica = cluster.servers
    with device:
        for i in range(_iterations(STREAM_PRIMARY_KILLS)):
            rng = random.Random(f"{seed}:primary-stream:{i}")
            work = _workload(device, model, rng).start()
            work.wait_ops(rng.randint(10, 300))
            primary.kill()
            # Writers finish the operation in flight (the initiator re-issues it once the
            # primary is back) and stop.
            work.stop_flag.set()
            also_replica = rng.random() < 0.3
            if also_replica:
                replica.kill()
            primary.restart()
            if also_replica:
                replica.restart()
            work.stop()
            settle(cluster, device, model, "pstream")
    print(f"primary kills: {_iterations(STREAM_PRIMARY_KILLS)}, writes {model.writes}")


def _in_progress(r: ReplicaReport) -> bool:
    """A resync of this session is under way. A new session reports its plan at once but its
    counters only once it sent something, until then the previous session's — which had
    finished (done == total) in these loops."""
    return r.connected and r.phase == "resyncing" and r.resync_done_blocks < r.resync_total_blocks


def _mid_rebuild(cluster: LocalCluster, name: str, want: int) -> ReplicaReport:
    """Wait until the resync under way confirmed ``want`` blocks (and is not finished)."""
    return wait_report(
        cluster,
        name,
        lambda r: _in_progress(r) and r.resync_done_blocks >= want,
        f"{name}: {want} blocks of the resync confirmed",
    )


def _wait_resumed(cluster: LocalCluster, name: str, first: ReplicaReport) -> None:
    """The link is back after a kill in the middle of a resync: its plan must resume it."""
    assert 0 < first.resync_done_blocks < first.resync_total_blocks, (
        f"the kill did not land in the middle of the resync: {show(first)}"
    )
    # The plan is reported before the connection counts as up (the resync counters only once
    # the new session sent something: read those after it finished).
    second = wait_report(cluster, name, lambda r: r.connected, f"{name}: link back")
    assert second.plan == "delta" and second.plan_reason == RESUMED_REASON, show(second)


def _check_resumed(cluster: LocalCluster, name: str, first: ReplicaReport) -> ReplicaReport:
    """After the replica is in sync again: the second session owed fewer blocks than the first
    (it resumed, not restarted) and delivered all of them."""
    second = replica_report(cluster, name, 0, 1)
    assert second.plan == "delta" and second.plan_reason == RESUMED_REASON, show(second)
    # Blocks that live records the retention bound released put back are sent by another pass
    # of the bitmap and join the total once: in sync, the report is complete.
    assert second.resync_done_blocks == second.resync_total_blocks, show(second)
    assert second.resync_total_blocks < first.resync_total_blocks, (
        f"the resync started over instead of resuming:\n{show(first, second)}"
    )
    return second


def _fresh_volume(
    cluster: LocalCluster, name: str, rng: random.Random
) -> tuple[IscsiBlockDevice, VolumeModel, int]:
    """A volume on the primary alone, with a dense front (4-8 MiB) and a few scattered
    extents; returns the device, the model and how many front blocks hold data."""
    cluster.servers[0].call(lambda c: c.create_volume(name, VOLUME_BYTES))
    device = open_device(cluster.servers[0], name)
    model = VolumeModel(BLOCKS)
    front = rng.randint(1024, 2048)
    scattered = [(rng.randrange(front, BLOCKS - 16), 16) for _ in range(rng.randint(0, 16))]
    fill(device, model, [(0, front), *scattered])
    return device, model, front


def _drop(cluster: LocalCluster, name: str) -> None:
    """Delete a finished iteration's volume (primary first, so its link stops)."""
    for server in cluster.servers:
        server.call(lambda c: c.delete_volume(name))


def test_kill_replica_mid_full_rebuild(
    make_cluster: Callable[[int], LocalCluster], seed: int
) -> None:
    cluster = make_cluster(2)
    for i in range(_iterations(FULL_REBUILD_REPLICA_KILLS)):
        rng = random.Random(f"{seed}:replica-full:{i}")
        name = f"full{i}"
        device, model, front = _fresh_volume(cluster, name, rng)
        with device:
            cluster.replicate(name, VOLUME_BYTES, resync_limit_bps=REBUILD_LIMIT_BPS)
            # Live writes during the rebuild (paced: the rebuild is slow on purpose).
            work = _workload(device, model, rng, pace_s=0.005).start()
            # The data sits at the front, so it is confirmed first: kill at 20-70 % of it.
            first = _mid_rebuild(cluster, name, int(front * rng.uniform(0.2, 0.7)))
            assert first.plan == "full", show(first)
            kill_replica(cluster, name)
            first = replica_report(cluster, name, 0, 1)
            cluster.servers[1].restart()
            _wait_resumed(cluster, name, first)
            work.wait_ops(rng.randint(0, 50))
            work.stop()
            settle(cluster, device, model, name)
            _check_resumed(cluster, name, first)
        _drop(cluster, name)


def test_kill_replica_mid_delta_resync(
    make_cluster: Callable[[int], LocalCluster], seed: int
) -> None:
    cluster, device, model = _stream_volume(make_cluster, "dresync", resync_limit_bps=2 << 20)
    retention_blocks = int(default_wal_size(VOLUME_BYTES) * RETENTION_MAX_FRACTION) // BLOCK_BYTES
    with device:
        # The replica holds records (an empty one would get a full rebuild, not a delta).
        fill_range(device, model, 0, 64)
        settle(cluster, device, model, "dresync")
        for i in range(_iterations(DELTA_RESYNC_REPLICA_KILLS)):
            rng = random.Random(f"{seed}:replica-delta:{i}")
            kill_replica(cluster, "dresync")
            # More than the WAL retains, in distinct blocks: the WAL is released and the
            # replica owes a delta from its missed-write bitmap.
            count = rng.randint(3 * retention_blocks, 5 * retention_blocks)
            start = rng.randrange(0, BLOCKS - QEMU_BLOCKS - count)
            fill_range(device, model, start, count)
            cluster.servers[1].restart()
            first = wait_report(cluster, "dresync", _in_progress, "delta resync under way")
            assert first.plan == "delta", show(first)
            assert first.resync_total_blocks > RESYNC_CHUNK_BLOCKS, show(first)
            # Blocks go in chunks with a pause of a chunk's worth of the rate limit after each:
            # kill right after the k-th chunk was confirmed, with more to come.
            k = rng.randint(1, (first.resync_total_blocks - 1) // RESYNC_CHUNK_BLOCKS)
            _mid_rebuild(cluster, "dresync", k * RESYNC_CHUNK_BLOCKS)
            kill_replica(cluster, "dresync")
            first = replica_report(cluster, "dresync", 0, 1)
            cluster.servers[1].restart()
            _wait_resumed(cluster, "dresync", first)
            settle(cluster, device, model, "dresync")
            second = _check_resumed(cluster, "dresync", first)
            # No write since: exactly what the first session had not confirmed is owed.
            assert (
                second.resync_total_blocks == first.resync_total_blocks - first.resync_done_blocks
            ), show(first, second)


def test_kill_primary_mid_full_rebuild(
    make_cluster: Callable[[int], LocalCluster], seed: int
) -> None:
    cluster = make_cluster(2)
    primary = cluster.servers[0]
    for i in range(_iterations(FULL_REBUILD_PRIMARY_KILLS)):
        rng = random.Random(f"{seed}:primary-full:{i}")
        name = f"pfull{i}"
        device, model, front = _fresh_volume(cluster, name, rng)
        with device:
            cluster.replicate(name, VOLUME_BYTES, resync_limit_bps=REBUILD_LIMIT_BPS)
            work = _workload(device, model, rng, pace_s=0.005).start()
            # The data sits at the front, so it is confirmed first: kill at 20-70 % of it.
            first = _mid_rebuild(cluster, name, int(front * rng.uniform(0.2, 0.7)))
            assert first.plan == "full", show(first)
            primary.kill()
            work.stop_flag.set()
            primary.restart()
            work.stop()
            _wait_resumed(cluster, name, first)
            settle(cluster, device, model, name)
            _check_resumed(cluster, name, first)
        _drop(cluster, name)
