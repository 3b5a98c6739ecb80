"""Operating errors of the CSI Node service.

Each refines a :mod:`blockyard.errors` type whose status (``blockyard.csi.status``) is the one
the CSI spec wants, so the one translation at the RPC boundary stays the only one.
"""

from __future__ import annotations

from blockyard.errors import (
    BlockyardTimeoutError,
    InvalidArgumentError,
    ServerUnavailableError,
    VolumeBusyError,
)


class NodePreconditionError(VolumeBusyError):
    """The node or the volume is in a state the operation cannot proceed from; the message
    says what to fix (CSI: FAILED_PRECONDITION)."""


class MountStormError(NodePreconditionError):
    """The mount table holds one source mounted at least the storm threshold times."""


class FilesystemDamagedError(NodePreconditionError):
    """fsck found problems in an existing file system; it is not mounted."""


class FilesystemMismatchError(NodePreconditionError):
    """The device holds another file system (or other data) than the capability asks for; it
    is never reformatted."""


class TargetPathError(InvalidArgumentError):
    """A staging or target path has the wrong kind (directory vs file) or is outside kubelet's
    directory (CSI: INVALID_ARGUMENT)."""


class BreakerOpenError(ServerUnavailableError):
    """The volume's circuit breaker is open after repeated failures (CSI: UNAVAILABLE)."""


class MountTableTimeoutError(BlockyardTimeoutError):
    """/proc/self/mountinfo could not be read within its timeout (CSI: UNAVAILABLE)."""


class VolumeNotStagedError(NodePreconditionError):
    """NodePublish/NodeExpand of a volume that is not staged at the given path."""
