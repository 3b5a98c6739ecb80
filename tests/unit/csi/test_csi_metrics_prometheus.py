"""The Prometheus :class:`Metrics`: per-RPC counts and latency, node hooks, and live-migration
dual-attach accounting driven by a fake clock, checked against a plain model."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from blockyard.csi import metrics as metrics_module
from blockyard.csi.metrics import (
    DUAL_ATTACH_BUCKETS_S,
    RPC_BUCKETS_S,
    Metrics,
    NoMetrics,
    PrometheusMetrics,
)

Code = grpc.StatusCode


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def value(m: PrometheusMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_rpcs_are_counted_by_service_method_and_code() -> None:
    m = PrometheusMetrics()
    m.rpc_finished("Controller", "CreateVolume", Code.OK, 0.004)
    m.rpc_finished("Controller", "CreateVolume", Code.OK, 0.2)
    m.rpc_finished("Controller", "CreateVolume", Code.ALREADY_EXISTS, 0.003)
    m.rpc_finished("Identity", "Probe", Code.OK, 0.0005)
    total = "blockyard_csi_rpc_total"
    assert value(m, total, service="Controller", method="CreateVolume", code="OK") == 2
    assert value(m, total, service="Controller", method="CreateVolume", code="ALREADY_EXISTS") == 1
    assert value(m, total, service="Identity", method="Probe", code="OK") == 1
    assert value(m, total, service="Identity", method="Probe", code="INTERNAL") is None


def test_rpc_latency_histogram_buckets_span_1ms_to_60s() -> None:
    assert RPC_BUCKETS_S[0] == 0.001 and RPC_BUCKETS_S[-1] == 60.0
    assert list(RPC_BUCKETS_S) == sorted(RPC_BUCKETS_S)
    m = PrometheusMetrics()
    for duration_s in (0.0005, 0.004, 0.2, 45.0, 90.0):
        m.rpc_finished("Node", "NodeStageVolume", Code.OK, duration_s)
    name = "blockyard_csi_rpc_duration_seconds"
    labels = {"service": "Node", "method": "NodeStageVolume"}
    assert value(m, f"{name}_count", **labels) == 5
    assert value(m, f"{name}_sum", **labels) == pytest.approx(135.2045)
    assert value(m, f"{name}_bucket", le="0.001", **labels) == 1
    assert value(m, f"{name}_bucket", le="0.005", **labels) == 2
    assert value(m, f"{name}_bucket", le="0.25", **labels) == 3
    assert value(m, f"{name}_bucket", le="30.0", **labels) == 3
    assert value(m, f"{name}_bucket", le="60.0", **labels) == 4
    assert value(m, f"{name}_bucket", le="+Inf", **labels) == 5


def test_each_instance_has_a_private_registry() -> None:
    a, b = PrometheusMetrics(), PrometheusMetrics()
    a.rpc_finished("Identity", "Probe", Code.OK, 0.001)
    assert a.registry is not b.registry
    labels = {"service": "Identity", "method": "Probe", "code": "OK"}
    assert value(a, "blockyard_csi_rpc_total", **labels) == 1
    assert value(b, "blockyard_csi_rpc_total", **labels) is None
    assert REGISTRY.get_sample_value("blockyard_csi_rpc_total", labels) is None
    shared = CollectorRegistry()
    assert PrometheusMetrics(shared).registry is shared


def test_exposition_parses_with_help_and_types() -> None:
    m = PrometheusMetrics()
    m.rpc_finished("Identity", "Probe", Code.OK, 0.001)
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())
    }
    assert families["blockyard_csi_rpc"].type == "counter"
    assert families["blockyard_csi_rpc_duration_seconds"].type == "histogram"
    assert families["blockyard_csi_dual_attached_volumes"].type == "gauge"
    assert families["blockyard_csi_dual_attach_duration_seconds"].type == "histogram"
    assert all(f.documentation for f in families.values())


def test_attachment_gauge_follows_the_node() -> None:
    m = PrometheusMetrics()
    assert value(m, "blockyard_csi_node_attached_volumes") == 0
    m.attachment_changed(3)
    assert value(m, "blockyard_csi_node_attached_volumes") == 3
    m.attachment_changed(0)
    assert value(m, "blockyard_csi_node_attached_volumes") == 0


def test_breaker_state_trips_and_removal() -> None:
    m = PrometheusMetrics()
    m.breaker_state("pv-1", False)
    assert value(m, "blockyard_csi_breaker_open", volume="pv-1") == 0
    m.breaker_tripped("pv-1")
    m.breaker_state("pv-1", True)
    assert value(m, "blockyard_csi_breaker_open", volume="pv-1") == 1
    m.breaker_state("pv-1", False)
    m.breaker_tripped("pv-1")
    assert value(m, "blockyard_csi_breaker_trips_total", volume="pv-1") == 2
    m.breaker_state("pv-2", True)
    m.breaker_removed("pv-1")
    assert value(m, "blockyard_csi_breaker_open", volume="pv-1") is None
    assert value(m, "blockyard_csi_breaker_trips_total", volume="pv-1") is None
    assert value(m, "blockyard_csi_breaker_open", volume="pv-2") == 1
    m.breaker_removed("pv-1")  # twice, and for a volume never seen: no error
    m.breaker_removed("never-seen")


def test_per_volume_series_are_capped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(metrics_module, "MAX_VOLUME_SERIES", 2)
    m = PrometheusMetrics()
    m.breaker_state("a", False)
    m.breaker_tripped("b")
    m.breaker_state("c", True)
    m.breaker_tripped("d")
    assert value(m, "blockyard_csi_breaker_open", volume="c") is None
    assert value(m, "blockyard_csi_breaker_trips_total", volume="d") is None
    assert sum("left out" in r.message for r in caplog.records) == 1, "logged once"
    m.breaker_removed("a")
    m.breaker_state("c", True)
    assert value(m, "blockyard_csi_breaker_open", volume="c") == 1


def test_dual_attach_duration_is_measured_from_second_publish_to_first_unpublish() -> None:
    clock = FakeClock()
    m = PrometheusMetrics(clock=clock)
    m.publications_changed("vm-disk", 1)
    clock.now_s += 100.0  # single-node time is not dual-attach time
    m.publications_changed("vm-disk", 2)
    assert value(m, "blockyard_csi_dual_attached_volumes") == 1
    assert value(m, "blockyard_csi_live_migrations_started_total") == 1
    clock.now_s += 20.0
    m.publications_changed("vm-disk", 2)  # a retried publish does not restart the clock
    clock.now_s += 17.5
    m.publications_changed("vm-disk", 1)
    assert value(m, "blockyard_csi_dual_attached_volumes") == 0
    assert value(m, "blockyard_csi_live_migrations_finished_total") == 1
    name = "blockyard_csi_dual_attach_duration_seconds"
    assert value(m, f"{name}_count") == 1
    assert value(m, f"{name}_sum") == pytest.approx(37.5)
    assert value(m, f"{name}_bucket", le="30.0") == 0
    assert value(m, f"{name}_bucket", le="60.0") == 1
    assert DUAL_ATTACH_BUCKETS_S[-1] == 3600.0


def test_unpublishing_both_ends_at_once_finishes_the_migration() -> None:
    clock = FakeClock()
    m = PrometheusMetrics(clock=clock)
    m.publications_changed("a", 1)
    m.publications_changed("a", 2)
    m.publications_changed("b", 1)
    m.publications_changed("b", 2)
    assert value(m, "blockyard_csi_dual_attached_volumes") == 2
    clock.now_s += 5.0
    m.publications_changed("a", 0)
    assert value(m, "blockyard_csi_dual_attached_volumes") == 1
    assert value(m, "blockyard_csi_live_migrations_finished_total") == 1
    assert value(m, "blockyard_csi_dual_attach_duration_seconds_sum") == pytest.approx(5.0)


def test_restored_dual_attach_counts_in_the_gauge_but_not_the_duration() -> None:
    clock = FakeClock()
    m = PrometheusMetrics(clock=clock)
    m.publications_restored("before-restart", 2)
    m.publications_restored("single", 1)
    assert value(m, "blockyard_csi_dual_attached_volumes") == 1
    assert value(m, "blockyard_csi_live_migrations_started_total") == 0
    clock.now_s += 30.0
    m.publications_changed("before-restart", 1)
    assert value(m, "blockyard_csi_dual_attached_volumes") == 0
    assert value(m, "blockyard_csi_live_migrations_finished_total") == 1
    assert value(m, "blockyard_csi_dual_attach_duration_seconds_count") == 0


def test_every_hook_is_a_no_op_by_default() -> None:
    class OnlyRpcs(Metrics):
        def __init__(self) -> None:
            self.seen: list[str] = []

        def rpc_finished(
            self, service: str, method: str, code: grpc.StatusCode, duration_s: float
        ) -> None:
            self.seen.append(method)

    only_rpcs = OnlyRpcs()
    for m in (NoMetrics(), only_rpcs):
        m.rpc_finished("Node", "NodeGetInfo", Code.OK, 0.001)
        assert m.attachment_changed(1) is None
        assert m.breaker_state("v", True) is None
        assert m.breaker_tripped("v") is None
        assert m.breaker_removed("v") is None
        assert m.publications_changed("v", 2) is None
        assert m.publications_restored("v", 2) is None
    assert only_rpcs.seen == ["NodeGetInfo"]


class DualAttachMachine(RuleBasedStateMachine):
    """Publish and unpublish RWX volumes one node at a time (or all at once), as the controller
    does, and compare the metrics with a plain model of who holds what since when."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.m = PrometheusMetrics(clock=self.clock)
        self.nodes: dict[str, int] = {}
        self.dual_since: dict[str, float] = {}
        self.durations: list[float] = []

    @rule(volume=st.sampled_from("abc"), step_s=st.floats(0, 1000))
    def publish(self, volume: str, step_s: float) -> None:
        self.clock.now_s += step_s
        count = self.nodes.get(volume, 0)
        if count >= 2:
            return  # the controller refuses a third node
        self.nodes[volume] = count + 1
        if count + 1 == 2:
            self.dual_since[volume] = self.clock.now_s
        self.m.publications_changed(volume, count + 1)

    @rule(volume=st.sampled_from("abc"), everywhere=st.booleans(), step_s=st.floats(0, 1000))
    def unpublish(self, volume: str, everywhere: bool, step_s: float) -> None:
        self.clock.now_s += step_s
        count = self.nodes.get(volume, 0)
        if count == 0:
            return  # nothing forgotten, nothing reported
        self.nodes[volume] = 0 if everywhere else count - 1
        if volume in self.dual_since:
            self.durations.append(self.clock.now_s - self.dual_since.pop(volume))
        self.m.publications_changed(volume, self.nodes[volume])

    @invariant()
    def metrics_match_the_model(self) -> None:
        dual = sum(1 for n in self.nodes.values() if n == 2)
        started = value(self.m, "blockyard_csi_live_migrations_started_total") or 0
        finished = value(self.m, "blockyard_csi_live_migrations_finished_total") or 0
        assert value(self.m, "blockyard_csi_dual_attached_volumes") == dual
        assert started - finished == dual
        assert finished == len(self.durations)
        count = value(self.m, "blockyard_csi_dual_attach_duration_seconds_count")
        total = value(self.m, "blockyard_csi_dual_attach_duration_seconds_sum")
        assert count == len(self.durations)
        assert total == pytest.approx(sum(self.durations))


TestDualAttachMachine = DualAttachMachine.TestCase
