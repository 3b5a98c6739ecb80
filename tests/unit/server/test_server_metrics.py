"""Volume server metrics and the space check, in process: the engine's WAL accounting, the
Prometheus series (events, sampled gauges, pruning, bounds), the loop sampler (never waits on
a stuck loop), the space task (soft threshold unit attention once per low spell, re-armed after
recovery) and the --space-soft-threshold syntax."""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from blockyard.cli.serve import parse_soft_threshold
from blockyard.engine import VolumeStore
from blockyard.engine.volume import Volume
from blockyard.errors import ServerStoppingError
from blockyard.replication.report import ReplicaReport
from blockyard.scsi import LogicalUnit, LuIdentity, MemoryReservationStore, StaticAlua, Status
from blockyard.scsi.constants import THIN_PROVISIONING_SOFT_THRESHOLD_REACHED
from blockyard.scsi.nexus import Nexus
from blockyard.server import metrics as metrics_mod
from blockyard.server.backend import CapacityInfo
from blockyard.server.metrics import (
    LoopSampler,
    PrometheusServerMetrics,
    ReplicaSample,
    VolumeSample,
)
from blockyard.server.space import SpaceEvent, SpaceReading
from blockyard.server.space_task import SoftThreshold, SpaceTask
from blockyard.testing.memdev import MemoryBlockDevice

MIB = 1 << 20
BLOCK = 4096
NEXUS = Nexus("iqn.2024-01.test:init,i,0x23d000000001", "iqn.2024-01.test:tgt,t,0x1", 1, 1)
P = "blockyard_server_"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def value(m: PrometheusServerMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(P + name, labels)


def report(address: str = "r1:7500", **kw: object) -> ReplicaReport:
    fields: dict[str, object] = dict(
        address=address,
        state="in_sync",
        in_sync=True,
        connected=True,
        phase="in_sync",
        plan="catch_up",
        plan_reason="",
        acked_lsn=0,
        lag_lsns=0,
        resync_total_blocks=0,
        resync_done_blocks=0,
        resync_bytes=0,
        resync_eta_s=0.0,
        last_error="",
    )
    fields.update(kw)
    return ReplicaReport(**fields)  # type: ignore[arg-type]


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Volume]:
    vol = VolumeStore(str(tmp_path / "data")).create("v", 16 * MIB, wal_size_bytes=4 * MIB)
    try:
        yield vol
    finally:
        vol.close()


# ---- engine: WAL accounting -------------------------------------------------------------------


def test_wal_usage_counts_retained_and_per_replica_bytes(volume: Volume) -> None:
    assert volume.wal_usage([0]).used_bytes == 0
    volume.track_replica("r1:7500")
    lsns = [volume.write(i * 8, bytes([i + 1]) * BLOCK) for i in range(10)]
    volume.checkpoint()
    usage = volume.wal_usage([0, lsns[3], lsns[-1]])
    # Applied, but the replica acknowledged none of them: all kept for it, none released.
    assert usage.used_bytes > 0
    assert usage.retained_bytes == usage.used_bytes
    per_record = usage.used_bytes // 10
    assert usage.used_bytes == 10 * per_record
    assert usage.bytes_after == (10 * per_record, 6 * per_record, 0)
    # Records written since the checkpoint are pending, not retained.
    volume.write(0, b"\xff" * BLOCK)
    usage = volume.wal_usage([lsns[-1]])
    assert usage.retained_bytes == 10 * per_record
    assert usage.bytes_after == (usage.used_bytes - 10 * per_record,)


def test_wal_usage_without_replicas_retains_nothing(volume: Volume) -> None:
    for i in range(4):
        volume.write(i * 8, b"\x01" * BLOCK)
    volume.checkpoint()
    usage = volume.wal_usage()
    assert (usage.used_bytes, usage.retained_bytes, usage.bytes_after) == (0, 0, ())


# ---- Prometheus: events ------------------------------------------------------------------------


