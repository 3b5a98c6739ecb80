"""Errors of the attach layer, all inside the one hierarchy of :mod:`blockyard.errors`."""

from __future__ import annotations

from blockyard.errors import BlockyardError, VolumeBusyError


class AttachError(BlockyardError):
    """Attaching or detaching failed; the message names the step and how to recover."""


class ToolError(AttachError):
    """An external tool (losetup, mount, mkfs, ...) failed or ran past its timeout."""


class SourceUnavailableError(AttachError):
    """The requested kind of source cannot be opened by this build (its client is missing)."""


class DeviceInUseError(VolumeBusyError):
    """The attached device (or a partition or holder of it) is mounted or otherwise in use."""


class AttachmentNotFoundError(AttachError):
    """No attachment matches the given mountpoint, device, name or id."""
