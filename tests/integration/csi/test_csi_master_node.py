"""The node side with a master-published context, real processes throughout: a 2-copy ext4
volume created through ``blockyard csi --backend master://`` is staged and published by a real
node plugin on the userspace attach path (blockyard's initiator with every copy's portal →
FUSE file → loop device → ext4); a file written and fsynced there reads back through the same
mount after kill -9 of the primary's volume server and the failover, and new writes succeed."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from csi_helpers import MIB, Stack, launch_csi
from csi_node_support import (
    NodePlugin,
    controller_publish,
    controller_unpublish,
    fs_cap,
    leftovers,
    publish,
    scrub,
    stage,
    unpublish,
    unstage,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "master"))

from test_master_process import Proc, alive_servers, cluster, get_volume, wait_for

from blockyard.csi.proto import csi_pb2 as pb

__all__ = ["cluster"]  # the fixture, imported so pytest finds it here

RPC_TIMEOUT_S = 120.0


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodePlugin]:
    plugin = NodePlugin(tmp_path / "node", "node-a").start()
    try:
        yield plugin
    finally:
        if plugin.csi is not None:
            plugin.stop()
        scrub(tmp_path / "node")
    assert not leftovers(tmp_path / "node")


def test_stage_publish_and_survive_a_failover(
    cluster: tuple[Proc, list[Proc]], node: NodePlugin, tmp_path: Path
) -> None:
    master, servers = cluster
    addr = master.fields["master"]
    wait_for("three alive servers", lambda: len(alive_servers(addr)) == 3)
    apis = alive_servers(addr)
    proc_of = {sid: next(s for s in servers if s.fields["api"] == api) for sid, api in apis.items()}
    csi = launch_csi(
        tmp_path / "csi.sock",
        tmp_path / "csi-logs",
        "--mode", "controller", "--node-id", "controller-0",
        "--backend", f"master://{addr}", "--state-dir", str(tmp_path / "csi-state"),
    )  # fmt: skip
    assert csi.ready, csi.stderr()
    stack = Stack(serve=None, csi=csi, root=tmp_path)  # type: ignore[arg-type]
    try:
        cap = fs_cap("ext4")
        volume = csi.controller.CreateVolume(
            pb.CreateVolumeRequest(
                name="pvc-fs",
                capacity_range=pb.CapacityRange(required_bytes=64 * MIB),
                volume_capabilities=[cap],
                parameters={"replicas": "2", "durability": "sync_all"},
            ),
            timeout=RPC_TIMEOUT_S,
        ).volume
        vid = volume.volume_id
        wait_for("the volume active", lambda: get_volume(addr, vid).status == "active")
        primary = get_volume(addr, vid).primary_server_id

        ctx = controller_publish(stack, vid, node, cap)
        assert len(ctx["portals"].split(",")) == 2
        stage(node, volume, cap, ctx)
        target = publish(node, vid, cap)
        payload = os.urandom(256 * 1024)
        path = os.path.join(target, "before.bin")
        with open(path, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())

        proc_of[primary].stop(signal.SIGKILL)
        wait_for("the replica promoted (epoch 2)", lambda: get_volume(addr, vid).epoch == 2)
        # Through the same mount: the initiator moved to the new primary's portal.
        after = os.path.join(target, "after.bin")
        with open(after, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        # Read the first file from the device again, not from the page cache.
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            assert f.read() == payload

        unpublish(node, vid, target)
        unstage(node, vid)
        controller_unpublish(stack, vid, node)
        assert not leftovers(node.root)
    finally:
        assert csi.stop() == 0, csi.stderr()
