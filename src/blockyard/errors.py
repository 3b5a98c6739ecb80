"""The one error hierarchy of blockyard.

Every operating error a caller can act on is a subclass of :class:`BlockyardError`, and its
message says what went wrong and how to fix it. Boundaries translate these types, never their
message text, into a protocol answer: SCSI sense data in the SCSI layer, a gRPC status in the
management and CSI services. Programmer errors (broken invariants) are assertions, not these.
"""

from __future__ import annotations


class BlockyardError(Exception):
    """Base of every blockyard operating error."""


# --- bad arguments -------------------------------------------------------------------------


class InvalidArgumentError(BlockyardError, ValueError):
    """The caller passed something that can never succeed as given."""


class InvalidNameError(InvalidArgumentError):
    """A volume or snapshot name is empty, too long, or uses characters outside the allowed set."""


class InvalidSizeError(InvalidArgumentError):
    """A size is out of bounds or not a multiple of the required granularity."""


class OutOfRangeError(InvalidArgumentError):
    """An LBA range reaches past the end of the volume (SCSI: LBA OUT OF RANGE)."""


class MisalignedError(InvalidArgumentError):
    """A buffer length is not a whole number of logical blocks."""


class TransferTooLargeError(InvalidArgumentError):
    """A single request moves more blocks than the device's transfer-length cap."""


class ShrinkRefusedError(InvalidArgumentError):
    """Volumes only grow: shrinking would silently drop data the filesystem may still use."""


class InvalidRoleTransitionError(InvalidArgumentError):
    """The requested role change is not one of the allowed transitions."""


# --- lookup ----------------------------------------------------------------------------------


class NotFoundError(BlockyardError):
    """The named object does not exist."""


class VolumeNotFoundError(NotFoundError):
    pass


class SnapshotNotFoundError(NotFoundError):
    pass


class AlreadyExistsError(BlockyardError):
    """An object with this name exists and differs from what was asked for."""


class VolumeExistsError(AlreadyExistsError):
    pass


class SnapshotExistsError(AlreadyExistsError):
    pass


class VolumeBusyError(BlockyardError):
    """The volume is open or in use and the operation needs it idle."""


class OperationInProgressError(VolumeBusyError):
    """Another operation on the same volume is still running; retry when it has finished."""


class VolumeClosedError(BlockyardError):
    """An operation was attempted on a closed volume handle."""


# --- fencing ---------------------------------------------------------------------------------


class FencedError(BlockyardError):
    """Refused because of the volume's epoch: the caller speaks for an old (or unknown) epoch."""


class StaleEpochError(FencedError):
    """A write or replication message carries an epoch lower than the volume's."""

    def __init__(self, message: str, *, volume_epoch: int, request_epoch: int) -> None:
        super().__init__(message)
        self.volume_epoch = volume_epoch
        self.request_epoch = request_epoch


class EpochAheadError(FencedError):
    """A write carries an epoch newer than the volume's: the volume must be told first."""


class EpochRegressionError(FencedError):
    """Someone tried to move a volume's epoch backwards; epochs only move forward."""


class NotPrimaryError(FencedError):
    """A local write reached a replica: replicas take writes only from their primary's
    replication stream (and a rebuilding copy none at all)."""


class LeaseExpiredError(FencedError):
    """A primary run by a master holds no lease right now (the master's grant and its
    replicas' answers both lapsed, or a promoted copy is still waiting out the old primary's
    lease): it acknowledges no write or flush until a lease comes back (SCSI: NOT READY,
    asymmetric access state transition, so the initiator retries)."""


# --- integrity -------------------------------------------------------------------------------


class CorruptionError(BlockyardError):
    """Stored bytes fail their checksum or structure check.

    Carries the volume, the file and the byte offset so an operator can find the damage; the data
    is never served as if it were good.
    """

    def __init__(self, message: str, *, volume: str, path: str, offset: int) -> None:
        super().__init__(f"{message} (volume {volume!r}, file {path}, offset {offset})")
        self.volume = volume
        self.path = path
        self.offset = offset


class FeedLostError(BlockyardError):
    """A replication feed fell past the retention bound: the records it needed were released
    (their blocks are in the replica's missed-write bitmap). The replica must resync."""


class EpochMovedError(FeedLostError):
    """The primary was given a new epoch after it opened a replication session: nothing written
    since may go out on that session (resync blocks carry no epoch). The session ends like one
    whose feed was lost; the next handshake starts from the new epoch."""


