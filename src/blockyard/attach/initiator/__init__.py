"""blockyard's own iSCSI initiator (userspace attach path) and the kernel attach path.

- :class:`IscsiBlockDevice`: a remote LUN as a thread-safe :class:`~blockyard.blockdev.
  BlockDevice`, multipath with ALUA, bounded by a replacement timeout.
- :class:`MultipathSession` / :class:`IscsiConnection`: the asyncio layers under it.
- :class:`KernelAttacher`: open-iscsi + dm-multipath for nodes with a kernel initiator.
- :class:`LunAttacher`: the seam the node layer uses for both.
"""

from blockyard.attach.initiator.api import (
    AttachedLun,
    LunAttacher,
    ManagedPrefix,
    UserspaceAttacher,
)
from blockyard.attach.initiator.blockdev import IscsiBlockDevice, IscsiVolumeSpec, parse_portal
from blockyard.attach.initiator.connection import InitiatorSettings, IscsiConnection, discover
from blockyard.attach.initiator.errors import (
    CommandTimeoutError,
    ManagedPrefixError,
    NoPathError,
    PathFailedError,
    PathIdentityError,
    ScsiStatusError,
)
from blockyard.attach.initiator.kernel import KernelAttachConfig, KernelAttacher
from blockyard.attach.initiator.multipath import MultipathSession, MultipathSettings

__all__ = [
    "AttachedLun",
    "CommandTimeoutError",
    "InitiatorSettings",
    "IscsiBlockDevice",
    "IscsiConnection",
    "IscsiVolumeSpec",
    "KernelAttachConfig",
    "KernelAttacher",
    "LunAttacher",
    "ManagedPrefix",
    "ManagedPrefixError",
    "MultipathSession",
    "MultipathSettings",
    "NoPathError",
    "PathFailedError",
    "PathIdentityError",
    "ScsiStatusError",
    "UserspaceAttacher",
    "discover",
    "parse_portal",
]
