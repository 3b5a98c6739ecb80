"""The one translation between blockyard errors and gRPC status codes, both directions.

The server maps an error's *type* (never its message) to a code by walking the type's MRO, so
the most specific entry wins; the message goes to the caller unchanged, since every
:class:`~blockyard.errors.BlockyardError` already says what went wrong and how to fix it.
The client maps a code back to the most general error type of that code, so callers on either
side of the wire catch the same types.
"""

from __future__ import annotations

from typing import Final

import grpc

from blockyard import errors
from blockyard.errors import OperationInProgressError, ServerUnavailableError

#: Error type → status code; looked up along the raised type's MRO (most specific first).
STATUS_BY_ERROR: Final[dict[type[BaseException], grpc.StatusCode]] = {
    OperationInProgressError: grpc.StatusCode.ABORTED,
    ServerUnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.ShrinkRefusedError: grpc.StatusCode.OUT_OF_RANGE,
    errors.OutOfRangeError: grpc.StatusCode.OUT_OF_RANGE,
    errors.InvalidRoleTransitionError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    errors.VolumeBusyError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.VolumeClosedError: grpc.StatusCode.UNAVAILABLE,
    errors.FencedError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.CorruptionError: grpc.StatusCode.DATA_LOSS,
    errors.WalTruncatedError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.FeedLostError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ReplicationGapError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.NoSpaceError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.ReplicationUnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.BlockyardTimeoutError: grpc.StatusCode.UNAVAILABLE,
    errors.StorageIOError: grpc.StatusCode.UNAVAILABLE,
    # The master's store: a lost compare-and-set is retried by the caller; not leading (or
    # fenced, or a store another master holds) is a precondition; the rest is transient.
    errors.StoreConflictError: grpc.StatusCode.ABORTED,
    errors.NotLeaderError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.StoreLockedError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.StoreFormatError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.StoreError: grpc.StatusCode.UNAVAILABLE,
    errors.BlockyardError: grpc.StatusCode.INTERNAL,
}

#: Status code → the error type the client raises: the most general type of that code, except
#: FAILED_PRECONDITION, which in this API almost always means epoch fencing.
ERROR_BY_STATUS: Final[dict[grpc.StatusCode, type[errors.BlockyardError]]] = {
    grpc.StatusCode.ABORTED: OperationInProgressError,
    grpc.StatusCode.OUT_OF_RANGE: errors.OutOfRangeError,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FencedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.NoSpaceError,
    grpc.StatusCode.UNAVAILABLE: ServerUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.BlockyardTimeoutError,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code for ``exc``; INTERNAL for anything outside the hierarchy."""
    for cls in type(exc).__mro__:
        code = STATUS_BY_ERROR.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def error_for(code: grpc.StatusCode, details: str) -> errors.BlockyardError:
    """The error a client raises for a failed call with ``code`` and ``details``. Codes
    without an entry (INTERNAL, DATA_LOSS, UNKNOWN, ...) become a plain
    :class:`~blockyard.errors.BlockyardError` naming the code."""
    cls = ERROR_BY_STATUS.get(code)
    if cls is None:
        return errors.BlockyardError(f"volume server answered {code.name}: {details}")
    return cls(details)
