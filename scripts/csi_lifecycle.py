"""Drive the CSI driver the way Kubernetes does, against a running `blockyard serve`.

Plays the external-provisioner, external-attacher and kubelet: CreateVolume →
ControllerPublishVolume → NodeStageVolume → NodePublishVolume → write a file with fsync →
NodeUnpublishVolume → NodeUnstageVolume → stage and publish again → verify the file → tear
everything down (ControllerUnpublishVolume, DeleteVolume). Exits non-zero on any failure.

    .venv/bin/python scripts/csi_lifecycle.py --backend 127.0.0.1:7400 --dir /var/tmp/csi-demo
"""

from __future__ import annotations

import argparse
import hashlib
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc

from blockyard.csi.proto import csi_pb2 as pb
from blockyard.csi.proto import csi_pb2_grpc as pb_grpc

RPC_TIMEOUT_S = 120.0
START_TIMEOUT_S = 30.0
PREFIX = "iqn.2026-11.io.blockyard"
NODE = "demo-node"


def step(text: str) -> None:
    print(f"-- {text}", flush=True)


def start_driver(root: Path, backend: str) -> tuple[subprocess.Popen[str], str]:
    sock = root / "csi.sock"
    argv = [sys.executable, "-m", "blockyard.cli.main", "csi", "--endpoint", f"unix://{sock}"]
    argv += ["--mode", "all", "--backend", backend, "--node-id", NODE]
    argv += ["--managed-prefix", PREFIX, "--kubelet-dir", str(root / "kubelet")]
    argv += ["--state-dir", str(root / "controller"), "--node-state-dir", str(root / "node")]
    argv += ["--attach-mode", "userspace", "--attach-state-dir", str(root / "attach")]
    log = (root / "csi.log").open("w")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    out = proc.stdout
    threading.Thread(target=lambda: lines.put(out.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=START_TIMEOUT_S)
    except queue.Empty:
        proc.kill()
        raise SystemExit(f"the CSI driver did not start; see {root / 'csi.log'}") from None
    if not line.startswith("READY"):
        proc.wait(timeout=10)
        raise SystemExit(f"the CSI driver did not start: {(root / 'csi.log').read_text()}")
    return proc, f"unix://{sock}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True, help="blockyard serve's API HOST:PORT")
    parser.add_argument("--dir", required=True, help="scratch directory (kubelet dir, state)")
    parser.add_argument("--fs", default="ext4", choices=["ext4", "xfs"])
    args = parser.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    proc, endpoint = start_driver(root, args.backend)
    channel = grpc.insecure_channel(endpoint)
    controller = pb_grpc.ControllerStub(channel)
    node = pb_grpc.NodeStub(channel)
    cap = pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(fs_type=args.fs),
        access_mode=pb.VolumeCapability.AccessMode(
            mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
        ),
    )
    name = "pvc-demo"
    kubelet = root / "kubelet"
    staging = str(kubelet / "plugins/kubernetes.io/csi/block.blockyard.io" / name / "globalmount")
    target = str(kubelet / "pods/pod-1/volumes/kubernetes.io~csi" / name / "mount")
    try:
        step(f"CreateVolume {name} (256 MiB, {args.fs})")
        volume = controller.CreateVolume(
            pb.CreateVolumeRequest(
                name=name,
                capacity_range=pb.CapacityRange(required_bytes=256 << 20),
                volume_capabilities=[cap],
                parameters={"fsType": args.fs},
            ),
            timeout=RPC_TIMEOUT_S,
        ).volume
        vid = volume.volume_id
        step(f"ControllerPublishVolume {vid} -> {NODE}")
        context = controller.ControllerPublishVolume(
            pb.ControllerPublishVolumeRequest(volume_id=vid, node_id=NODE, volume_capability=cap),
            timeout=RPC_TIMEOUT_S,
        ).publish_context
        print(f"   publish_context: {dict(context)}")

        def stage_and_publish() -> None:
            step("NodeStageVolume (attach over iSCSI, mkfs only if empty, mount)")
            node.NodeStageVolume(
                pb.NodeStageVolumeRequest(
                    volume_id=vid,
                    publish_context=context,
                    staging_target_path=staging,
                    volume_capability=cap,
                    volume_context=volume.volume_context,
                ),
                timeout=RPC_TIMEOUT_S,
            )
            step("NodePublishVolume (bind mount into the pod's directory)")
            node.NodePublishVolume(
                pb.NodePublishVolumeRequest(
                    volume_id=vid,
                    staging_target_path=staging,
                    target_path=target,
                    volume_capability=cap,
                ),
                timeout=RPC_TIMEOUT_S,
            )

        def unpublish_and_unstage() -> None:
            step("NodeUnpublishVolume")
            node.NodeUnpublishVolume(
                pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target),
                timeout=RPC_TIMEOUT_S,
            )
            step("NodeUnstageVolume (unmount, detach)")
            node.NodeUnstageVolume(
                pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging),
                timeout=RPC_TIMEOUT_S,
            )

        stage_and_publish()
        data = os.urandom(4 << 20)
        path = os.path.join(target, "data.bin")
        step(f"write {len(data)} bytes to {path} with fsync")
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        digest = hashlib.sha256(data).hexdigest()
        stats = node.NodeGetVolumeStats(
            pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=target),
            timeout=RPC_TIMEOUT_S,
        )
        used = [u for u in stats.usage if u.unit == pb.VolumeUsage.BYTES]
        print(f"   NodeGetVolumeStats: used {used[0].used} of {used[0].total} bytes")
        unpublish_and_unstage()
        stage_and_publish()
        step("verify the file after a fresh stage")
        with open(path, "rb") as f:
            again = hashlib.sha256(f.read()).hexdigest()
        if again != digest:
            print(f"   MISMATCH: {again} != {digest}")
            return 1
        print(f"   sha256 {digest} matches")
        unpublish_and_unstage()
        step("ControllerUnpublishVolume and DeleteVolume")
        controller.ControllerUnpublishVolume(
            pb.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=NODE),
            timeout=RPC_TIMEOUT_S,
        )
        controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=RPC_TIMEOUT_S)
    except grpc.RpcError as exc:
        print(f"   RPC failed: {exc.code().name}: {exc.details()}")
        return 1
    else:
        step("CSI lifecycle finished")
        return 0
    finally:
        channel.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=35)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
