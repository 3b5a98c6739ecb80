"""Metrics wiring in one process: the HTTP endpoint's start, stop and bind failure, CsiServer
serving /metrics beside its socket, RpcRunner recording failures by code, and the controller
seeding the dual-attach gauge from the publish store."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from blockyard.csi.controller import ControllerService
from blockyard.csi.errors import UnknownObjectError
from blockyard.csi.metrics import MetricsHttpServer, PrometheusMetrics
from blockyard.csi.proto import csi_pb2 as pb
from blockyard.csi.proto import csi_pb2_grpc as pb_grpc
from blockyard.csi.publish_store import Attachment, PublishStore
from blockyard.csi.rpc import RpcRunner
from blockyard.csi.server import CsiServer, StartError, build_config

HTTP_TIMEOUT_S = 10.0
TEST_TIMEOUT_S = 30.0


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def refuses_connections(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(HTTP_TIMEOUT_S)
        return probe.connect_ex(("127.0.0.1", port)) != 0


def test_http_server_serves_the_registry_and_stops() -> None:
    m = PrometheusMetrics()
    m.attachment_changed(7)
    http = MetricsHttpServer(m.registry)
    http.start("127.0.0.1", 0)
    try:
        assert http.port > 0
        assert scrape(http.port)[("blockyard_csi_node_attached_volumes", ())] == 7
    finally:
        http.stop()
    assert refuses_connections(http.port)
    http.stop()  # idempotent


def test_http_server_bind_failure_raises_oserror() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        http = MetricsHttpServer(PrometheusMetrics().registry)
        with pytest.raises(OSError, match="in use"):
            http.start("127.0.0.1", taken.getsockname()[1])


def controller_config(tmp_path: Path, metrics_listen: str) -> Any:
    return build_config(
        endpoint=f"unix://{tmp_path}/csi.sock",
        mode="controller",
        node_id="controller-0",
        backend="127.0.0.1:1",  # never reached: Identity's GetPluginInfo does not need it
        state_dir=str(tmp_path / "state"),
        kubelet_dir=None,
        managed_prefix=None,
        metrics_listen=metrics_listen,
        topology=None,
    )


def test_csi_server_serves_metrics_beside_its_socket(tmp_path: Path) -> None:
    config = controller_config(tmp_path, "127.0.0.1:0")

    async def scenario() -> tuple[str, int, dict[Any, float]]:
        server = CsiServer(config)
        await server.start()
        try:
            address = server.metrics_address
            assert address is not None and address.port > 0
            async with grpc.aio.insecure_channel(f"unix://{config.socket_path}") as channel:
                identity = pb_grpc.IdentityStub(channel)
                await identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=HTTP_TIMEOUT_S)
            samples = await asyncio.to_thread(scrape, address.port)
            return server.ready_line(), address.port, samples
        finally:
            await server.stop()

    ready, port, samples = asyncio.run(asyncio.wait_for(scenario(), TEST_TIMEOUT_S))
    assert ready.endswith(f" metrics=http://127.0.0.1:{port}/metrics")
    key = (("code", "OK"), ("method", "GetPluginInfo"), ("service", "Identity"))
    assert samples[("blockyard_csi_rpc_total", key)] == 1
    assert refuses_connections(port), "stop() closes the metrics endpoint"
    assert not config.socket_path.exists()


def test_csi_server_metrics_bind_failure_is_a_start_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = controller_config(tmp_path, f"127.0.0.1:{taken.getsockname()[1]}")
        server = CsiServer(config)
        with pytest.raises(StartError, match="--metrics-listen") as info:
            asyncio.run(asyncio.wait_for(server.start(), TEST_TIMEOUT_S))
    assert "choose a free port" in str(info.value)
    assert not config.socket_path.exists(), "the half-started plugin was stopped again"


class AbortContext:
    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise RuntimeError(f"aborted {code.name}: {details}")


def test_rpc_runner_records_failures_by_code() -> None:
    m = PrometheusMetrics()
    runner = RpcRunner("Controller", m)

    async def missing() -> None:
        raise UnknownObjectError("volume pv-x does not exist")

    async def ok() -> str:
        return "fine"

    async def scenario() -> None:
        assert await runner.run(AbortContext(), "ControllerGetVolume", "pv-y", ok) == "fine"  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="aborted NOT_FOUND"):
            await runner.run(AbortContext(), "ControllerGetVolume", "pv-x", missing)  # type: ignore[arg-type]

    asyncio.run(asyncio.wait_for(scenario(), TEST_TIMEOUT_S))
    labels = {"service": "Controller", "method": "ControllerGetVolume"}
    total = "blockyard_csi_rpc_total"
    assert m.registry.get_sample_value(total, {**labels, "code": "NOT_FOUND"}) == 1
    assert m.registry.get_sample_value(total, {**labels, "code": "OK"}) == 1
    assert m.registry.get_sample_value("blockyard_csi_rpc_duration_seconds_count", labels) == 2


def test_controller_seeds_the_dual_attach_gauge_from_the_store(tmp_path: Path) -> None:
    store = PublishStore(tmp_path)
    for node in ("node-a", "node-b"):
        store.attach("migrating", Attachment(node, False, "block", "MULTI_NODE_MULTI_WRITER"))
        store.attach("readers", Attachment(node, True, "block", "MULTI_NODE_READER_ONLY"))
    store.attach("single", Attachment("node-a", False, "block", "MULTI_NODE_MULTI_WRITER"))
    m = PrometheusMetrics()
    ControllerService(object(), store, RpcRunner("Controller", m))  # type: ignore[arg-type]
    assert m.registry.get_sample_value("blockyard_csi_dual_attached_volumes") == 1
    assert m.registry.get_sample_value("blockyard_csi_live_migrations_started_total") == 0
