"""How the Node service attaches a volume: two implementations of one small seam.

- :class:`UserspaceVolumeAttacher`: blockyard's initiator in a per-volume attach daemon
  (:mod:`blockyard.attach.manager`), which serves the LUN as a FUSE file under a loop device.
  The daemons are separate processes that outlive the plugin; a restarted plugin adopts them
  (:func:`~blockyard.attach.manager.cleanup`).
- :class:`KernelVolumeAttacher`: open-iscsi + dm-multipath
  (:class:`~blockyard.attach.initiator.kernel.KernelAttacher`); the device is found by NAA id.

Both refuse an IQN outside the managed prefix before anything is touched, log in with the
node's initiator name (:mod:`blockyard.csi.initiators`) and, when NodeStageVolume carried CHAP
secrets, with CHAP (mutual CHAP too when given). Secrets are never logged, never stored in the
node's records, and never put on a command line of ours (open-iscsi's ``iscsiadm`` takes them
as arguments; see :mod:`blockyard.attach.initiator.kernel`). Blocking: call off the event loop.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from blockyard.attach import manager
from blockyard.attach.errors import AttachmentNotFoundError
from blockyard.attach.initiator.api import ManagedPrefix
from blockyard.attach.initiator.blockdev import IscsiVolumeSpec, parse_portal
from blockyard.attach.initiator.kernel import KernelAttachConfig, KernelAttacher
from blockyard.attach.loop import run_tool
from blockyard.attach.source import IscsiSource
from blockyard.attach.state import Layout
from blockyard.csi.initiators import node_initiator_name
from blockyard.csi.node_errors import NodePreconditionError
from blockyard.csi.node_fs import device_size
from blockyard.csi.node_state import StagedVolume
from blockyard.errors import BlockyardTimeoutError
from blockyard.iscsi.chap import ChapCredentials

log = logging.getLogger("blockyard.csi.node_attach")

KIND_USERSPACE: Final = "userspace"
KIND_KERNEL: Final = "kernel"
#: FUSE caches file attributes (libfuse's attr_timeout, 1 s by default): how long the loop
#: device's backing file may take to show its new size.
FUSE_SIZE_TIMEOUT_S: Final = 10.0
#: The open-iscsi interface record the kernel path logs in through; it carries the node's
#: initiator name (``iface.initiatorname``) so the host's default record is never changed.
KERNEL_IFACE: Final = "blockyard"


@dataclass(frozen=True, slots=True)
class Target:
    """Where the volume is (from the publish context) and how to log in to it: the initiator
    name to use ("" = the node's own) and the CHAP credentials from NodeStageVolume's secrets
    (``target_chap`` for mutual CHAP). ``repr`` never shows a secret."""

    volume_id: str
    iqn: str
    portals: tuple[str, ...]
    lun: int
    naa_id: str = ""
    initiator_name: str = ""
    chap: ChapCredentials | None = None
    target_chap: ChapCredentials | None = None


@dataclass(frozen=True, slots=True)
class Attached:
    device: str
    attachment_id: str = ""


class VolumeAttacher(Protocol):
    kind: str

    def attach(self, target: Target) -> Attached:
        """Attach (or adopt the existing attachment of) ``target``; idempotent."""
        ...

    def detach(self, volume_id: str, record: StagedVolume | None) -> None:
        """Detach the volume; detaching what is not attached is fine."""
        ...

    def refresh_size(self, record: StagedVolume, min_size_bytes: int) -> int:
        """Make the device show the volume's current (grown) size; returns it in bytes."""
        ...

    def healthy(self, record: StagedVolume) -> str | None:
        """None when the attachment serves I/O, else why not."""
        ...

    def recover(self) -> None:
        """At start: adopt what a previous plugin attached, remove what dead daemons left."""
        ...


class UserspaceVolumeAttacher:
    kind = KIND_USERSPACE

    def __init__(
        self, state_root: Path, managed_prefix: str, node_id: str, launcher: tuple[str, ...]
    ) -> None:
        self.state_root = str(state_root)
        self.prefix = ManagedPrefix(managed_prefix)
        self.initiator_name = node_initiator_name(node_id)
        self.launcher = launcher

    def attach(self, target: Target) -> Attached:
        self.prefix.require(target.iqn, "log in to")
        source = IscsiSource(
            portals=target.portals,
            iqn=target.iqn,
            lun=target.lun,
            volume_name=target.volume_id,
            initiator_name=target.initiator_name or self.initiator_name,
            chap=target.chap,
            target_chap=target.target_chap,
        )
        state = manager.attach(source, state_root=self.state_root, launcher=self.launcher)
        assert state.loop_device is not None, "a ready attachment has its loop device"
        return Attached(state.loop_device, state.id)

    def detach(self, volume_id: str, record: StagedVolume | None) -> None:
        if record is not None and record.iqn:
            self.prefix.require(record.iqn, "log out of")
        name = record.attachment_id if record is not None and record.attachment_id else volume_id
        try:
            manager.detach(name, state_root=self.state_root)
        except AttachmentNotFoundError:
            log.info("volume %s has no attachment under %s", volume_id, self.state_root)

    def refresh_size(self, record: StagedVolume, min_size_bytes: int) -> int:
        size = manager.refresh_size(
            record.attachment_id, state_root=self.state_root, min_size_bytes=min_size_bytes
        )
        found = manager.inspect(Layout(self.state_root), record.attachment_id)
        backing = found.state.backing_file if found.state is not None else ""
        deadline = time.monotonic() + FUSE_SIZE_TIMEOUT_S
        # stat() revalidates the FUSE inode once its attributes expire; LOOP_SET_CAPACITY
        # reads the inode's size, so it must be current first.
        while os.stat(backing).st_size < size:
            if time.monotonic() >= deadline:
                raise BlockyardTimeoutError(
                    f"{backing} still shows {os.stat(backing).st_size} bytes, not {size}, after "
                    f"{FUSE_SIZE_TIMEOUT_S:.0f} s"
                )
            time.sleep(0.1)
        run_tool(["losetup", "--set-capacity", record.device])
        now = device_size(record.device)
        if now < size:
            raise NodePreconditionError(
                f"{record.device} is {now} bytes after losetup --set-capacity, expected {size}"
            )
        return now

    def healthy(self, record: StagedVolume) -> str | None:
        found = manager.inspect(Layout(self.state_root), record.attachment_id)
        if found.healthy:
            return None
        why = ", ".join(found.problems) or (
            "its attach daemon is not running" if not found.daemon_alive else found.health
        )
        return f"attachment {record.attachment_id} of {record.device} is {found.health}: {why}"

    def recover(self) -> None:
        report = manager.cleanup(self.state_root)
        log.info(
            "attachments: %d adopted, %d leftovers removed, %d refused",
            len(report.adopted),
            len(report.removed),
            len(report.refused),
        )
        for line in report.refused:
            log.warning("left in place (still mounted): %s", line)


class KernelVolumeAttacher:
    """open-iscsi path. Not exercised on machines without a kernel initiator; its command
    sequences are covered by the attach layer's recorded-command tests."""

    kind = KIND_KERNEL

    def __init__(
        self, managed_prefix: str, node_id: str, attacher: KernelAttacher | None = None
    ) -> None:
        self.prefix = ManagedPrefix(managed_prefix)
        self.initiator_name = node_initiator_name(node_id)
        self._attacher = attacher or KernelAttacher(
            KernelAttachConfig(managed_prefix=managed_prefix, iface=KERNEL_IFACE)
        )

    def attach(self, target: Target) -> Attached:
        self.prefix.require(target.iqn, "log in to")
        if not target.naa_id:
            raise NodePreconditionError(
                "the kernel attach path finds the device by NAA id, but publish_context has no "
                "naaId; upgrade the CSI controller"
            )
        spec = IscsiVolumeSpec(
            portals=tuple(parse_portal(p) for p in target.portals),
            target_name=target.iqn,
            initiator_name=target.initiator_name or self.initiator_name,
            lun=target.lun,
            chap=target.chap,
            target_chap=target.target_chap,
            expected_naa=target.naa_id,
        )
        lun = self._attacher.attach(spec)
        assert lun.device is not None, "the kernel path returns a device node"
        return Attached(str(lun.device))

    def detach(self, volume_id: str, record: StagedVolume | None) -> None:
        if record is not None and record.iqn:
            self._attacher.detach(record.iqn)

    def refresh_size(self, record: StagedVolume, min_size_bytes: int) -> int:
        self.prefix.require(record.iqn, "rescan")
        run_tool(["iscsiadm", "-m", "node", "-T", record.iqn, "-R"])
        real = os.path.realpath(record.device)
        if os.path.basename(real).startswith("dm-"):
            run_tool(["multipathd", "resize", "map", os.path.basename(real)], check=False)
        return device_size(record.device)

    def healthy(self, record: StagedVolume) -> str | None:
        if not os.path.exists(record.device):
            return f"{record.device} is gone"
        return None

    def recover(self) -> None:
        log.info("kernel attach path: sessions are the kernel's; nothing to adopt")
