"""Helpers for the CSI Node tests: node plugins (`blockyard csi --mode node`) with their own
node id, kubelet dir, attach state dir and node state dir, plus the kubelet/sidecar calls and a
finalizer that removes every mount, loop device and attach daemon a test left under its root."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from csi_helpers import MIB, Csi, Stack, launch_csi

from blockyard.attach import manager
from blockyard.attach.state import same_process
from blockyard.csi.proto import csi_pb2 as pb
from blockyard.csi.proto import csi_pb2_grpc as pb_grpc

PREFIX = "iqn.2026-11.io.blockyard"
RPC_TIMEOUT_S = 120.0
Mode = pb.VolumeCapability.AccessMode


@dataclass
class NodePlugin:
    """One node: its directories and (while running) its plugin process."""

    root: Path
    node_id: str
    extra: tuple[str, ...] = ()
    csi: Csi | None = None
    stub: pb_grpc.NodeStub | None = None
    all_csi: list[Csi] = field(default_factory=list)

    @property
    def attach_dir(self) -> Path:
        return self.root / "attach"

    @property
    def kubelet(self) -> Path:
        return self.root / "kubelet"

    def start(self) -> NodePlugin:
        self.root.mkdir(parents=True, exist_ok=True)
        csi = launch_csi(
            self.root / "node.sock",
            self.root / "logs",
            "--mode", "node", "--node-id", self.node_id, "--managed-prefix", PREFIX,
            "--attach-mode", "userspace", "--attach-state-dir", str(self.attach_dir),
            "--node-state-dir", str(self.root / "state"), "--kubelet-dir", str(self.kubelet),
            *self.extra,
        )  # fmt: skip
        assert csi.ready, csi.stderr()
        self.csi = csi
        self.all_csi.append(csi)
        self.stub = pb_grpc.NodeStub(csi.channel)
        return self

    @property
    def node(self) -> pb_grpc.NodeStub:
        assert self.stub is not None
        return self.stub

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.csi is not None
        rc = self.csi.stop(sig)
        self.csi = None
        self.stub = None
        return rc

    def staging(self, volume: str) -> str:
        return str(
            self.kubelet / "plugins/kubernetes.io/csi/block.blockyard.io" / volume / "globalmount"
        )

    def target(self, volume: str, pod: str = "pod1") -> str:
        return str(self.kubelet / "pods" / pod / "volumes/kubernetes.io~csi" / volume / "mount")

    def block_target(self, volume: str, pod: str = "pod1") -> str:
        return str(self.kubelet / "pods" / pod / "volumeDevices/kubernetes.io~csi" / volume)

    def stderr(self) -> str:
        return "\n".join(c.stderr() for c in self.all_csi)


def fs_cap(fs_type: str, mode: int = Mode.SINGLE_NODE_WRITER) -> pb.VolumeCapability:
    if not fs_type:
        return pb.VolumeCapability(
            block=pb.VolumeCapability.BlockVolume(), access_mode=Mode(mode=mode)
        )
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(fs_type=fs_type), access_mode=Mode(mode=mode)
    )


def create_volume(stack: Stack, name: str, cap: pb.VolumeCapability, size: int = 32 * MIB,
                  source: pb.VolumeContentSource | None = None) -> pb.Volume:  # fmt: skip
    request = pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=size),
        volume_capabilities=[cap],
    )  # fmt: skip
    if source is not None:
        request.volume_content_source.CopyFrom(source)
    volume: pb.Volume = stack.csi.controller.CreateVolume(request, timeout=RPC_TIMEOUT_S).volume
    return volume


def controller_publish(stack: Stack, volume: str, node: NodePlugin, cap: pb.VolumeCapability,
                       ) -> dict[str, str]:  # fmt: skip
    answer = stack.csi.controller.ControllerPublishVolume(
        pb.ControllerPublishVolumeRequest(volume_id=volume, node_id=node.node_id,
                                          volume_capability=cap),
        timeout=RPC_TIMEOUT_S,
    )  # fmt: skip
    return dict(answer.publish_context)


def controller_unpublish(stack: Stack, volume: str, node: NodePlugin) -> None:
    stack.csi.controller.ControllerUnpublishVolume(
        pb.ControllerUnpublishVolumeRequest(volume_id=volume, node_id=node.node_id),
        timeout=RPC_TIMEOUT_S,
    )


def stage(node: NodePlugin, volume: pb.Volume | str, cap: pb.VolumeCapability,
          context: dict[str, str]) -> None:  # fmt: skip
    vid = volume if isinstance(volume, str) else volume.volume_id
    vctx = {} if isinstance(volume, str) else dict(volume.volume_context)
    node.node.NodeStageVolume(
        pb.NodeStageVolumeRequest(volume_id=vid, publish_context=context,
                                  staging_target_path=node.staging(vid), volume_capability=cap,
                                  volume_context=vctx),
        timeout=RPC_TIMEOUT_S,
    )  # fmt: skip


def publish(node: NodePlugin, vid: str, cap: pb.VolumeCapability, *, pod: str = "pod1",
            readonly: bool = False) -> str:  # fmt: skip
    target = node.target(vid, pod) if cap.HasField("mount") else node.block_target(vid, pod)
    node.node.NodePublishVolume(
        pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=node.staging(vid),
                                    target_path=target, volume_capability=cap, readonly=readonly),
        timeout=RPC_TIMEOUT_S,
    )  # fmt: skip
    return target


def unpublish(node: NodePlugin, vid: str, target: str) -> None:
    node.node.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target), timeout=RPC_TIMEOUT_S
    )


def unstage(node: NodePlugin, vid: str) -> None:
    node.node.NodeUnstageVolume(
        pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=node.staging(vid)),
        timeout=RPC_TIMEOUT_S,
    )


def mounts_under(root: Path) -> list[tuple[int, str]]:
    """(mount id, mountpoint) of every mount at or below ``root``, from mountinfo."""
    prefix = str(root).rstrip("/") + "/"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            mp = parts[4].replace("\\040", " ")
            if mp.startswith(prefix):
                out.append((int(parts[0]), mp))
    return out


def mount_id_of(path: str) -> int | None:
    found = [mid for mid, mp in mounts_under(Path(path).parent) if mp == path]
    return found[-1] if found else None


def leftovers(root: Path) -> list[str]:
    """Mounts, loop devices and live attach daemons under ``root``, described."""
    found = [f"mount {mp}" for _, mp in mounts_under(root)]
    for attach_dir in root.rglob("attach"):
        if attach_dir.is_dir():
            found.extend(
                f"attachment {a.id} ({a.health}, loops {a.loop_devices})"
                for a in manager.list_attachments(str(attach_dir))
            )
    return found


def scrub(root: Path) -> None:
    """Finalizer: unmount everything under ``root`` (innermost first), then detach every
    attachment (killing its daemon by recorded pid if it will not stop)."""
    for _ in range(3):
        for _mid, mp in sorted(mounts_under(root), key=lambda m: -len(m[1])):
            if "/attach/" in mp and mp.endswith("/mnt"):
                continue
            subprocess.run(["umount", "-l", mp], check=False, timeout=30, capture_output=True)
    for attach_dir in [p for p in root.rglob("attach") if p.is_dir()]:
        for a in manager.list_attachments(str(attach_dir)):
            try:
                manager.detach(a.id, state_root=str(attach_dir), force=True, timeout_s=20)
            except Exception:  # last resort below
                st = a.state
                if st is not None and same_process(st.daemon_pid, st.daemon_start_ticks):
                    os.kill(st.daemon_pid, signal.SIGKILL)
                    time.sleep(0.5)
                manager.cleanup(str(attach_dir), force=True)