def test_replication_events_become_labelled_series() -> None:
    m = PrometheusServerMetrics()
    m.replica_degraded("v", "r1:7500")
    m.replica_degraded("v", "r1:7500")
    m.replica_in_sync("v", "r1:7500")
    m.resync_sent("v", "r2:7500", 4096)
    m.resync_sent("v", "r2:7500", 8192)
    m.barrier_waited("v", 0.003)
    m.barrier_waited("v", 7.0)
    assert value(m, "replica_degrade_events_total", volume="v", replica="r1:7500") == 2
    assert value(m, "replica_in_sync_transitions_total", volume="v", replica="r1:7500") == 1
    assert value(m, "replica_resync_bytes_total", volume="v", replica="r2:7500") == 12288
    assert value(m, "barrier_latency_seconds_count", volume="v") == 2
    assert value(m, "barrier_latency_seconds_bucket", volume="v", le="0.005") == 1
    assert value(m, "barrier_latency_seconds_bucket", volume="v", le="10.0") == 2
    # Private registries: a second instance neither collides nor shares counts.
    other = PrometheusServerMetrics()
    assert value(other, "replica_degrade_events_total", volume="v", replica="r1:7500") is None


def test_space_gauges_and_low_events() -> None:
    m = PrometheusServerMetrics()
    m.space_checked(SpaceReading(50 * MIB, 100 * MIB), 10 * MIB, low=False)
    assert value(m, "data_dir_free_bytes") == 50 * MIB
    assert value(m, "data_dir_total_bytes") == 100 * MIB
    assert value(m, "data_dir_soft_threshold_bytes") == 10 * MIB
    assert value(m, "data_dir_low_space") == 0
    m.space_checked(SpaceReading(5 * MIB, 100 * MIB), 10 * MIB, low=True)
    m.space_checked(SpaceReading(4 * MIB, 100 * MIB), 10 * MIB, low=True)
    assert value(m, "data_dir_low_space") == 1
    assert value(m, "data_dir_low_space_events_total") == 1
    m.space_checked(SpaceReading(20 * MIB, 100 * MIB), 10 * MIB, low=False)
    m.space_checked(SpaceReading(5 * MIB, 100 * MIB), 10 * MIB, low=True)
    assert value(m, "data_dir_low_space_events_total") == 2


# ---- Prometheus: sampled gauges ----------------------------------------------------------------


def test_sampled_gauges_per_volume_and_replica() -> None:
    samples = [
        VolumeSample(
            "v",
            last_lsn=120,
            durable_lsn=110,
            wal_used_bytes=9000,
            wal_retained_bytes=4000,
            replicas=(
                ReplicaSample(report("r1:7500", lag_lsns=20, acked_lsn=100), lag_bytes=4608),
                ReplicaSample(
                    report(
                        "r2:7500",
                        state="out_of_sync",
                        phase="resyncing",
                        resync_total_blocks=400,
                        resync_done_blocks=100,
                    ),
                    lag_bytes=0,
                ),
            ),
        ),
        VolumeSample("w", 1, 1, 0, 0),
    ]
    m = PrometheusServerMetrics(sampler=lambda: samples)
    text = generate_latest(m.registry).decode()  # one scrape
    assert 'blockyard_server_volume_last_lsn{volume="v"} 120.0' in text
    assert value(m, "volume_durable_lsn", volume="v") == 110
    assert value(m, "volume_wal_used_bytes", volume="v") == 9000
    assert value(m, "volume_wal_retained_bytes", volume="v") == 4000
    assert value(m, "volume_last_lsn", volume="w") == 1
    assert value(m, "replica_lag_lsns", volume="v", replica="r1:7500") == 20
    assert value(m, "replica_lag_bytes", volume="v", replica="r1:7500") == 4608
    for state in metrics_mod.REPLICA_STATES:
        want = 1 if state == "out_of_sync" else 0
        assert value(m, "replica_state", volume="v", replica="r2:7500", state=state) == want
    assert value(m, "replica_phase", volume="v", replica="r2:7500", phase="resyncing") == 1
    assert value(m, "replica_phase", volume="v", replica="r2:7500", phase="in_sync") == 0
    assert value(m, "replica_resync_progress_ratio", volume="v", replica="r2:7500") == 0.25
    assert value(m, "replica_resync_progress_ratio", volume="v", replica="r1:7500") == 1.0


