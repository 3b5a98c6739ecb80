"""Operating errors of the initiator, all inside the one blockyard hierarchy.

Every failure an I/O caller can see is a :class:`~blockyard.errors.StorageIOError` subclass
(the FUSE layer answers EIO for it) unless the request itself was wrong, in which case it is the
same :class:`~blockyard.errors.InvalidArgumentError` subclass a local volume would raise
(``OutOfRangeError`` for LBA OUT OF RANGE, and so on). The mapping from SCSI status and sense to
these types lives in one function, :func:`blockyard.attach.initiator.scsi.outcome_error`.
"""

from __future__ import annotations

from blockyard.errors import BlockyardError, InvalidArgumentError, StorageIOError


class PathFailedError(StorageIOError):
    """One path (connection) failed: refused, dropped, timed out or broke the protocol.

    Multipath treats it as "try another path"; a single-path caller sees it only once the
    replacement timeout has run out (as :class:`NoPathError`).
    """


class CommandTimeoutError(PathFailedError):
    """A command got no response within its timeout; it was aborted (ABORT TASK) or its
    connection was dropped, so it is safe to re-issue."""


class NoPathError(StorageIOError):
    """No path could carry the I/O for the whole replacement timeout (open-iscsi's
    ``replacement_timeout``); the I/O fails with EIO instead of waiting forever."""


class ScsiStatusError(StorageIOError):
    """The target completed the command with an error no retry can fix (MEDIUM ERROR,
    HARDWARE ERROR, RESERVATION CONFLICT, ...). Status and decoded sense are attached."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        sense_key: int | None = None,
        asc: int | None = None,
        ascq: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.sense_key = sense_key
        self.asc = asc
        self.ascq = ascq


class PathIdentityError(BlockyardError):
    """The portals given for one volume do not export the same logical unit (their NAA
    identifiers from VPD page 83h differ), so they must not be used as paths of one device."""


class ManagedPrefixError(InvalidArgumentError):
    """Refused: the IQN is outside the configured managed prefix, so this node does not own it
    and must never log it in, log it out or clean it up."""


class KernelCommandError(BlockyardError):
    """An external tool (iscsiadm, multipath, ...) failed or timed out; stderr is attached."""

    def __init__(self, message: str, *, argv: tuple[str, ...], rc: int, stderr: str) -> None:
        super().__init__(message)
        self.argv = argv
        self.rc = rc
        self.stderr = stderr


class DeviceNotFoundError(BlockyardError):
    """The attached LUN's block device did not appear under its NAA id in time."""


class CommandRejectedError(StorageIOError):
    """The target answered a command with an iSCSI Reject (RFC 7143 §11.17): it was not
    executed and re-issuing the same PDU would be refused again."""
