"""The error → gRPC status table and its inverse on the client side."""

from __future__ import annotations

import grpc
import pytest

from blockyard import errors
from blockyard.errors import OperationInProgressError, ServerStoppingError, ServerUnavailableError
from blockyard.server.status import ERROR_BY_STATUS, STATUS_BY_ERROR, error_for, status_for

C = grpc.StatusCode

CASES = [
    (errors.VolumeNotFoundError("x"), C.NOT_FOUND),
    (errors.SnapshotNotFoundError("x"), C.NOT_FOUND),
    (errors.VolumeExistsError("x"), C.ALREADY_EXISTS),
    (errors.SnapshotExistsError("x"), C.ALREADY_EXISTS),
    (errors.InvalidNameError("x"), C.INVALID_ARGUMENT),
    (errors.InvalidSizeError("x"), C.INVALID_ARGUMENT),
    (errors.InvalidArgumentError("x"), C.INVALID_ARGUMENT),
    (errors.ShrinkRefusedError("x"), C.OUT_OF_RANGE),
    (errors.OutOfRangeError("x"), C.OUT_OF_RANGE),
    (errors.InvalidRoleTransitionError("x"), C.FAILED_PRECONDITION),
    (errors.EpochRegressionError("x"), C.FAILED_PRECONDITION),
    (errors.StaleEpochError("x", volume_epoch=2, request_epoch=1), C.FAILED_PRECONDITION),
    (errors.VolumeBusyError("x"), C.FAILED_PRECONDITION),
    (OperationInProgressError("x"), C.ABORTED),
    (errors.NoSpaceError("x"), C.RESOURCE_EXHAUSTED),
    (errors.StorageIOError("x"), C.UNAVAILABLE),
    (errors.BlockyardTimeoutError("x"), C.UNAVAILABLE),
    (errors.WalFullTimeoutError("x"), C.UNAVAILABLE),
    (errors.FlushTimeoutError("x"), C.UNAVAILABLE),
    (errors.VolumeClosedError("x"), C.UNAVAILABLE),
    (ServerStoppingError("x"), C.UNAVAILABLE),
    (errors.CorruptionError("x", volume="v", path="p", offset=0), C.DATA_LOSS),
    (errors.WalTruncatedError("x"), C.FAILED_PRECONDITION),
    (errors.FeedLostError("x"), C.FAILED_PRECONDITION),
    (errors.ReplicationGapError("x"), C.FAILED_PRECONDITION),
    (errors.NotPrimaryError("x"), C.FAILED_PRECONDITION),
    (errors.VolumeFailedError("x"), C.UNAVAILABLE),
    (errors.BlockyardError("x"), C.INTERNAL),
]


@pytest.mark.parametrize(("exc", "code"), CASES, ids=[type(e).__name__ for e, _ in CASES])
def test_status_for_maps_by_most_specific_type(exc: BaseException, code: grpc.StatusCode) -> None:
    assert status_for(exc) is code


def test_errors_outside_the_hierarchy_are_internal() -> None:
    assert status_for(KeyError("k")) is C.INTERNAL
    assert status_for(ValueError("v")) is C.INTERNAL


def test_subclass_without_entry_inherits_its_parents_code() -> None:
    class OddNotFound(errors.VolumeNotFoundError):
        pass

    assert status_for(OddNotFound("x")) is C.NOT_FOUND


def test_every_error_type_gets_a_more_specific_code_than_internal() -> None:
    """A new error type in errors.py must be placed in the table, not fall through to INTERNAL."""

    def walk(cls: type[errors.BlockyardError]) -> list[type[errors.BlockyardError]]:
        return [cls, *(c for sub in cls.__subclasses__() for c in walk(sub))]

    owned = ("blockyard.errors", "blockyard.server.backend")
    for cls in walk(errors.BlockyardError):
        if cls is errors.BlockyardError or cls.__module__ not in owned:
            continue
        entry = next(base for base in cls.__mro__ if base in STATUS_BY_ERROR)
        assert entry is not errors.BlockyardError, f"{cls.__name__} falls through to INTERNAL"


@pytest.mark.parametrize("code", list(ERROR_BY_STATUS))
def test_client_error_maps_back_to_the_same_code(code: grpc.StatusCode) -> None:
    err = error_for(code, "what went wrong; how to fix it")
    assert isinstance(err, errors.BlockyardError)
    assert str(err) == "what went wrong; how to fix it"
    assert status_for(err) is code or code is C.DEADLINE_EXCEEDED


def test_client_error_types_callers_catch() -> None:
    assert isinstance(error_for(C.NOT_FOUND, "m"), errors.NotFoundError)
    assert isinstance(error_for(C.ALREADY_EXISTS, "m"), errors.AlreadyExistsError)
    assert isinstance(error_for(C.INVALID_ARGUMENT, "m"), errors.InvalidArgumentError)
    assert isinstance(error_for(C.ABORTED, "m"), OperationInProgressError)
    assert isinstance(error_for(C.UNAVAILABLE, "m"), ServerUnavailableError)
    assert isinstance(error_for(C.DEADLINE_EXCEEDED, "m"), errors.BlockyardTimeoutError)


def test_unmapped_codes_name_the_code() -> None:
    err = error_for(C.DATA_LOSS, "checksum mismatch")
    assert type(err) is errors.BlockyardError
    assert "DATA_LOSS" in str(err) and "checksum mismatch" in str(err)