def test_an_unknown_state_is_exported_while_current() -> None:
    sample = VolumeSample("v", 1, 1, 0, 0, (ReplicaSample(report(state="dreaming"), 0),))
    m = PrometheusServerMetrics(sampler=lambda: [sample])
    assert value(m, "replica_state", volume="v", replica="r1:7500", state="dreaming") == 1
    assert value(m, "replica_state", volume="v", replica="r1:7500", state="in_sync") == 0


def test_no_sample_means_no_volume_gauges_and_a_counted_timeout() -> None:
    m = PrometheusServerMetrics(sampler=lambda: None)
    assert value(m, "volume_last_lsn", volume="v") is None
    assert value(m, "sample_timeouts_total") == 1
    m.sampler = None  # before the loop runs: no sample, not a timeout
    assert value(m, "sample_timeouts_total") == 1


def test_event_series_leave_with_their_volume_or_replica() -> None:
    clock = FakeClock()
    live: list[VolumeSample] = [
        VolumeSample("v", 1, 1, 0, 0, (ReplicaSample(report("r1:7500"), 0),)),
        VolumeSample("gone", 1, 1, 0, 0),
    ]
    m = PrometheusServerMetrics(sampler=lambda: live, clock=clock)
    m.replica_degraded("v", "r1:7500")
    m.replica_degraded("v", "r2:7500")  # r2 left the replica set
    m.barrier_waited("v", 0.01)
    m.barrier_waited("gone", 0.01)
    clock.now += 1
    live = [live[0]]
    m.sample()
    assert value(m, "replica_degrade_events_total", volume="v", replica="r1:7500") == 1
    assert value(m, "replica_degrade_events_total", volume="v", replica="r2:7500") is None
    assert value(m, "barrier_latency_seconds_count", volume="v") == 1
    assert value(m, "barrier_latency_seconds_count", volume="gone") is None
    # An event at or after the sample began is newer than the sample: kept.
    m.replica_in_sync("new", "r9:7500")
    m.sample()
    assert value(m, "replica_in_sync_transitions_total", volume="new", replica="r9:7500") == 1
    clock.now += 1
    m.sample()
    assert value(m, "replica_in_sync_transitions_total", volume="new", replica="r9:7500") is None


def test_event_series_are_bounded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(metrics_mod, "MAX_VOLUME_SERIES", 3)
    monkeypatch.setattr(metrics_mod, "MAX_REPLICA_SERIES", 2)
    m = PrometheusServerMetrics()
    with caplog.at_level(logging.WARNING, logger="blockyard.server.metrics"):
        for i in range(5):
            m.barrier_waited(f"v{i}", 0.01)
            m.replica_degraded("v0", f"r{i}:1")
    assert [value(m, "barrier_latency_seconds_count", volume=f"v{i}") for i in range(5)] == [
        1, 1, 1, None, None,
    ]  # fmt: skip
    got = [
        value(m, "replica_degrade_events_total", volume="v0", replica=f"r{i}:1") for i in range(5)
    ]
    assert got == [1, 1, None, None, None]
    assert len(caplog.records) == 2  # once per cap, not per refusal


def test_sampled_volumes_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_mod, "MAX_VOLUME_SERIES", 2)
    samples = [VolumeSample(f"v{i}", i, i, 0, 0) for i in (3, 1, 2)]
    m = PrometheusServerMetrics(sampler=lambda: samples)
    text = generate_latest(m.registry).decode()
    assert [n for n in ("v1", "v2", "v3") if f'volume_last_lsn{{volume="{n}"}}' in text] == [
        "v1",
        "v2",
    ]


# ---- the loop sampler --------------------------------------------------------------------------


