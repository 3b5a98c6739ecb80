"""Volume server metrics: the :class:`ServerMetrics` seam the server reports to, a no-op default,
the Prometheus implementation, and the sampler that reads every volume's state for a scrape.

Served over plain HTTP by ``blockyard serve --metrics-listen HOST:PORT`` (the same endpoint
code and the same rule as ``blockyard csi --metrics-listen``: no TLS, any address; the series
carry volume names and replica addresses, no secrets). Exported series, all prefixed
``blockyard_server_``:

=====================================  =========  =======================  ========================
name                                   type       labels                   meaning
=====================================  =========  =======================  ========================
``volume_last_lsn``                    gauge      volume                   newest record written
``volume_durable_lsn``                 gauge      volume                   newest record on stable
                                                                           storage here
``volume_wal_used_bytes``              gauge      volume                   WAL bytes holding
                                                                           records
``volume_wal_retained_bytes``          gauge      volume                   of those, applied records
                                                                           kept only for replicas
``replica_lag_lsns``                   gauge      volume, replica          last LSN minus the
                                                                           replica's acknowledged
``replica_lag_bytes``                  gauge      volume, replica          WAL bytes of the records
                                                                           after it (see below)
``replica_state``                      gauge      volume, replica, state   1 for the current state
``replica_phase``                      gauge      volume, replica, phase   1 for the current phase
``replica_resync_progress_ratio``      gauge      volume, replica          done / total blocks
``replica_resync_bytes_total``         counter    volume, replica          block data sent by
                                                                           resyncs and rebuilds
``replica_degrade_events_total``       counter    volume, replica          marked out of sync
``replica_in_sync_transitions_total``  counter    volume, replica          marked in sync again
``barrier_latency_seconds``            histogram  volume                   a flush's wait for the
                                                                           replicas
``data_dir_free_bytes``                gauge      -                        free space (statvfs
                                                                           f_bavail)
``data_dir_total_bytes``               gauge      -                        filesystem size
``data_dir_soft_threshold_bytes``      gauge      -                        the soft threshold now
``data_dir_low_space``                 gauge      -                        1 below the soft
                                                                           threshold, until back
                                                                           above it plus the
                                                                           hysteresis
``data_dir_low_space_events_total``    counter    -                        times it went low
``sample_timeouts_total``              counter    -                        scrapes whose per-volume
                                                                           sample the event loop
                                                                           did not answer in time
=====================================  =========  =======================  ========================

- ``state`` is the commit tracker's view, the ``state`` field of GetReplication: ``in_sync``
  (counts for durability), ``joining``, ``marking`` (being marked out of sync),
  ``out_of_sync``, ``unmarkable`` (the mark cannot be persisted: flushes fail). ``phase`` is
  the link's: ``connecting``, ``catching_up``, ``resyncing``, ``in_sync``, ``disconnected``.
  Every known value is exported, 1 for the current one and 0 for the others, so
  ``replica_state{state="out_of_sync"} == 1`` is an alert rule.
- ``replica_lag_bytes`` is what the engine can count without I/O: the WAL bytes of the records
  after the replica's acknowledged LSN that the primary still holds (what a catch-up would
  ship). Records already released into the replica's missed-write bitmap are not in it; they
  come back as a resync, whose size and progress the ``resync`` series report.
- ``replica_resync_progress_ratio`` is done / total blocks of the current (or last) resync of
  the connection, 1 when it has nothing to resync.
- The gauges of volumes and replicas are read when scraped, from memory only: replication state
  on the event loop (where it lives, a few attribute reads per replica), WAL accounting on the
  scraping thread under the volume's lock. A scrape never waits on storage and never blocks
  the loop; if the loop does not answer within :data:`SAMPLE_TIMEOUT_S`, that scrape has no
  per-volume gauges (``sample_timeouts_total`` counts it). The data directory's space comes
  from the periodic space check (:mod:`blockyard.server.space_task`), never from a scrape.
- Counters and the histogram are pushed as events happen. Their series go away with their
  volume or replica (seen missing by a later scrape), and at most :data:`MAX_VOLUME_SERIES`
  volumes and :data:`MAX_REPLICA_SERIES` replicas per volume have them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from blockyard.replication.primary import ReplicationObserver
from blockyard.replication.report import ReplicaReport
from blockyard.server.space import SpaceReading

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from blockyard.engine.volume import Volume
    from blockyard.server.manager import VolumeManager

log = logging.getLogger("blockyard.server.metrics")

NAMESPACE: Final = "blockyard_server"
#: Barrier latency buckets, 0.5 ms to 25 s: a barrier to a replica on a LAN takes a round trip
#: plus its fdatasync (about a millisecond); one that times out waits BARRIER_TIMEOUT_S (5 s)
#: and the out-of-sync mark; the commit wait gives up at COMMIT_WAIT_TIMEOUT_S (25 s).
BARRIER_BUCKETS_S: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0,
)  # fmt: skip
#: Volumes that may carry event series (counters, the barrier histogram), and volumes reported
#: per scrape. Far above what one server holds; past it the rest are left out (logged once)
#: rather than letting a bug grow the scrape without bound.
MAX_VOLUME_SERIES: Final = 4096
#: Replica addresses per volume with event series (a volume has at most 2 replicas at a time;
#: the slack covers replica sets changing between scrapes).
MAX_REPLICA_SERIES: Final = 8
#: How long a scrape waits for the event loop to sample replication state.
SAMPLE_TIMEOUT_S: Final = 5.0
#: Known values of ``replica_state`` and ``replica_phase`` (a value not listed is exported too,
#: as 1, while it is current).
REPLICA_STATES: Final = ("in_sync", "joining", "marking", "out_of_sync", "unmarkable")
REPLICA_PHASES: Final = ("connecting", "catching_up", "resyncing", "in_sync", "disconnected")
#: Label value of event series that belong to the volume, not to one replica.
_VOLUME: Final = ""


class ServerMetrics(ReplicationObserver, Protocol):
    """Where the volume server reports what it does. Every method has a no-op default
    (inherited by subclasses), so any hook may be called whatever implementation was given.
    Implementations are thread-safe and never block or raise.

    Replication events come through :class:`~blockyard.replication.primary.ReplicationObserver`
    (this is one): degrade and in-sync marks, resync bytes, barrier waits. The space check
    calls :meth:`space_checked` after each reading of the data directory.
    """

    def space_checked(self, reading: SpaceReading, threshold_bytes: int, low: bool) -> None:
        """The data directory has ``reading``; ``low`` once below ``threshold_bytes`` (until
        it recovers past the hysteresis)."""
        return None


class NoServerMetrics(ServerMetrics):
    """The default :class:`ServerMetrics`: records nothing."""


@dataclass(frozen=True, slots=True)
class ReplicaSample:
    report: ReplicaReport
    lag_bytes: int


@dataclass(frozen=True, slots=True)
class VolumeSample:
    """What a scrape reports about one volume."""

    name: str
    last_lsn: int
    durable_lsn: int
    wal_used_bytes: int
    wal_retained_bytes: int
    replicas: tuple[ReplicaSample, ...] = ()


#: Runs on the event loop: every served volume with the replication reports of its replicas.
ReplicationView = Callable[[], list[tuple["Volume", list[ReplicaReport]]]]


def manager_view(manager: VolumeManager) -> ReplicationView:
    """The :data:`ReplicationView` of a running volume manager (memory only)."""

    def view() -> list[tuple[Volume, list[ReplicaReport]]]:
        primaries = manager.replication.primaries()
        out: list[tuple[Volume, list[ReplicaReport]]] = []
        for volume, _lu in manager.served():
            vr = primaries.get(volume.name)
            out.append((volume, [] if vr is None else vr.report()))
        return out

    return view


class LoopSampler:
    """Samples every volume for a scrape, from the scraping thread: the replication view runs
    on ``loop`` (it reads loop-owned state), the WAL accounting here (it takes each volume's
    lock, which the loop must not wait for). Returns None when the loop does not answer within
    ``timeout_s`` or is gone."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        view: ReplicationView,
        *,
        timeout_s: float = SAMPLE_TIMEOUT_S,
    ) -> None:
        self._loop = loop
        self._view = view
        self._timeout_s = timeout_s

    def __call__(self) -> list[VolumeSample] | None:
        fut: concurrent.futures.Future[list[tuple[Volume, list[ReplicaReport]]]]
        fut = concurrent.futures.Future()

        def run() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(self._view())
                except Exception as exc:  # noqa: BLE001 - re-raised in the scraping thread
                    fut.set_exception(exc)

        try:
            self._loop.call_soon_threadsafe(run)
        except RuntimeError:  # the loop is closed: the server is stopping
            return None
        try:
            view = fut.result(self._timeout_s)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            return None
        return [_sample(volume, reports) for volume, reports in view]


