"""CSI driver metrics: the :class:`Metrics` seam the services report to, a no-op default, the
Prometheus implementation and the HTTP endpoint that serves it.

Exported series (all prefixed ``blockyard_csi_``; one process is one controller or node plugin,
so the scrape target's labels say which):

==========================================  =========  =========================  ===============
name                                        type       labels                     reported by
==========================================  =========  =========================  ===============
``rpc_total``                               counter    service, method, code      every RPC
``rpc_duration_seconds``                    histogram  service, method            every RPC
``node_attached_volumes``                   gauge      -                          node service
``breaker_open``                            gauge      volume                     node service
``breaker_trips_total``                     counter    volume                     node service
``dual_attached_volumes``                   gauge      -                          controller
``live_migrations_started_total``           counter    -                          controller
``live_migrations_finished_total``          counter    -                          controller
``dual_attach_duration_seconds``            histogram  -                          controller
==========================================  =========  =========================  ===============

``code`` is the gRPC status name (``OK``, ``NOT_FOUND``, ...). ``service`` is ``Identity``,
``Controller`` or ``Node``; ``method`` is the CSI RPC name.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Final, Protocol
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("blockyard.csi.metrics")

NAMESPACE: Final = "blockyard_csi"
#: RPC latency buckets, 1 ms to 60 s: a Probe answers in about a millisecond; CreateVolume of a
#: clone and NodeStageVolume (iSCSI login, mkfs) may take tens of seconds.
RPC_BUCKETS_S: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
#: Dual-attach buckets, 1 s to 1 h: a VM live migration copies its memory while both nodes
#: hold the volume, seconds for a small VM, many minutes for a large busy one.
DUAL_ATTACH_BUCKETS_S: Final = (
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
)  # fmt: skip
#: Volumes that may carry a per-volume series (breaker state and trips). Far above what one
#: node attaches; past it new volumes are left out (and logged once) rather than letting a
#: bug grow the scrape without bound.
MAX_VOLUME_SERIES: Final = 4096
#: How long stopping the HTTP endpoint waits for its serving thread.
HTTP_STOP_TIMEOUT_S: Final = 5.0


class Metrics(Protocol):
    """Where the CSI services report what they do. Every method has a no-op default (classes
    that subclass this protocol inherit it), so a service may call any hook whatever metrics
    implementation it was given. Implementations are thread-safe and never block or raise.

    Every service (through :class:`~blockyard.csi.rpc.RpcRunner`):

    - :meth:`rpc_finished` once per RPC, with its status and duration.

    The node service:

    - :meth:`attachment_changed` with the number of volumes now staged on this node, after
      every NodeStageVolume/NodeUnstageVolume that changed it, and once at start after
      recovering what was staged before a restart;
    - :meth:`breaker_state` whenever a volume's circuit breaker opens or closes (and once when
      the breaker is created, closed);
    - :meth:`breaker_tripped` each time a breaker trips open (then also
      ``breaker_state(volume, True)``);
    - :meth:`breaker_removed` when the volume leaves the node (NodeUnstageVolume), so its
      per-volume series disappear.

    The controller service:

    - :meth:`publications_changed` after each ControllerPublishVolume or
      ControllerUnpublishVolume that changed where a volume is published;
    - :meth:`publications_restored` once per volume at start, from the durable publish store.

    Both take ``multi_writer_nodes``, how many nodes the volume is published to with
    MULTI_NODE_MULTI_WRITER: two means both ends of a VM live migration hold it.
    """

    def rpc_finished(
        self, service: str, method: str, code: grpc.StatusCode, duration_s: float
    ) -> None:
        """Called once per RPC from the event loop."""
        return None

    def attachment_changed(self, count: int) -> None:
        """``count`` volumes are staged on this node now."""
        return None

    def breaker_state(self, volume: str, open: bool) -> None:
        """The circuit breaker of ``volume`` is now open (I/O refused) or closed."""
        return None

    def breaker_tripped(self, volume: str) -> None:
        """The circuit breaker of ``volume`` tripped open once more."""
        return None

    def breaker_removed(self, volume: str) -> None:
        """``volume`` has no breaker on this node any more; forget its series."""
        return None

    def publications_changed(self, volume: str, multi_writer_nodes: int) -> None:
        """``volume`` is now published to ``multi_writer_nodes`` nodes read-write-many."""
        return None

    def publications_restored(self, volume: str, multi_writer_nodes: int) -> None:
        """At start: ``volume`` was published so before this process began."""
        return None


class NoMetrics(Metrics):
    """The default :class:`Metrics`: records nothing."""


class PrometheusMetrics(Metrics):
    """:class:`Metrics` kept in a private :class:`CollectorRegistry` (never the global one, so
    two instances in one process do not collide). Thread-safe: prometheus_client's metrics
    lock themselves, and the dual-attach and per-volume bookkeeping is under one lock.

    A live migration starts when a volume goes from one MULTI_NODE_MULTI_WRITER node to two,
    and finishes when it leaves two (one end, or both, unpublished); its dual-attach duration is
    measured between the two with ``clock``. A migration already under way when the process
    started (:meth:`publications_restored`) counts in the gauge and, when it ends, in the
    finished counter, but not in the duration histogram: its start was not seen.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._clock = clock
        self._lock = threading.Lock()
        self._dual_since: dict[str, float | None] = {}
        self._volume_series: set[str] = set()
        self._series_cap_logged = False
        reg = self.registry
        self._rpcs = Counter(
            "rpc",
            "CSI RPCs finished, by service, method and gRPC status code.",
            ["service", "method", "code"],
            namespace=NAMESPACE,
            registry=reg,
        )
        self._rpc_duration = Histogram(
            "rpc_duration_seconds",
            "Time from receiving a CSI RPC to answering it.",
            ["service", "method"],
            namespace=NAMESPACE,
            buckets=RPC_BUCKETS_S,
            registry=reg,
        )
        self._attached = Gauge(
            "node_attached_volumes",
            "Volumes staged on this node.",
            namespace=NAMESPACE,
            registry=reg,
        )
        self._breaker_open = Gauge(
            "breaker_open",
            "1 while the volume's circuit breaker is open (I/O refused), 0 while closed.",
            ["volume"],
            namespace=NAMESPACE,
            registry=reg,
        )
        self._breaker_trips = Counter(
            "breaker_trips",
            "Times the volume's circuit breaker tripped open.",
            ["volume"],
            namespace=NAMESPACE,
            registry=reg,
        )
        self._dual_attached = Gauge(
            "dual_attached_volumes",
            "Volumes published to two nodes at once (both ends of a live migration).",
            namespace=NAMESPACE,
            registry=reg,
        )
        self._migrations_started = Counter(
            "live_migrations_started",
            "Volumes that went from one MULTI_NODE_MULTI_WRITER node to two.",
            namespace=NAMESPACE,
            registry=reg,
        )
        self._migrations_finished = Counter(
            "live_migrations_finished",
            "Volumes published to two nodes that were unpublished from one (or both).",
            namespace=NAMESPACE,
            registry=reg,
        )
        self._dual_duration = Histogram(
            "dual_attach_duration_seconds",
            "Time a volume stayed published to two nodes, from the second publish to the "
            "first unpublish.",
            namespace=NAMESPACE,
            buckets=DUAL_ATTACH_BUCKETS_S,
            registry=reg,
        )

    # ---- every service ---------------------------------------------------------------------

    def rpc_finished(
        self, service: str, method: str, code: grpc.StatusCode, duration_s: float
    ) -> None:
        self._rpcs.labels(service, method, code.name).inc()
        self._rpc_duration.labels(service, method).observe(max(0.0, duration_s))

    # ---- node ------------------------------------------------------------------------------

    def attachment_changed(self, count: int) -> None:
        self._attached.set(max(0, count))

    def breaker_state(self, volume: str, open: bool) -> None:
        if self._track_volume(volume):
            self._breaker_open.labels(volume).set(1 if open else 0)

    def breaker_tripped(self, volume: str) -> None:
        if self._track_volume(volume):
            self._breaker_trips.labels(volume).inc()

    def breaker_removed(self, volume: str) -> None:
        with self._lock:
            if volume not in self._volume_series:
                return
            self._volume_series.discard(volume)
            for family in (self._breaker_open, self._breaker_trips):
                try:
                    family.remove(volume)
                except KeyError:
                    continue  # that family never had a sample for this volume

    def _track_volume(self, volume: str) -> bool:
        """May ``volume`` have per-volume series? False once :data:`MAX_VOLUME_SERIES` other
        volumes have them."""
        with self._lock:
            if volume in self._volume_series:
                return True
            if len(self._volume_series) < MAX_VOLUME_SERIES:
                self._volume_series.add(volume)
                return True
            if not self._series_cap_logged:
                self._series_cap_logged = True
                log.warning(
                    "metrics: %d volumes have breaker series already; %s and later volumes are "
                    "left out until breaker_removed() frees some",
                    MAX_VOLUME_SERIES,
                    volume,
                )
            return False

    # ---- controller ------------------------------------------------------------------------

    def publications_changed(self, volume: str, multi_writer_nodes: int) -> None:
        with self._lock:
            dual = multi_writer_nodes >= 2
            if dual and volume not in self._dual_since:
                self._dual_since[volume] = self._clock()
                self._migrations_started.inc()
            elif not dual and volume in self._dual_since:
                since = self._dual_since.pop(volume)
                self._migrations_finished.inc()
                if since is not None:
                    self._dual_duration.observe(max(0.0, self._clock() - since))
            self._dual_attached.set(len(self._dual_since))

    def publications_restored(self, volume: str, multi_writer_nodes: int) -> None:
        with self._lock:
            if multi_writer_nodes >= 2:
                self._dual_since.setdefault(volume, None)
            self._dual_attached.set(len(self._dual_since))


class MetricsHttpServer:
    """Serves a registry in the Prometheus text format over HTTP (any path; ``/metrics`` by
    convention) from prometheus_client's WSGI server on a daemon thread, one more thread per
    scrape. ``start`` then ``stop``; not restartable. Both block (bind, then thread join), so
    asyncio callers run them in a thread."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> None:
        """Bind and serve; raises :class:`OSError` when the address cannot be bound (in use,
        not local, unresolvable). Port 0 picks a free port (see :attr:`port`)."""
        assert self._httpd is None, "start() once"
        self._httpd, self._thread = start_http_server(port, addr=host, registry=self._registry)

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return int(self._httpd.server_address[1])

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent); scrapes in flight finish on their
        own threads."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        self._thread = None
        httpd.shutdown()
        httpd.server_close()
        thread.join(HTTP_STOP_TIMEOUT_S)
        if thread.is_alive():
            log.warning("metrics HTTP thread still running %.0f s after stop", HTTP_STOP_TIMEOUT_S)
