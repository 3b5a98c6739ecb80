"""The one translation from blockyard errors to CSI status codes.

CSI-specific errors (:mod:`blockyard.csi.errors`) come first, looked up along the raised
type's MRO; everything else takes the volume server's mapping
(:func:`blockyard.server.status.status_for`), which already gives the codes the CSI spec's
general error table asks for (ABORTED for an operation in progress, NOT_FOUND, ...).
"""

from __future__ import annotations

from typing import Final

import grpc

from blockyard.csi import errors as csi_errors
from blockyard.server.status import status_for

#: CSI spec "Error Scheme" and each RPC's error table.
CSI_STATUS_BY_ERROR: Final[dict[type[BaseException], grpc.StatusCode]] = {
    # ListVolumes/ListSnapshots errors: "Invalid starting_token | 10 ABORTED".
    csi_errors.InvalidStartingTokenError: grpc.StatusCode.ABORTED,
    # CreateVolume errors: "Unable to provision in accessible_topology | 8 RESOURCE_EXHAUSTED".
    csi_errors.TopologyUnsatisfiableError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    # CreateVolume/ControllerExpandVolume errors: "Unsupported capacity_range | 11 OUT_OF_RANGE".
    csi_errors.CapacityOutOfRangeError: grpc.StatusCode.OUT_OF_RANGE,
    # ControllerPublishVolume errors: "Volume published to another node | 9 FAILED_PRECONDITION".
    csi_errors.PublishConflictError: grpc.StatusCode.FAILED_PRECONDITION,
    # DeleteVolume errors: "Volume in use | 9 FAILED_PRECONDITION".
    csi_errors.VolumeInUseError: grpc.StatusCode.FAILED_PRECONDITION,
    csi_errors.IncompatibleVolumeError: grpc.StatusCode.ALREADY_EXISTS,
    csi_errors.UnknownObjectError: grpc.StatusCode.NOT_FOUND,
    csi_errors.StateFileError: grpc.StatusCode.INTERNAL,
    # Error Scheme: "Call not implemented | 12 UNIMPLEMENTED".
    csi_errors.UnsupportedOperationError: grpc.StatusCode.UNIMPLEMENTED,
}


def csi_status_for(exc: BaseException) -> grpc.StatusCode:
    """The CSI status code for ``exc``."""
    for cls in type(exc).__mro__:
        code = CSI_STATUS_BY_ERROR.get(cls)
        if code is not None:
            return code
    return status_for(exc)
