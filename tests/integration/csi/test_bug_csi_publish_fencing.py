"""Regression: ControllerPublishVolume was bookkeeping only, so an unpublished node could keep
writing, and NodeStageVolume ignored CHAP secrets.

Now a volume the driver creates admits no initiator; ControllerPublishVolume adds the node's
initiator name (and, with controller-publish secrets, makes the target require CHAP),
ControllerUnpublishVolume removes it and ends that node's sessions only; NodeStageVolume logs
in with its node-stage secrets. Checked against a real `blockyard serve`, a real controller and
a real node plugin (userspace attach path).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from csi_helpers import MIB, RPC_TIMEOUT_S, Stack, block_cap, mount_cap, rpc_code
from csi_node_support import NodePlugin, create_volume, leftovers, scrub, unstage

from blockyard.csi.proto import csi_pb2 as pb

Code = grpc.StatusCode
Mode = pb.VolumeCapability.AccessMode
SECRETS = {
    "node.session.auth.username": "k8s-node",
    "node.session.auth.password": "node-stage-secret-1",
    "node.session.auth.username_in": "blockyard-target",
    "node.session.auth.password_in": "target-secret-22",
}


def node_initiator_name(node_id: str) -> str:
    """The initiator name the driver gives a node (blockyard.csi.initiators), spelled out."""
    return f"iqn.2024-01.io.blockyard:node.{node_id}"


#: How long a fenced node's attach daemon gets to log back in (it must not).
FENCED_WAIT_S = 5.0
LOG_WAIT_S = 30.0


def access(stack: Stack, volume: str) -> tuple[bool, tuple[str, ...], str]:
    desc = stack.serve.call(lambda c: c.get_volume(volume))
    return desc.access.restricted, desc.access.allowed_initiators, desc.access.chap_user


def publish(stack: Stack, volume: str, node: str, cap: pb.VolumeCapability,
            secrets: dict[str, str] | None = None) -> dict[str, str]:  # fmt: skip
    answer = stack.csi.controller.ControllerPublishVolume(
        pb.ControllerPublishVolumeRequest(volume_id=volume, node_id=node, volume_capability=cap,
                                          secrets=secrets or {}),
        timeout=RPC_TIMEOUT_S,
    )  # fmt: skip
    return dict(answer.publish_context)


def unpublish(stack: Stack, volume: str, node: str) -> None:
    stack.csi.controller.ControllerUnpublishVolume(
        pb.ControllerUnpublishVolumeRequest(volume_id=volume, node_id=node), timeout=RPC_TIMEOUT_S
    )


def test_publish_and_unpublish_maintain_the_volume_acl(stack: Stack) -> None:
    a, b = node_initiator_name("node-a"), node_initiator_name("node-b")
    cap = block_cap(Mode.MULTI_NODE_MULTI_WRITER)
    vid = create_volume(stack, "acl-1", cap).volume_id
    assert access(stack, vid) == (True, (), ""), "a new volume must admit nobody"

    context = publish(stack, vid, "node-a", cap, SECRETS)
    assert context["initiatorName"] == a
    assert context["iqn"] == stack.serve.call(lambda c: c.get_volume(vid)).export.iqn
    assert access(stack, vid) == (True, (a,), "k8s-node")
    desc = stack.serve.call(lambda c: c.get_volume(vid))
    assert desc.access.mutual_chap_user == "blockyard-target"
    assert publish(stack, vid, "node-a", cap, SECRETS) == context  # retry: same answer

    publish(stack, vid, "node-b", cap, SECRETS)  # RWX block: both ends of a migration
    assert access(stack, vid)[1] == tuple(sorted((a, b)))

    unpublish(stack, vid, "node-a")
    assert access(stack, vid)[1] == (b,)
    unpublish(stack, vid, "node-a")  # retry after a lost answer
    assert access(stack, vid)[1] == (b,)
    # Unpublish from every node (empty node id) fences everyone.
    stack.csi.controller.ControllerUnpublishVolume(
        pb.ControllerUnpublishVolumeRequest(volume_id=vid), timeout=RPC_TIMEOUT_S
    )
    assert access(stack, vid)[:2] == (True, ())
    # An unknown volume counts as unpublished (CSI), with nothing to fence.
    unpublish(stack, "no-such-volume", "node-a")

    bad = dict(SECRETS, **{"node.session.auth.password": "short"})
    code, details = rpc_code(
        stack.csi.controller.ControllerPublishVolume,
        pb.ControllerPublishVolumeRequest(
            volume_id=vid, node_id="node-a", volume_capability=cap, secrets=bad
        ),
    )
    assert code == Code.INVALID_ARGUMENT and "12 bytes" in details, details
    assert "short" not in details.replace("shorter", "")
    assert "node-stage-secret-1" not in stack.csi.stderr()
    assert "target-secret-22" not in stack.csi.stderr() + stack.serve.stderr()
    stack.csi.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=60)


@pytest.fixture(scope="module")
def node(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodePlugin]:
    root = tmp_path_factory.mktemp("fence")
    plugin = NodePlugin(root / "n", "node-f").start()
    try:
        yield plugin
    finally:
        if plugin.csi is not None:
            plugin.stop()
        scrub(root)
    assert not leftovers(root)


def stage(node: NodePlugin, vid: str, cap: pb.VolumeCapability, context: dict[str, str],
          secrets: dict[str, str]) -> tuple[grpc.StatusCode, str]:  # fmt: skip
    return rpc_code(
        node.node.NodeStageVolume,
        pb.NodeStageVolumeRequest(volume_id=vid, publish_context=context, secrets=secrets,
                                  staging_target_path=node.staging(vid), volume_capability=cap),
    )  # fmt: skip


def wait_for(read: Callable[[], str], text: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in read():
            return True
        time.sleep(0.1)
    return False


def test_stage_logs_in_with_the_secrets_and_unpublish_fences_the_node(
    stack: Stack, node: NodePlugin
) -> None:
    cap = mount_cap(fs_type="ext4")
    vid = create_volume(stack, "fence-1", cap, 32 * MIB).volume_id
    context = publish(stack, vid, node.node_id, cap, SECRETS)

    wrong = dict(SECRETS, **{"node.session.auth.password": "not-the-secret-9"})
    code, details = stage(node, vid, cap, context, wrong)
    assert code != Code.OK, "a login with the wrong CHAP secret succeeded"
    assert "not-the-secret-9" not in details and "not-the-secret-9" not in node.stderr()
    code, details = stage(node, vid, cap, context, {})
    assert code != Code.OK, "a login without CHAP succeeded"
    # Two failures stay below the circuit breaker's threshold (3); unstage what they left.
    node.node.NodeUnstageVolume(
        pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=node.staging(vid)),
        timeout=RPC_TIMEOUT_S,
    )
    code, details = stage(node, vid, cap, context, SECRETS)
    assert code == Code.OK, details
    for secret in ("node-stage-secret-1", "target-secret-22"):
        assert secret not in node.stderr()
        for path in node.root.rglob("*"):
            if path.is_file() and path.stat().st_size < 1 << 20:
                assert secret.encode() not in path.read_bytes(), path

    iqn = context["iqn"]
    initiator = node_initiator_name(node.node_id)
    unpublish(stack, vid, node.node_id)  # as if the node were cut off: it never unstaged
    ended = f"initiator {initiator} is no longer allowed to use {iqn}"
    assert wait_for(stack.serve.stderr, ended, LOG_WAIT_S), stack.serve.stderr()[-3000:]
    logins_before = stack.serve.stderr().count(f"iSCSI login: {initiator} -> {iqn}")
    time.sleep(FENCED_WAIT_S)  # its attach daemon keeps trying to log back in
    assert stack.serve.stderr().count(f"iSCSI login: {initiator} -> {iqn}") == logins_before

    # Published again, the node's daemon gets back in and the volume unstages cleanly.
    publish(stack, vid, node.node_id, cap, SECRETS)
    unstage(node, vid)
    unpublish(stack, vid, node.node_id)
    assert not os.path.ismount(node.staging(vid))
    stack.csi.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=60)
