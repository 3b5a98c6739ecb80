"""The node plugin's /metrics: the staged-volume gauge follows NodeStage/NodeUnstage, and the
per-volume circuit breaker's trips and state are exported."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from csi_helpers import MIB, Stack
from csi_node_support import (
    NodePlugin,
    controller_publish,
    controller_unpublish,
    create_volume,
    fs_cap,
    leftovers,
    scrub,
    stage,
    unstage,
)
from prometheus_client.parser import text_string_to_metric_families

from blockyard.csi.proto import csi_pb2 as pb

HTTP_TIMEOUT_S = 10.0


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def node(stack: Stack, tmp_path: Path) -> Iterator[tuple[NodePlugin, str]]:
    plugin = NodePlugin(tmp_path / "n", "node-m", ("--metrics-listen", "127.0.0.1:0")).start()
    assert plugin.csi is not None
    found = re.search(r" metrics=(http://127\.0\.0\.1:\d+/metrics)$", plugin.csi.ready)
    assert found, plugin.csi.ready
    try:
        yield plugin, found.group(1)
    finally:
        if plugin.csi is not None:
            plugin.stop()
        scrub(tmp_path / "n")
    assert not leftovers(tmp_path / "n")


def test_staged_gauge_and_breaker_metrics(stack: Stack, node: tuple[NodePlugin, str]) -> None:
    plugin, url = node
    gauge = ("blockyard_csi_node_attached_volumes", frozenset())
    assert scrape(url)[gauge] == 0

    cap = fs_cap("ext4")
    volume = create_volume(stack, "metrics-vol", cap, size=32 * MIB)
    context = controller_publish(stack, volume.volume_id, plugin, cap)
    stage(plugin, volume, cap, context)
    assert scrape(url)[gauge] == 1
    unstage(plugin, volume.volume_id)
    assert scrape(url)[gauge] == 0
    controller_unpublish(stack, volume.volume_id, plugin)

    # Three failing stages against a portal nobody listens on trip the breaker.
    bad = {**context, "portal": "127.0.0.1:9", "portals": "127.0.0.1:9"}
    for _ in range(3):
        with pytest.raises(grpc.RpcError):
            stage(plugin, "broken-vol", cap, bad)
    samples = scrape(url)
    labels = frozenset({("volume", "broken-vol")})
    assert samples[("blockyard_csi_breaker_trips_total", labels)] == 1
    assert samples[("blockyard_csi_breaker_open", labels)] == 1
    plugin.node.NodeUnstageVolume(
        pb.NodeUnstageVolumeRequest(
            volume_id="broken-vol", staging_target_path=plugin.staging("broken-vol")
        ),
        timeout=60,
    )