class ReplicationGapError(BlockyardError):
    """A replica was handed a record that does not follow the last one it holds."""


class WalTruncatedError(BlockyardError):
    """Records older than the WAL's tail were asked for: they are already checkpointed away.

    A replica this far behind needs a full rebuild rather than a WAL catch-up.
    """


# --- resources and time ----------------------------------------------------------------------


class BlockyardTimeoutError(BlockyardError, TimeoutError):
    """A bounded wait ran out."""


class WalFullTimeoutError(BlockyardTimeoutError):
    """A writer waited the whole back-pressure timeout for WAL space and none came free."""


class FlushTimeoutError(BlockyardTimeoutError):
    """A durability barrier did not complete in time."""


class NoSpaceError(BlockyardError):
    """The filesystem under the data directory is full (SCSI: SPACE ALLOCATION FAILED)."""


class StorageIOError(BlockyardError):
    """The operating system failed an I/O call; the cause is chained."""


class ReplicationUnavailableError(StorageIOError):
    """A durability point (flush, FUA write) cannot be confirmed on the copies the volume's
    durability mode requires, and the missing replicas could not be marked out of sync: the
    write is not acknowledged (SCSI: the flush fails)."""


class VolumeFailedError(StorageIOError):
    """The volume was taken offline after its file failed to persist data (a failed
    ``fdatasync``): the page cache can no longer be trusted to reach the disk, so no later flush
    may be acknowledged. Reopening the volume recovers it from what is on disk."""


# --- services --------------------------------------------------------------------------------


class ServerUnavailableError(BlockyardError):
    """The volume server cannot be reached or cannot serve right now; retrying is safe."""


class ServerStoppingError(ServerUnavailableError):
    """The volume server is shutting down and takes no new operations; retry once it is back."""


# --- transport security ----------------------------------------------------------------------


class TlsConfigError(InvalidArgumentError):
    """The TLS flags cannot work as given: an incomplete set, TLS and ``--insecure`` together,
    or plaintext gRPC off loopback without ``--insecure``. A usage error (exit 2)."""


class TlsFileError(InvalidArgumentError):
    """A TLS certificate, key or CA file is missing, unreadable or not PEM, or the key does not
    belong to the certificate. An operating error (exit 1): the flags were right, the files
    are not."""


# --- master store ----------------------------------------------------------------------------


class StoreError(BlockyardError):
    """The master's store (sqlite:// or etcd://) refused or failed an operation."""


class StoreUrlError(InvalidArgumentError):
    """A ``--store`` URL is not ``sqlite:///ABSOLUTE/PATH`` or ``etcd://HOST:PORT[,HOST:PORT...]``.
    A usage error (exit 2)."""


class StoreConflictError(StoreError):
    """A put or delete named a version (``expect_version``) the record no longer has: someone
    wrote it since it was read. Reload the record and decide again."""

    def __init__(
        self, message: str, *, key: str, expected_version: int, actual_version: int | None
    ) -> None:
        super().__init__(message)
        self.key = key
        self.expected_version = expected_version
        #: None when the record does not exist.
        self.actual_version = actual_version


class NotLeaderError(StoreError):
    """This master is not the leader, so it may not write the store; the leader (when known)
    serves the request instead."""

    def __init__(self, message: str, *, leader_address: str | None = None) -> None:
        super().__init__(message)
        self.leader_address = leader_address


class StoreFencedError(NotLeaderError):
    """This master was the leader and no longer is (etcd: its lease expired or the leader key
    changed): the write was refused by the store itself, so a deposed leader's late write never
    lands. The master must stop acting as leader."""


class StoreLockedError(StoreError):
    """Another master holds the store (sqlite: the database's lock file), so this one must not
    start on it."""


class StoreFormatError(StoreError):
    """The store holds something that is not a blockyard master store, or one written by a newer
    version."""


class StoreClosedError(StoreError):
    """The store was used after ``close()``."""


class StoreUnavailableError(StoreError):
    """The store cannot be reached or failed an I/O call; the cause is chained. A write that
    failed this way may or may not have been applied: re-putting the same value is safe."""


class StoreTimeoutError(StoreUnavailableError, BlockyardTimeoutError):
    """A store call did not complete within its timeout; its outcome is unknown."""