@pytest.fixture
def loop_thread() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_loop_sampler_reads_replication_on_the_loop_and_the_wal_off_it(
    volume: Volume, loop_thread: asyncio.AbstractEventLoop
) -> None:
    volume.track_replica("r1:7500")
    lsns = [volume.write(i * 8, b"\x02" * BLOCK) for i in range(4)]
    seen: list[int] = []

    def view() -> list[tuple[Volume, list[ReplicaReport]]]:
        seen.append(threading.get_ident())
        return [(volume, [report(acked_lsn=lsns[1], lag_lsns=lsns[-1] - lsns[1])])]

    samples = LoopSampler(loop_thread, view, timeout_s=10)()
    assert samples is not None
    assert seen and seen[0] != threading.get_ident()  # the view ran on the loop's thread
    (s,) = samples
    assert (s.name, s.last_lsn) == ("v", lsns[-1])
    (r,) = s.replicas
    usage = volume.wal_usage([lsns[1]])
    assert r.lag_bytes == usage.bytes_after[0] == usage.used_bytes // 2
    assert r.report.lag_lsns == 2


def test_a_volume_lock_held_elsewhere_never_blocks_the_loop(
    volume: Volume, loop_thread: asyncio.AbstractEventLoop
) -> None:
    """A writer holding the volume's lock (e.g. across a slow append) delays the scrape, on
    the scraping thread, never the event loop."""
    volume.track_replica("r1:7500")
    volume.write(0, b"\x03" * BLOCK)
    sampler = LoopSampler(loop_thread, lambda: [(volume, [report()])], timeout_s=10)
    result: list[list[VolumeSample] | None] = []
    with volume._lock:  # the engine's writer lock, held by "another writer" (this thread)
        scraper = threading.Thread(target=lambda: result.append(sampler()))
        scraper.start()
        scraper.join(0.5)
        assert scraper.is_alive()  # waiting for the lock...
        answered = threading.Event()
        loop_thread.call_soon_threadsafe(answered.set)
        assert answered.wait(5)  # ...while the loop goes on
    scraper.join(10)
    assert result and result[0] is not None and result[0][0].replicas[0].lag_bytes > 0


def test_loop_sampler_gives_up_on_a_stuck_loop(loop_thread: asyncio.AbstractEventLoop) -> None:
    release = threading.Event()
    loop_thread.call_soon_threadsafe(release.wait, 30)  # the loop is stuck in a callback
    calls: list[int] = []

    def view() -> list[tuple[Volume, list[ReplicaReport]]]:
        calls.append(1)
        return []

    try:
        sampler = LoopSampler(loop_thread, view, timeout_s=0.2)
        assert sampler() is None
    finally:
        release.set()
    # The abandoned sample never runs later (it was cancelled before the loop got to it).
    done = threading.Event()
    loop_thread.call_soon_threadsafe(done.set)
    assert done.wait(10)
    assert calls == []


def test_loop_sampler_on_a_closed_loop_returns_none() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    assert LoopSampler(loop, list, timeout_s=1)() is None


# ---- the space task ----------------------------------------------------------------------------


class FakeHost:
    """A volume manager as the space task sees it: scripted capacities, real LUs."""

    data_dir = "/srv/blockyard"

    def __init__(self, lus: Sequence[LogicalUnit]) -> None:
        self.lus = list(lus)
        self.readings: list[CapacityInfo | Exception] = []

    def set(self, free: int, total: int = 100 * MIB) -> None:
        self.readings.append(CapacityInfo(free, total, 0, 0))

    async def get_capacity(self) -> CapacityInfo:
        reading = self.readings.pop(0)
        if isinstance(reading, Exception):
            raise reading
        return reading

    def served(self) -> list[tuple[Volume, LogicalUnit]]:
        return [(None, lu) for lu in self.lus]  # type: ignore[misc]


def make_lu() -> LogicalUnit:
    lu = LogicalUnit(
        MemoryBlockDevice(64),
        LuIdentity(uuid.uuid4()),
        StaticAlua.single(),
        MemoryReservationStore(),
        volume_name="v",
    )
    while lu.execute(NEXUS, bytes(6)).status != Status.GOOD:  # the power-on UA
        pass
    return lu


