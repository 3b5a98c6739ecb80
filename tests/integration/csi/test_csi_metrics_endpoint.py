"""`blockyard csi --metrics-listen`: a real controller plugin in front of a real `blockyard
serve` answers RPCs (one failing), publishes a ReadWriteMany block volume to two nodes and
unpublishes it from one, and /metrics, scraped over HTTP and parsed as the Prometheus text
format, shows each RPC by code, the latency histogram and the live-migration dual attach."""

from __future__ import annotations

import re
import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from csi_helpers import MIB, Csi, Mode, Serve, block_cap, launch, launch_csi, rpc_code, run_csi
from prometheus_client.parser import text_string_to_metric_families

from blockyard.csi.proto import csi_pb2 as pb

Code = grpc.StatusCode
RWX = Mode.MULTI_NODE_MULTI_WRITER
HTTP_TIMEOUT_S = 10.0
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class MetricsStack:
    serve: Serve
    csi: Csi
    url: str

    def scrape(self) -> Samples:
        with urllib.request.urlopen(self.url, timeout=HTTP_TIMEOUT_S) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = response.read().decode()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


@pytest.fixture(scope="module")
def mstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetricsStack]:
    root = tmp_path_factory.mktemp("csi-metrics")
    serve = launch(root / "data", root / "logs")
    assert serve.api, serve.stderr()
    try:
        csi = launch_csi(
            root / "csi.sock",
            root / "logs",
            "--mode", "controller", "--node-id", "controller-0", "--backend", serve.api,
            "--state-dir", str(root / "state"), "--metrics-listen", "127.0.0.1:0",
        )  # fmt: skip
        try:
            found = re.search(r" metrics=(http://127\.0\.0\.1:\d+/metrics)$", csi.ready)
            assert found, f"READY line names the metrics URL: {csi.ready!r}\n{csi.stderr()}"
            yield MetricsStack(serve, csi, found.group(1))
        finally:
            assert csi.stop() == 0, csi.stderr()
    finally:
        assert serve.stop() == 0, serve.stderr()


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def rpc_count(samples: Samples, service: str, method: str, code: str) -> float | None:
    return sample(samples, "blockyard_csi_rpc_total", service=service, method=method, code=code)


def test_metrics_endpoint_counts_rpcs_and_live_migration(mstack: MetricsStack) -> None:
    ids = mstack.csi.identity
    ctl = mstack.csi.controller
    ids.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=30)
    created = ctl.CreateVolume(
        pb.CreateVolumeRequest(
            name="mv-rwx",
            capacity_range=pb.CapacityRange(required_bytes=2 * MIB),
            volume_capabilities=[block_cap(RWX)],
        ),
        timeout=60,
    )
    assert created.volume.volume_id == "mv-rwx"
    missing = pb.ControllerGetVolumeRequest(volume_id="mv-missing")
    assert rpc_code(ctl.ControllerGetVolume, missing)[0] == Code.NOT_FOUND
    assert rpc_code(ctl.CreateVolume, pb.CreateVolumeRequest())[0] == Code.INVALID_ARGUMENT

    before = mstack.scrape()
    assert sample(before, "blockyard_csi_dual_attached_volumes") == 0

    for node in ("node-src", "node-dst"):
        request = pb.ControllerPublishVolumeRequest(
            volume_id="mv-rwx", node_id=node, volume_capability=block_cap(RWX)
        )
        assert ctl.ControllerPublishVolume(request, timeout=30).publish_context["iqn"]
    during = mstack.scrape()
    assert sample(during, "blockyard_csi_dual_attached_volumes") == 1
    assert sample(during, "blockyard_csi_live_migrations_started_total") == 1
    assert sample(during, "blockyard_csi_live_migrations_finished_total") == 0

    unpublish = pb.ControllerUnpublishVolumeRequest(volume_id="mv-rwx", node_id="node-src")
    ctl.ControllerUnpublishVolume(unpublish, timeout=30)
    after = mstack.scrape()
    assert sample(after, "blockyard_csi_dual_attached_volumes") == 0
    assert sample(after, "blockyard_csi_live_migrations_finished_total") == 1
    assert sample(after, "blockyard_csi_dual_attach_duration_seconds_count") == 1
    duration_s = sample(after, "blockyard_csi_dual_attach_duration_seconds_sum")
    assert duration_s is not None and 0 < duration_s < 60

    assert rpc_count(after, "Identity", "GetPluginInfo", "OK") == 1
    assert rpc_count(after, "Controller", "CreateVolume", "OK") == 1
    assert rpc_count(after, "Controller", "CreateVolume", "INVALID_ARGUMENT") == 1
    assert rpc_count(after, "Controller", "ControllerGetVolume", "NOT_FOUND") == 1
    assert rpc_count(after, "Controller", "ControllerGetVolume", "OK") is None
    assert rpc_count(after, "Controller", "ControllerPublishVolume", "OK") == 2
    assert rpc_count(after, "Controller", "ControllerUnpublishVolume", "OK") == 1
    latency = "blockyard_csi_rpc_duration_seconds"
    publish_labels = {"service": "Controller", "method": "ControllerPublishVolume"}
    assert sample(after, f"{latency}_count", **publish_labels) == 2
    assert sample(after, f"{latency}_bucket", le="+Inf", **publish_labels) == 2
    assert sample(after, f"{latency}_bucket", le="60.0", **publish_labels) == 2
    assert sample(after, f"{latency}_count", service="Controller", method="CreateVolume") == 2

    ctl.ControllerUnpublishVolume(
        pb.ControllerUnpublishVolumeRequest(volume_id="mv-rwx", node_id="node-dst"), timeout=30
    )
    ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id="mv-rwx"), timeout=60)
    final = mstack.scrape()
    assert sample(final, "blockyard_csi_live_migrations_finished_total") == 1, "1 -> 0 is no end"
    assert rpc_count(final, "Controller", "DeleteVolume", "OK") == 1


def test_metrics_bind_failure_stops_the_plugin_with_exit_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_csi(
            tmp_path / "csi.sock",
            "--mode", "controller", "--node-id", "n0", "--backend", "127.0.0.1:1",
            "--state-dir", str(tmp_path / "state"), "--metrics-listen", f"127.0.0.1:{port}",
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port} (--metrics-listen)" in result.stderr
    assert "READY" not in result.stdout
    assert not (tmp_path / "csi.sock").exists()