def _sample(volume: Volume, reports: list[ReplicaReport]) -> VolumeSample:
    usage = volume.wal_usage([r.acked_lsn for r in reports])
    return VolumeSample(
        name=volume.name,
        last_lsn=volume.last_lsn,
        durable_lsn=volume.durable_lsn,
        wal_used_bytes=usage.used_bytes,
        wal_retained_bytes=usage.retained_bytes,
        replicas=tuple(
            ReplicaSample(r, lag) for r, lag in zip(reports, usage.bytes_after, strict=True)
        ),
    )


Sampler = Callable[[], Sequence[VolumeSample] | None]


class PrometheusServerMetrics(ServerMetrics):
    """:class:`ServerMetrics` in a private :class:`CollectorRegistry` (never the global one).
    Thread-safe: prometheus_client's metrics lock themselves; the bookkeeping of which
    volumes and replicas have event series is under one lock.

    ``sampler`` (settable later, e.g. once the event loop runs) provides the per-volume gauges
    at each scrape; without one a scrape has the event series and the space gauges only.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        sampler: Sampler | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.sampler = sampler
        self._clock = clock
        self._lock = threading.Lock()
        #: volume -> replica (or _VOLUME) -> when its series last changed (clock).
        self._series: dict[str, dict[str, float]] = {}
        self._cap_logged: set[str] = set()
        self._was_low = False
        reg = self.registry
        replica = ["volume", "replica"]
        self._degrades = Counter(
            "replica_degrade_events",
            "Times the replica was marked out of sync (it missed a barrier or disconnected).",
            replica,
            namespace=NAMESPACE,
            registry=reg,
        )
        self._in_sync = Counter(
            "replica_in_sync_transitions",
            "Times the replica caught up and was durably marked in sync again.",
            replica,
            namespace=NAMESPACE,
            registry=reg,
        )
        self._resync_bytes = Counter(
            "replica_resync_bytes",
            "Block data sent to the replica by delta resyncs and full rebuilds (holes count "
            "nothing).",
            replica,
            namespace=NAMESPACE,
            registry=reg,
        )
        self._barrier = Histogram(
            "barrier_latency_seconds",
            "Time a flush or FUA write waited, after its local fdatasync, for the replicas the "
            "durability mode needs.",
            ["volume"],
            namespace=NAMESPACE,
            buckets=BARRIER_BUCKETS_S,
            registry=reg,
        )
        self._free = Gauge(
            "data_dir_free_bytes",
            "Free space of the data directory's filesystem (statvfs f_bavail), at the last check.",
            namespace=NAMESPACE,
            registry=reg,
        )
        self._total = Gauge(
            "data_dir_total_bytes",
            "Size of the data directory's filesystem, at the last check.",
            namespace=NAMESPACE,
            registry=reg,
        )
        self._threshold = Gauge(
            "data_dir_soft_threshold_bytes",
            "Free space below which the thin-provisioning soft threshold is reported.",
            namespace=NAMESPACE,
            registry=reg,
        )
        self._low = Gauge(
            "data_dir_low_space",
            "1 while the data directory is below its soft threshold (every LU raised THIN "
            "PROVISIONING SOFT THRESHOLD REACHED), 0 otherwise.",
            namespace=NAMESPACE,
            registry=reg,
        )
        self._low_events = Counter(
            "data_dir_low_space_events",
            "Times the data directory fell below its soft threshold.",
            namespace=NAMESPACE,
            registry=reg,
        )
        self._sample_timeouts = Counter(
            "sample_timeouts",
            "Scrapes without per-volume gauges: the event loop did not answer the sample in "
            "time, or the server was stopping.",
            namespace=NAMESPACE,
            registry=reg,
        )
        reg.register(_SampledCollector(self))

    # ---- replication events (ReplicationObserver) -----------------------------------------

    def replica_degraded(self, volume: str, replica: str) -> None:
        if self._track(volume, replica):
            self._degrades.labels(volume, replica).inc()

    def replica_in_sync(self, volume: str, replica: str) -> None:
        if self._track(volume, replica):
            self._in_sync.labels(volume, replica).inc()

    def resync_sent(self, volume: str, replica: str, data_bytes: int) -> None:
        if self._track(volume, replica):
            self._resync_bytes.labels(volume, replica).inc(max(0, data_bytes))

    def barrier_waited(self, volume: str, latency_s: float) -> None:
        if self._track(volume, _VOLUME):
            self._barrier.labels(volume).observe(max(0.0, latency_s))

    # ---- space -----------------------------------------------------------------------------

    def space_checked(self, reading: SpaceReading, threshold_bytes: int, low: bool) -> None:
        with self._lock:
            if low and not self._was_low:
                self._low_events.inc()
            self._was_low = low
        self._free.set(reading.free_bytes)
        self._total.set(reading.total_bytes)
        self._threshold.set(threshold_bytes)
        self._low.set(1 if low else 0)

    # ---- series bookkeeping ----------------------------------------------------------------

    def _track(self, volume: str, replica: str) -> bool:
        """May (volume, replica) have event series? Notes when it last had an event."""
        with self._lock:
            replicas = self._series.get(volume)
            if replicas is None:
                if len(self._series) >= MAX_VOLUME_SERIES:
                    return self._refuse("volumes", volume)
                replicas = self._series[volume] = {}
            if (
                replica not in replicas
                and replica != _VOLUME
                and sum(r != _VOLUME for r in replicas) >= MAX_REPLICA_SERIES
            ):
                return self._refuse(f"replicas of volume {volume}", replica)
            replicas[replica] = self._clock()
            return True

    def _refuse(self, what: str, name: str) -> bool:
        if what not in self._cap_logged:
            self._cap_logged.add(what)
            log.warning(
                "metrics: too many %s have series; %s and later ones are left out until "
                "some go away",
                what,
                name,
            )
        return False

    def _prune(self, samples: Sequence[VolumeSample], sampled_at: float) -> None:
        """Forget the event series of volumes and replicas a sample no longer has, unless
        they had an event since the sample began (they are newer than it)."""
        live = {s.name: {r.report.address for r in s.replicas} for s in samples}
        with self._lock:
            for volume, replicas in list(self._series.items()):
                keep = live.get(volume)
                for replica, last_s in list(replicas.items()):
                    if last_s >= sampled_at:
                        continue
                    if keep is not None and (replica == _VOLUME or replica in keep):
                        continue
                    del replicas[replica]
                    self._remove(volume, replica)
                if not replicas:
                    del self._series[volume]

    def _remove(self, volume: str, replica: str) -> None:
        families: tuple[tuple[Counter | Histogram, tuple[str, ...]], ...]
        if replica == _VOLUME:
            families = ((self._barrier, (volume,)),)
        else:
            families = tuple(
                (f, (volume, replica)) for f in (self._degrades, self._in_sync, self._resync_bytes)
            )
        for family, labels in families:
            try:
                family.remove(*labels)
            except KeyError:
                continue  # that family never had a sample for these labels

    # ---- scrape ----------------------------------------------------------------------------

    def sample(self) -> Sequence[VolumeSample] | None:
        """Per-volume state for one scrape (None: not available this time)."""
        sampler = self.sampler
        if sampler is None:
            return None
        started = self._clock()
        samples = sampler()
        if samples is None:
            self._sample_timeouts.inc()
            log.warning(
                "metrics: the event loop did not answer within %.0f s (or the server is "
                "stopping); this scrape has no per-volume gauges",
                SAMPLE_TIMEOUT_S,
            )
            return None
        samples = sorted(samples, key=lambda s: s.name)
        if len(samples) > MAX_VOLUME_SERIES:
            self._refuse("volumes", samples[MAX_VOLUME_SERIES].name)
            samples = samples[:MAX_VOLUME_SERIES]
        self._prune(samples, started)
        return samples


class _SampledCollector(Collector):
    """The gauges read at scrape time (see the module docstring)."""

    def __init__(self, metrics: PrometheusServerMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return self._families(())

    def collect(self) -> Iterable[Metric]:
        return self._families(self._metrics.sample() or ())

    @staticmethod
    def _families(samples: Sequence[VolumeSample]) -> list[Metric]:
        def family(name: str, doc: str, labels: Sequence[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{NAMESPACE}_{name}", doc, labels=labels)

        vol = ["volume"]
        rep = ["volume", "replica"]
        last = family("volume_last_lsn", "LSN of the newest record written.", vol)
        durable = family("volume_durable_lsn", "LSN of the newest record on stable storage.", vol)
        used = family("volume_wal_used_bytes", "WAL bytes holding records.", vol)
        retained = family(
            "volume_wal_retained_bytes",
            "WAL bytes of records already applied and kept only for replicas not covered yet.",
            vol,
        )
        lag = family(
            "replica_lag_lsns", "Last LSN minus the LSN the replica acknowledged durable.", rep
        )
        lag_bytes = family(
            "replica_lag_bytes",
            "WAL bytes of the records after the replica's acknowledged LSN still held here.",
            rep,
        )
        state = family(
            "replica_state",
            "1 for the replica's state in the commit tracker (in_sync counts for durability).",
            [*rep, "state"],
        )
        phase = family(
            "replica_phase",
            "1 for the phase of the primary's link to the replica.",
            [*rep, "phase"],
        )
        progress = family(
            "replica_resync_progress_ratio",
            "Blocks done / total of the connection's current or last resync (1: nothing to "
            "resync).",
            rep,
        )
        for s in samples:
            last.add_metric([s.name], s.last_lsn)
            durable.add_metric([s.name], s.durable_lsn)
            used.add_metric([s.name], s.wal_used_bytes)
            retained.add_metric([s.name], s.wal_retained_bytes)
            for r in s.replicas:
                labels = [s.name, r.report.address]
                lag.add_metric(labels, r.report.lag_lsns)
                lag_bytes.add_metric(labels, r.lag_bytes)
                _enum(state, labels, REPLICA_STATES, r.report.state)
                _enum(phase, labels, REPLICA_PHASES, r.report.phase)
                total = r.report.resync_total_blocks
                done = min(r.report.resync_done_blocks, total)
                progress.add_metric(labels, done / total if total else 1.0)
        return [last, durable, used, retained, lag, lag_bytes, state, phase, progress]


def _enum(family: GaugeMetricFamily, labels: list[str], known: Sequence[str], current: str) -> None:
    for value in known:
        family.add_metric([*labels, value], 1 if value == current else 0)
    if current not in known:
        family.add_metric([*labels, current], 1)
