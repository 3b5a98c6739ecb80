"""Operating errors particular to the CSI services.

Each subclasses the :mod:`blockyard.errors` type whose meaning it refines, so code that only
knows the general hierarchy still handles it; :mod:`blockyard.csi.status` maps them to the
status codes the CSI spec prescribes.
"""

from __future__ import annotations

from blockyard.errors import (
    AlreadyExistsError,
    BlockyardError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    VolumeBusyError,
)


class MissingFieldError(InvalidArgumentError):
    """A field the CSI spec marks REQUIRED is empty; the message names it."""


def required(value: str, field: str, what: str) -> str:
    """``value``, or :class:`MissingFieldError` naming ``field`` and what it should hold."""
    if not value:
        raise MissingFieldError(f"{field} is required: give the {what}")
    return value


class UnsupportedCapabilityError(InvalidArgumentError):
    """A volume capability (access type, file system, access mode) this driver cannot serve."""


class InvalidParameterError(InvalidArgumentError):
    """A StorageClass parameter is unknown or has a value this build does not accept."""


class CapacityOutOfRangeError(OutOfRangeError):
    """No volume size satisfies the capacity range (CSI: OUT_OF_RANGE)."""


class IncompatibleVolumeError(AlreadyExistsError):
    """A volume or snapshot with this name exists but differs from the request, or a volume is
    already published to the node with other options (CSI: ALREADY_EXISTS)."""


class UnknownObjectError(NotFoundError):
    """A volume, snapshot or content source named by id does not exist (CSI: NOT_FOUND)."""


class PublishConflictError(VolumeBusyError):
    """The volume is published to other nodes and its access mode forbids another
    (CSI: FAILED_PRECONDITION, the message names the nodes)."""


class VolumeInUseError(VolumeBusyError):
    """DeleteVolume of a volume still published to a node (CSI: FAILED_PRECONDITION)."""


class TopologyUnsatisfiableError(BlockyardError):
    """None of the requisite topologies is one this driver can provision in
    (CSI: RESOURCE_EXHAUSTED)."""


class InvalidStartingTokenError(InvalidArgumentError):
    """A ListVolumes/ListSnapshots starting_token this driver did not issue (CSI: ABORTED)."""


class StateFileError(BlockyardError):
    """The controller's state file cannot be read or written; the message says which file and
    how to recover."""


class UnsupportedOperationError(BlockyardError):
    """An optional RPC this driver does not advertise (CSI: UNIMPLEMENTED)."""
