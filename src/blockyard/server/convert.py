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
from blockyard.replication.commit import DurabilityMode
from blockyard.replication.messages import ReplicaDataState
from blockyard.replication.report import ReplicaReport, ReplicationInfo
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
        replication_address=info.replication_address,
    )


def health_from_pb(msg: pb.HealthResponse) -> HealthInfo:
    return HealthInfo(
        msg.serving,
        msg.volume_count,
        tuple(portal_from_pb(p) for p in msg.portals),
        msg.version,
        msg.replication_address,
    )


MODE_TO_PB: Final[dict[DurabilityMode, pb.DurabilityMode]] = {
    DurabilityMode.BEST_EFFORT: pb.DURABILITY_MODE_BEST_EFFORT,
    DurabilityMode.SYNC_ALL: pb.DURABILITY_MODE_SYNC_ALL,
    DurabilityMode.SYNC_QUORUM: pb.DURABILITY_MODE_SYNC_QUORUM,
}
MODE_FROM_PB: Final[dict[int, DurabilityMode]] = {int(v): k for k, v in MODE_TO_PB.items()}
DATA_STATE_TO_PB: Final[dict[ReplicaDataState, pb.DataState]] = {
    ReplicaDataState.EMPTY: pb.DATA_STATE_EMPTY,
    ReplicaDataState.CONSISTENT: pb.DATA_STATE_CONSISTENT,
    ReplicaDataState.RESYNCING: pb.DATA_STATE_RESYNCING,
}
DATA_STATE_FROM_PB: Final[dict[int, ReplicaDataState]] = {
    int(v): k for k, v in DATA_STATE_TO_PB.items()
}
_BLOCK_BYTES: Final = 4096


def uuid_from_pb(text: str, field: str = "uuid") -> uuidlib.UUID:
    try:
        return uuidlib.UUID(text)
    except ValueError:
        raise InvalidArgumentError(
            f"{field} {text[:64]!r} is not a UUID; pass the primary volume's UUID as shown by "
            "GetVolume (e.g. 0b1c...-...)"
        ) from None


def mode_from_pb(value: int, field: str = "mode") -> DurabilityMode:
    mode = MODE_FROM_PB.get(value)
    if mode is None:
        names = ", ".join(pb.DurabilityMode.Name(v) for v in MODE_TO_PB.values())
        raise InvalidArgumentError(f"{field} is required: use one of {names}")
    return mode


def replication_to_pb(info: ReplicationInfo) -> pb.ReplicationState:
    return pb.ReplicationState(
        name=info.name,
        role=ROLE_TO_PB[info.role],
        epoch=info.epoch,
        mode=pb.DURABILITY_MODE_UNSPECIFIED if info.mode is None else MODE_TO_PB[info.mode],
        last_lsn=max(info.last_lsn, 0),
        durable_lsn=max(info.durable_lsn, 0),
        data_state=(
            pb.DATA_STATE_UNSPECIFIED
            if info.data_state is None
            else DATA_STATE_TO_PB[info.data_state]
        ),
        primary_connected=info.primary_connected,
        resync_limit_bps=info.resync_limit_bps,
        replicas=[
            pb.ReplicaStatus(
                address=r.address,
                state=r.state,
                in_sync=r.in_sync,
                connected=r.connected,
                phase=r.phase,
                plan=r.plan,
                plan_reason=r.plan_reason,
                acked_lsn=max(r.acked_lsn, 0),
                lag_lsns=r.lag_lsns,
                resync_total_bytes=r.resync_total_blocks * _BLOCK_BYTES,
                resync_done_bytes=r.resync_done_blocks * _BLOCK_BYTES,
                resync_sent_bytes=r.resync_bytes,
                resync_eta_s=r.resync_eta_s,
                last_error=r.last_error[:1024],
            )
            for r in info.replicas
        ],
    )


def replication_from_pb(msg: pb.ReplicationState) -> ReplicationInfo:
    return ReplicationInfo(
        name=msg.name,
        role=role_from_pb(msg.role),
        epoch=msg.epoch,
        mode=MODE_FROM_PB.get(msg.mode),
        last_lsn=msg.last_lsn,
        durable_lsn=msg.durable_lsn,
        data_state=DATA_STATE_FROM_PB.get(msg.data_state),
        primary_connected=msg.primary_connected,
        replicas=tuple(
            ReplicaReport(
                address=r.address,
                state=r.state,
                in_sync=r.in_sync,
                connected=r.connected,
                phase=r.phase,
                plan=r.plan,
                plan_reason=r.plan_reason,
                acked_lsn=r.acked_lsn,
                lag_lsns=r.lag_lsns,
                resync_total_blocks=r.resync_total_bytes // _BLOCK_BYTES,
                resync_done_blocks=r.resync_done_bytes // _BLOCK_BYTES,
                resync_bytes=r.resync_sent_bytes,
                resync_eta_s=r.resync_eta_s,
                last_error=r.last_error,
            )
            for r in msg.replicas
        ),
        resync_limit_bps=msg.resync_limit_bps,
    )
