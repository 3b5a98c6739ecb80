"""Which volume capabilities the driver serves, checked in one place.

Access types: ``block`` (a raw device; KubeVirt disks, live migration) and ``mount`` with an
``ext4`` or ``xfs`` file system (``ext4`` when neither the capability nor the StorageClass
names one). Access modes (CSI spec, ``VolumeCapability.AccessMode.Mode``):

- single node: SINGLE_NODE_WRITER, SINGLE_NODE_READER_ONLY, SINGLE_NODE_SINGLE_WRITER,
  SINGLE_NODE_MULTI_WRITER;
- MULTI_NODE_READER_ONLY, any access type;
- MULTI_NODE_MULTI_WRITER for ``block`` only: ext4 and xfs are not cluster file systems, and two
  nodes mounting one read-write corrupt it. Block RWX exists for VM live migration, where the
  hypervisor hands writes over from one node to the other.

MULTI_NODE_SINGLE_WRITER is refused: nothing here could enforce the single writer.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from blockyard.csi.errors import MissingFieldError, UnsupportedCapabilityError
from blockyard.csi.proto import csi_pb2 as pb

Mode = pb.VolumeCapability.AccessMode

SUPPORTED_FS_TYPES: Final = ("ext4", "xfs")
DEFAULT_FS_TYPE: Final = "ext4"
#: CSI spec "Size Limits": a repeated string field stays within 4 KiB in total.
MOUNT_FLAGS_MAX_BYTES: Final = 4096

SINGLE_NODE_MODES: Final = frozenset(
    {
        Mode.SINGLE_NODE_WRITER,
        Mode.SINGLE_NODE_READER_ONLY,
        Mode.SINGLE_NODE_SINGLE_WRITER,
        Mode.SINGLE_NODE_MULTI_WRITER,
    }
)
MULTI_NODE_MODES: Final = frozenset({Mode.MULTI_NODE_READER_ONLY, Mode.MULTI_NODE_MULTI_WRITER})
READ_ONLY_MODES: Final = frozenset({Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY})


class AccessType(enum.Enum):
    BLOCK = "block"
    MOUNT = "mount"


@dataclass(frozen=True, slots=True)
class Capability:
    """One checked volume capability. ``fs_type`` is empty for block and for a mount that left
    the choice to the StorageClass."""

    access_type: AccessType
    mode: int
    fs_type: str = ""
    mount_flags: tuple[str, ...] = ()

    @property
    def mode_name(self) -> str:
        return Mode.Mode.Name(self.mode)

    @property
    def multi_node(self) -> bool:
        return self.mode in MULTI_NODE_MODES


def parse_capability(field: str, cap: pb.VolumeCapability) -> Capability:
    """``cap`` as a :class:`Capability`. A missing access type or mode raises
    :class:`MissingFieldError`; a combination this driver does not serve raises
    :class:`UnsupportedCapabilityError` saying why. Both name ``field``."""
    kind = cap.WhichOneof("access_type")
    if kind is None:
        raise MissingFieldError(
            f"{field}.access_type is required: set block {{}} for a raw device or mount "
            "{fs_type: ext4|xfs} for a file system"
        )
    if not cap.HasField("access_mode") or cap.access_mode.mode == Mode.UNKNOWN:
        raise MissingFieldError(f"{field}.access_mode.mode is required (e.g. SINGLE_NODE_WRITER)")
    mode = cap.access_mode.mode
    if mode not in SINGLE_NODE_MODES and mode not in MULTI_NODE_MODES:
        name = Mode.Mode.Name(mode) if mode in Mode.Mode.values() else str(mode)
        raise UnsupportedCapabilityError(
            f"{field}.access_mode {name} is not supported: blockyard cannot enforce a single "
            "writer across nodes. Use a SINGLE_NODE_* mode (ReadWriteOnce/ReadWriteOncePod), "
            "MULTI_NODE_READER_ONLY (ReadOnlyMany) or, for raw block volumes, "
            "MULTI_NODE_MULTI_WRITER (ReadWriteMany)"
        )
    if kind == "block":
        return Capability(AccessType.BLOCK, mode)
    fs_type = cap.mount.fs_type
    if fs_type and fs_type not in SUPPORTED_FS_TYPES:
        raise UnsupportedCapabilityError(
            f"{field}.mount.fs_type {fs_type!r} is not supported: use one of "
            f"{', '.join(SUPPORTED_FS_TYPES)} (or leave it empty for {DEFAULT_FS_TYPE})"
        )
    if mode == Mode.MULTI_NODE_MULTI_WRITER:
        raise UnsupportedCapabilityError(
            f"{field}: MULTI_NODE_MULTI_WRITER (ReadWriteMany) needs volumeMode: Block. "
            f"{fs_type or DEFAULT_FS_TYPE} is not a cluster file system: mounted read-write on "
            "two nodes at once it would be corrupted. Use ReadWriteOnce for a file system, or "
            "a raw block volume for live migration"
        )
    flags = tuple(cap.mount.mount_flags)
    if sum(len(f.encode()) for f in flags) > MOUNT_FLAGS_MAX_BYTES:
        raise UnsupportedCapabilityError(
            f"{field}.mount.mount_flags exceed {MOUNT_FLAGS_MAX_BYTES} bytes (CSI size limit)"
        )
    return Capability(AccessType.MOUNT, mode, fs_type, flags)


def parse_capabilities(field: str, caps: Sequence[pb.VolumeCapability]) -> tuple[Capability, ...]:
    """Every capability of a REQUIRED repeated field, each checked by :func:`parse_capability`."""
    if not caps:
        raise MissingFieldError(
            f"{field} is required: give at least one volume capability (access type and mode)"
        )
    return tuple(parse_capability(f"{field}[{i}]", cap) for i, cap in enumerate(caps))