def test_space_task_raises_the_soft_threshold_once_per_low_spell(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lus = [make_lu(), make_lu()]
    host = FakeHost(lus)
    m = PrometheusServerMetrics()
    task = SpaceTask(host, m, SoftThreshold(0.10, 0))
    ua = (THIN_PROVISIONING_SOFT_THRESHOLD_REACHED,)

    async def main() -> list[SpaceEvent | None]:
        events = []
        for free in (50, 9, 5, 11, 12, 9):
            host.set(free * MIB)
            events.append(await task.check())
            if free == 9 and len(events) == 2:
                # Every LU raised 38/07 once; an initiator sees it at its next command.
                assert all(lu.pending_unit_attentions(NEXUS) == ua for lu in lus)
                assert value(m, "data_dir_low_space") == 1
                for lu in lus:
                    assert lu.execute(NEXUS, bytes(6)).status == Status.CHECK_CONDITION
            if free == 5:
                assert all(lu.pending_unit_attentions(NEXUS) == () for lu in lus)
            if free == 12:
                assert value(m, "data_dir_low_space") == 0
        return events

    with caplog.at_level(logging.INFO, logger="blockyard.server.space"):
        events = asyncio.run(main())
    low, rec = SpaceEvent.LOW, SpaceEvent.RECOVERED
    assert events == [None, low, None, None, rec, low]
    # Re-armed after recovery: raised again.
    assert all(lu.pending_unit_attentions(NEXUS) == ua for lu in lus)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "low on space" in warnings[0].getMessage()
    assert sum("has space again" in r.getMessage() for r in caplog.records) == 1
    assert value(m, "data_dir_low_space_events_total") == 2
    assert value(m, "data_dir_free_bytes") == 9 * MIB
    assert value(m, "data_dir_soft_threshold_bytes") == 10 * MIB


def test_space_task_survives_failed_readings(caplog: pytest.LogCaptureFixture) -> None:
    host = FakeHost([])
    task = SpaceTask(host, PrometheusServerMetrics(), SoftThreshold(0.10, 0))
    host.readings += [ServerStoppingError("stopping"), OSError(5, "Input/output error")]
    host.set(5 * MIB)

    async def main() -> list[SpaceEvent | None]:
        return [await task.check() for _ in range(3)]

    with caplog.at_level(logging.INFO, logger="blockyard.server.space"):
        assert asyncio.run(main()) == [None, None, SpaceEvent.LOW]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot read the free space" in t for t in messages) == 1  # once per spell
    assert sum("works again" in t for t in messages) == 1


def test_space_task_checks_at_start_and_stops() -> None:
    host = FakeHost([make_lu()])
    task = SpaceTask(host, PrometheusServerMetrics(), SoftThreshold(0.10, 0), interval_s=3600)
    host.set(1 * MIB)

    async def main() -> None:
        await task.start()
        assert task.low  # known before the server reports ready
        await task.stop()
        await task.stop()  # idempotent

    asyncio.run(main())


def test_threshold_off() -> None:
    host = FakeHost([])
    task = SpaceTask(host, PrometheusServerMetrics(), SoftThreshold(0.0, 0))
    host.set(0)
    assert asyncio.run(task.check()) is None


# ---- --space-soft-threshold --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("10%", SoftThreshold(0.10, 0)),
        ("2GiB", SoftThreshold(0.0, 2 << 30)),
        ("12.5%,256MiB", SoftThreshold(0.125, 256 * MIB)),
        ("256MiB, 5%", SoftThreshold(0.05, 256 * MIB)),
        ("0", SoftThreshold(0.0, 0)),
    ],
)
def test_parse_soft_threshold(text: str, want: SoftThreshold) -> None:
    assert parse_soft_threshold(text) == want


@pytest.mark.parametrize("text", ["100%", "-1%", "abc%", "ten", "", "5%,", "1XB"])
def test_parse_soft_threshold_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_soft_threshold(text)


def test_default_threshold_is_the_space_policy() -> None:
    # 10% or 256 MiB, capped at half the filesystem: 32 MiB of a 64 MiB filesystem.
    assert SoftThreshold().watch().threshold_bytes(64 * MIB) == 32 * MIB
    assert str(SoftThreshold()) == "10% or 268435456 bytes"
