"""Options of the CSI Node service (``blockyard csi --mode node|all``), checked in one place.

- ``attach_mode``: ``userspace`` (blockyard's initiator, a FUSE file under a loop device, one
  attach daemon per volume), ``kernel`` (open-iscsi + dm-multipath; needs ``iscsiadm``) or
  ``auto`` (kernel when ``iscsiadm`` is on PATH, else userspace).
- ``attach_launcher``: how userspace attach daemons are started. ``direct`` forks them from the
  plugin (their own session; they survive the plugin but not a container stop);
  ``systemd-run`` starts each as a transient unit on the host
  (``nsenter -t 1 -m -u -i -n -p -- systemd-run --unit=blockyard-attach-<id> ...``), outside
  the plugin container's cgroup, as docs/kubernetes.md requires on Kubernetes nodes.
- ``attach_state_dir``: the attach layer's state root (``/run/blockyard/attach``).
- ``state_dir``: the node's own records (staged volumes, circuit breakers). Under ``/run``:
  like the attachments they describe, they do not survive a reboot.
"""

from __future__ import annotations

import enum
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

DEFAULT_NODE_STATE_DIR: Final = "/run/blockyard/csi-node"
DEFAULT_ATTACH_STATE_DIR: Final = "/run/blockyard/attach"
#: rds-csi: the same source mounted this often is a mount storm, not a workload.
DEFAULT_MOUNT_STORM_THRESHOLD: Final = 100
#: rds-csi: reading the mount table must not hang an RPC.
DEFAULT_MOUNT_TABLE_TIMEOUT_S: Final = 10.0
#: CSI NodeGetInfo.max_volumes_per_node; loop devices and attach daemons per node.
DEFAULT_MAX_VOLUMES: Final = 128
#: The systemd-run launcher: start the daemon in the host's namespaces as a transient unit.
SYSTEMD_RUN_LAUNCHER: Final = (
    "nsenter", "-t", "1", "-m", "-u", "-i", "-n", "-p", "--",
    "systemd-run", "--unit=blockyard-attach-{id}", "--collect", "--quiet",
)  # fmt: skip


class AttachMode(enum.Enum):
    AUTO = "auto"
    USERSPACE = "userspace"
    KERNEL = "kernel"


class AttachLauncher(enum.Enum):
    DIRECT = "direct"
    SYSTEMD_RUN = "systemd-run"

    def argv_prefix(self) -> tuple[str, ...]:
        return SYSTEMD_RUN_LAUNCHER if self is AttachLauncher.SYSTEMD_RUN else ()


@dataclass(frozen=True, slots=True)
class NodeOptions:
    attach_mode: AttachMode = AttachMode.AUTO
    attach_launcher: AttachLauncher = AttachLauncher.DIRECT
    attach_state_dir: Path = Path(DEFAULT_ATTACH_STATE_DIR)
    state_dir: Path = Path(DEFAULT_NODE_STATE_DIR)
    mount_storm_threshold: int = DEFAULT_MOUNT_STORM_THRESHOLD
    mount_table_timeout_s: float = DEFAULT_MOUNT_TABLE_TIMEOUT_S
    max_volumes: int = DEFAULT_MAX_VOLUMES

    def kernel_attach(self) -> bool:
        """Whether volumes attach through open-iscsi (else through the userspace initiator)."""
        if self.attach_mode is AttachMode.AUTO:
            return shutil.which("iscsiadm") is not None
        return self.attach_mode is AttachMode.KERNEL


def parse_node_options(
    *,
    attach_mode: str | None,
    attach_launcher: str | None,
    attach_state_dir: str | None,
    node_state_dir: str | None,
    mount_storm_threshold: int | None,
) -> NodeOptions:
    """The node options from the command line; raises ValueError saying what to fix."""
    try:
        mode = AttachMode(attach_mode or AttachMode.AUTO.value)
    except ValueError as exc:
        raise ValueError(
            f"--attach-mode {attach_mode!r} is not one of {', '.join(m.value for m in AttachMode)}"
        ) from exc
    try:
        launcher = AttachLauncher(attach_launcher or AttachLauncher.DIRECT.value)
    except ValueError as exc:
        raise ValueError(
            f"--attach-launcher {attach_launcher!r} is not one of "
            f"{', '.join(m.value for m in AttachLauncher)}"
        ) from exc
    if mode is AttachMode.KERNEL and shutil.which("iscsiadm") is None:
        raise ValueError(
            "--attach-mode kernel needs iscsiadm (open-iscsi) on PATH; install open-iscsi or "
            "use --attach-mode userspace"
        )
    threshold = (
        DEFAULT_MOUNT_STORM_THRESHOLD if mount_storm_threshold is None else mount_storm_threshold
    )
    if threshold < 2:
        raise ValueError(f"--mount-storm-threshold must be at least 2, got {threshold}")
    for flag, value in (
        ("--attach-state-dir", attach_state_dir),
        ("--node-state-dir", node_state_dir),
    ):
        if value is not None and not Path(value).is_absolute():
            raise ValueError(f"{flag} wants an absolute path, got {value!r}")
    return NodeOptions(
        attach_mode=mode,
        attach_launcher=launcher,
        attach_state_dir=Path(attach_state_dir or DEFAULT_ATTACH_STATE_DIR),
        state_dir=Path(node_state_dir or DEFAULT_NODE_STATE_DIR),
        mount_storm_threshold=threshold,
    )
