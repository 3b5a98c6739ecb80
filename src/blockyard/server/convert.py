"""Protobuf messages ↔ the backend's dataclasses, both directions, in one place.

Enum fields left UNSPECIFIED (0) in a request are refused with InvalidArgumentError; a value
the server sends that this client does not know is refused the same way (a newer server).
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Final

from blockyard.engine.epoch import Role
from blockyard.errors import InvalidArgumentError
from blockyard.iscsi.chap import ChapCredentials
from blockyard.scsi.alua import AccessState
from blockyard.server.auth import credentials
from blockyard.server.backend import (
    AccessInfo,
    CapacityInfo,
    ExportInfo,
    HealthInfo,
    PortalInfo,
    SnapshotDescription,
    SnapshotRef,
    VolumeDescription,
)
from blockyard.server.proto import volume_server_pb2 as pb

ROLE_TO_PB: Final[dict[Role, pb.Role]] = {
    Role.NONE: pb.ROLE_NONE,
    Role.PRIMARY: pb.ROLE_PRIMARY,
    Role.REPLICA: pb.ROLE_REPLICA,
    Role.REBUILDING: pb.ROLE_REBUILDING,
}
ROLE_FROM_PB: Final[dict[int, Role]] = {int(v): k for k, v in ROLE_TO_PB.items()}

STATE_TO_PB: Final[dict[AccessState, pb.PortState]] = {
    AccessState.ACTIVE_OPTIMIZED: pb.PORT_STATE_ACTIVE_OPTIMIZED,
    AccessState.ACTIVE_NON_OPTIMIZED: pb.PORT_STATE_ACTIVE_NON_OPTIMIZED,
    AccessState.STANDBY: pb.PORT_STATE_STANDBY,
    AccessState.UNAVAILABLE: pb.PORT_STATE_UNAVAILABLE,
    AccessState.TRANSITIONING: pb.PORT_STATE_TRANSITIONING,
}
STATE_FROM_PB: Final[dict[int, AccessState]] = {int(v): k for k, v in STATE_TO_PB.items()}


def role_from_pb(value: int, field: str = "role") -> Role:
    role = ROLE_FROM_PB.get(value)
    if role is None:
        names = ", ".join(pb.Role.Name(v) for v in ROLE_TO_PB.values())
        raise InvalidArgumentError(f"{field} is required: use one of {names}")
    return role


def state_from_pb(value: int, field: str = "state") -> AccessState:
    state = STATE_FROM_PB.get(value)
    if state is None:
        names = ", ".join(pb.PortState.Name(v) for v in STATE_TO_PB.values())
        raise InvalidArgumentError(f"{field} is required: use one of {names}")
    return state


def source_from_pb(request_source: pb.SnapshotSource) -> SnapshotRef:
    return SnapshotRef(request_source.volume, request_source.snapshot)


def source_to_pb(source: SnapshotRef) -> pb.SnapshotSource:
    return pb.SnapshotSource(volume=source.volume, snapshot=source.snapshot)


def portal_to_pb(portal: PortalInfo) -> pb.Portal:
    return pb.Portal(
        host=portal.host,
        port=portal.port,
        portal_group_tag=portal.portal_group_tag,
        state=STATE_TO_PB[portal.state],
    )


def portal_from_pb(msg: pb.Portal) -> PortalInfo:
    return PortalInfo(msg.host, msg.port, msg.portal_group_tag, state_from_pb(msg.state))


def volume_to_pb(desc: VolumeDescription) -> pb.Volume:
    return pb.Volume(
        name=desc.name,
        uuid=str(desc.uuid),
        size_bytes=desc.size_bytes,
        role=ROLE_TO_PB[desc.role],
        epoch=desc.epoch,
        allocated_bytes=desc.allocated_bytes,
        snapshot_count=desc.snapshot_count,
        created_ns=desc.created_ns,
        export=pb.Export(
            portals=[portal_to_pb(p) for p in desc.export.portals],
            iqn=desc.export.iqn,
            lun=desc.export.lun,
            naa_id=desc.export.naa_id,
        ),
        access=access_to_pb(desc.access),
    )


def volume_from_pb(msg: pb.Volume) -> VolumeDescription:
    return VolumeDescription(
        name=msg.name,
        uuid=uuidlib.UUID(msg.uuid),
        size_bytes=msg.size_bytes,
        role=role_from_pb(msg.role),
        epoch=msg.epoch,
        allocated_bytes=msg.allocated_bytes,
        snapshot_count=msg.snapshot_count,
        created_ns=msg.created_ns,
        export=ExportInfo(
            tuple(portal_from_pb(p) for p in msg.export.portals),
            msg.export.iqn,
            msg.export.lun,
            msg.export.naa_id,
        ),
        access=access_from_pb(msg.access),
    )


def access_to_pb(info: AccessInfo) -> pb.Access:
    return pb.Access(
        chap_user=info.chap_user,
        mutual_chap_user=info.mutual_chap_user,
        restricted=info.restricted,
        allowed_initiators=list(info.allowed_initiators),
    )


def access_from_pb(msg: pb.Access) -> AccessInfo:
    return AccessInfo(
        chap_user=msg.chap_user,
        mutual_chap_user=msg.mutual_chap_user,
        restricted=msg.restricted,
        allowed_initiators=tuple(msg.allowed_initiators),
    )


def chap_to_pb(chap: ChapCredentials) -> pb.ChapSecret:
    return pb.ChapSecret(user=chap.name, secret=chap.secret)


def chap_from_pb(msg: pb.ChapSecret, field: str) -> ChapCredentials | None:
    """Credentials from a request (None when both parts are empty); the error names the field
    and never the secret."""
    return credentials(field, msg.user, msg.secret)


def snapshot_to_pb(desc: SnapshotDescription) -> pb.Snapshot:
    return pb.Snapshot(
        volume=desc.volume,
        name=desc.name,
        uuid=str(desc.uuid),
        size_bytes=desc.size_bytes,
        created_ns=desc.created_ns,
        delta_bytes=desc.delta_bytes,
    )


def snapshot_from_pb(msg: pb.Snapshot) -> SnapshotDescription:
    return SnapshotDescription(
        msg.volume,
        msg.name,
        uuidlib.UUID(msg.uuid),
        msg.size_bytes,
        msg.created_ns,
        msg.delta_bytes,
    )


def capacity_to_pb(info: CapacityInfo) -> pb.GetCapacityResponse:
    return pb.GetCapacityResponse(
        available_bytes=info.available_bytes,
        total_bytes=info.total_bytes,
        max_volume_size_bytes=info.max_volume_size_bytes,
        min_volume_size_bytes=info.min_volume_size_bytes,
    )


def capacity_from_pb(msg: pb.GetCapacityResponse) -> CapacityInfo:
    return CapacityInfo(
        msg.available_bytes,
        msg.total_bytes,
        msg.max_volume_size_bytes,
        msg.min_volume_size_bytes,
    )


def health_to_pb(info: HealthInfo) -> pb.HealthResponse:
    return pb.HealthResponse(
        serving=info.serving,
        volume_count=info.volume_count,
        portals=[portal_to_pb(p) for p in info.portals],
        version=info.version,
    )


def health_from_pb(msg: pb.HealthResponse) -> HealthInfo:
    return HealthInfo(
        msg.serving,
        msg.volume_count,
        tuple(portal_from_pb(p) for p in msg.portals),
        msg.version,
    )
