from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_NONE: _ClassVar[Role]
    ROLE_PRIMARY: _ClassVar[Role]
    ROLE_REPLICA: _ClassVar[Role]
    ROLE_REBUILDING: _ClassVar[Role]

class PortState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PORT_STATE_UNSPECIFIED: _ClassVar[PortState]
    PORT_STATE_ACTIVE_OPTIMIZED: _ClassVar[PortState]
    PORT_STATE_ACTIVE_NON_OPTIMIZED: _ClassVar[PortState]
    PORT_STATE_STANDBY: _ClassVar[PortState]
    PORT_STATE_UNAVAILABLE: _ClassVar[PortState]
    PORT_STATE_TRANSITIONING: _ClassVar[PortState]

class DurabilityMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DURABILITY_MODE_UNSPECIFIED: _ClassVar[DurabilityMode]
    DURABILITY_MODE_BEST_EFFORT: _ClassVar[DurabilityMode]
    DURABILITY_MODE_SYNC_ALL: _ClassVar[DurabilityMode]
    DURABILITY_MODE_SYNC_QUORUM: _ClassVar[DurabilityMode]

class DataState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_STATE_UNSPECIFIED: _ClassVar[DataState]
    DATA_STATE_EMPTY: _ClassVar[DataState]
    DATA_STATE_CONSISTENT: _ClassVar[DataState]
    DATA_STATE_RESYNCING: _ClassVar[DataState]
ROLE_UNSPECIFIED: Role
ROLE_NONE: Role
ROLE_PRIMARY: Role
ROLE_REPLICA: Role
ROLE_REBUILDING: Role
PORT_STATE_UNSPECIFIED: PortState
PORT_STATE_ACTIVE_OPTIMIZED: PortState
PORT_STATE_ACTIVE_NON_OPTIMIZED: PortState
PORT_STATE_STANDBY: PortState
PORT_STATE_UNAVAILABLE: PortState
PORT_STATE_TRANSITIONING: PortState
DURABILITY_MODE_UNSPECIFIED: DurabilityMode
DURABILITY_MODE_BEST_EFFORT: DurabilityMode
DURABILITY_MODE_SYNC_ALL: DurabilityMode
DURABILITY_MODE_SYNC_QUORUM: DurabilityMode
DATA_STATE_UNSPECIFIED: DataState
DATA_STATE_EMPTY: DataState
DATA_STATE_CONSISTENT: DataState
DATA_STATE_RESYNCING: DataState

class Portal(_message.Message):
    __slots__ = ("host", "port", "portal_group_tag", "state")
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PORTAL_GROUP_TAG_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    host: str
    port: int
    portal_group_tag: int
    state: PortState
    def __init__(self, host: _Optional[str] = ..., port: _Optional[int] = ..., portal_group_tag: _Optional[int] = ..., state: _Optional[_Union[PortState, str]] = ...) -> None: ...

class Export(_message.Message):
    __slots__ = ("portals", "iqn", "lun", "naa_id")
    PORTALS_FIELD_NUMBER: _ClassVar[int]
    IQN_FIELD_NUMBER: _ClassVar[int]
    LUN_FIELD_NUMBER: _ClassVar[int]
    NAA_ID_FIELD_NUMBER: _ClassVar[int]
    portals: _containers.RepeatedCompositeFieldContainer[Portal]
    iqn: str
    lun: int
    naa_id: str
    def __init__(self, portals: _Optional[_Iterable[_Union[Portal, _Mapping]]] = ..., iqn: _Optional[str] = ..., lun: _Optional[int] = ..., naa_id: _Optional[str] = ...) -> None: ...

class Access(_message.Message):
    __slots__ = ("chap_user", "mutual_chap_user", "restricted", "allowed_initiators")
    CHAP_USER_FIELD_NUMBER: _ClassVar[int]
    MUTUAL_CHAP_USER_FIELD_NUMBER: _ClassVar[int]
    RESTRICTED_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_INITIATORS_FIELD_NUMBER: _ClassVar[int]
    chap_user: str
    mutual_chap_user: str
    restricted: bool
    allowed_initiators: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, chap_user: _Optional[str] = ..., mutual_chap_user: _Optional[str] = ..., restricted: _Optional[bool] = ..., allowed_initiators: _Optional[_Iterable[str]] = ...) -> None: ...

class Volume(_message.Message):
    __slots__ = ("name", "uuid", "size_bytes", "role", "epoch", "allocated_bytes", "snapshot_count", "created_ns", "export", "access")
    NAME_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATED_NS_FIELD_NUMBER: _ClassVar[int]
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    ACCESS_FIELD_NUMBER: _ClassVar[int]
    name: str
    uuid: str
    size_bytes: int
    role: Role
    epoch: int
    allocated_bytes: int
    snapshot_count: int
    created_ns: int
    export: Export
    access: Access
    def __init__(self, name: _Optional[str] = ..., uuid: _Optional[str] = ..., size_bytes: _Optional[int] = ..., role: _Optional[_Union[Role, str]] = ..., epoch: _Optional[int] = ..., allocated_bytes: _Optional[int] = ..., snapshot_count: _Optional[int] = ..., created_ns: _Optional[int] = ..., export: _Optional[_Union[Export, _Mapping]] = ..., access: _Optional[_Union[Access, _Mapping]] = ...) -> None: ...

class SnapshotSource(_message.Message):
    __slots__ = ("volume", "snapshot")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    volume: str
    snapshot: str
    def __init__(self, volume: _Optional[str] = ..., snapshot: _Optional[str] = ...) -> None: ...

class CreateVolumeRequest(_message.Message):
    __slots__ = ("name", "size_bytes", "source", "uuid")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    name: str
    size_bytes: int
    source: SnapshotSource
    uuid: str
    def __init__(self, name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., source: _Optional[_Union[SnapshotSource, _Mapping]] = ..., uuid: _Optional[str] = ...) -> None: ...

class DeleteVolumeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteVolumeResponse(_message.Message):
    __slots__ = ("existed", "sessions_dropped")
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    sessions_dropped: int
    def __init__(self, existed: _Optional[bool] = ..., sessions_dropped: _Optional[int] = ...) -> None: ...

class GetVolumeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListVolumesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListVolumesResponse(_message.Message):
    __slots__ = ("volumes", "next_page_token")
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    volumes: _containers.RepeatedCompositeFieldContainer[Volume]
    next_page_token: str
    def __init__(self, volumes: _Optional[_Iterable[_Union[Volume, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ExpandVolumeRequest(_message.Message):
    __slots__ = ("name", "size_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    size_bytes: int
    def __init__(self, name: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("volume", "name", "uuid", "size_bytes", "created_ns", "delta_bytes")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_NS_FIELD_NUMBER: _ClassVar[int]
    DELTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    volume: str
    name: str
    uuid: str
    size_bytes: int
    created_ns: int
    delta_bytes: int
    def __init__(self, volume: _Optional[str] = ..., name: _Optional[str] = ..., uuid: _Optional[str] = ..., size_bytes: _Optional[int] = ..., created_ns: _Optional[int] = ..., delta_bytes: _Optional[int] = ...) -> None: ...

class CreateSnapshotRequest(_message.Message):
    __slots__ = ("volume", "name")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    volume: str
    name: str
    def __init__(self, volume: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class DeleteSnapshotRequest(_message.Message):
    __slots__ = ("volume", "name")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    volume: str
    name: str
    def __init__(self, volume: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class DeleteSnapshotResponse(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: _Optional[bool] = ...) -> None: ...

class ListSnapshotsRequest(_message.Message):
    __slots__ = ("volume",)
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    volume: str
    def __init__(self, volume: _Optional[str] = ...) -> None: ...

class ListSnapshotsResponse(_message.Message):
    __slots__ = ("snapshots",)
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    snapshots: _containers.RepeatedCompositeFieldContainer[Snapshot]
    def __init__(self, snapshots: _Optional[_Iterable[_Union[Snapshot, _Mapping]]] = ...) -> None: ...

class CloneVolumeRequest(_message.Message):
    __slots__ = ("name", "source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    source: SnapshotSource
    def __init__(self, name: _Optional[str] = ..., source: _Optional[_Union[SnapshotSource, _Mapping]] = ...) -> None: ...

class SetVolumeRoleRequest(_message.Message):
    __slots__ = ("name", "role", "epoch")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: Role
    epoch: int
    def __init__(self, name: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., epoch: _Optional[int] = ...) -> None: ...

class SetPortStateRequest(_message.Message):
    __slots__ = ("volume", "portal_group_tag", "state")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    PORTAL_GROUP_TAG_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    volume: str
    portal_group_tag: int
    state: PortState
    def __init__(self, volume: _Optional[str] = ..., portal_group_tag: _Optional[int] = ..., state: _Optional[_Union[PortState, str]] = ...) -> None: ...

class GetCapacityRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetCapacityResponse(_message.Message):
    __slots__ = ("available_bytes", "total_bytes", "max_volume_size_bytes", "min_volume_size_bytes")
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_VOLUME_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIN_VOLUME_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    available_bytes: int
    total_bytes: int
    max_volume_size_bytes: int
    min_volume_size_bytes: int
    def __init__(self, available_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., max_volume_size_bytes: _Optional[int] = ..., min_volume_size_bytes: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("serving", "volume_count", "portals", "version", "replication_address")
    SERVING_FIELD_NUMBER: _ClassVar[int]
    VOLUME_COUNT_FIELD_NUMBER: _ClassVar[int]
    PORTALS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    serving: bool
    volume_count: int
    portals: _containers.RepeatedCompositeFieldContainer[Portal]
    version: str
    replication_address: str
    def __init__(self, serving: _Optional[bool] = ..., volume_count: _Optional[int] = ..., portals: _Optional[_Iterable[_Union[Portal, _Mapping]]] = ..., version: _Optional[str] = ..., replication_address: _Optional[str] = ...) -> None: ...

class SetReplicationRequest(_message.Message):
    __slots__ = ("name", "role", "epoch", "mode", "replicas", "resync_limit_bps")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    RESYNC_LIMIT_BPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: Role
    epoch: int
    mode: DurabilityMode
    replicas: _containers.RepeatedScalarFieldContainer[str]
    resync_limit_bps: int
    def __init__(self, name: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., epoch: _Optional[int] = ..., mode: _Optional[_Union[DurabilityMode, str]] = ..., replicas: _Optional[_Iterable[str]] = ..., resync_limit_bps: _Optional[int] = ...) -> None: ...

class GetReplicationRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ChecksumVolumeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ChecksumVolumeResponse(_message.Message):
    __slots__ = ("sha256", "size_bytes", "last_lsn")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_LSN_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size_bytes: int
    last_lsn: int
    def __init__(self, sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., last_lsn: _Optional[int] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("address", "state", "in_sync", "connected", "phase", "plan", "plan_reason", "acked_lsn", "lag_lsns", "resync_total_bytes", "resync_done_bytes", "resync_sent_bytes", "resync_eta_s", "last_error")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    IN_SYNC_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PLAN_REASON_FIELD_NUMBER: _ClassVar[int]
    ACKED_LSN_FIELD_NUMBER: _ClassVar[int]
    LAG_LSNS_FIELD_NUMBER: _ClassVar[int]
    RESYNC_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESYNC_DONE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESYNC_SENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESYNC_ETA_S_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    address: str
    state: str
    in_sync: bool
    connected: bool
    phase: str
    plan: str
    plan_reason: str
    acked_lsn: int
    lag_lsns: int
    resync_total_bytes: int
    resync_done_bytes: int
    resync_sent_bytes: int
    resync_eta_s: float
    last_error: str
    def __init__(self, address: _Optional[str] = ..., state: _Optional[str] = ..., in_sync: _Optional[bool] = ..., connected: _Optional[bool] = ..., phase: _Optional[str] = ..., plan: _Optional[str] = ..., plan_reason: _Optional[str] = ..., acked_lsn: _Optional[int] = ..., lag_lsns: _Optional[int] = ..., resync_total_bytes: _Optional[int] = ..., resync_done_bytes: _Optional[int] = ..., resync_sent_bytes: _Optional[int] = ..., resync_eta_s: _Optional[float] = ..., last_error: _Optional[str] = ...) -> None: ...

class ReplicationState(_message.Message):
    __slots__ = ("name", "role", "epoch", "mode", "last_lsn", "durable_lsn", "data_state", "primary_connected", "replicas", "resync_limit_bps")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    LAST_LSN_FIELD_NUMBER: _ClassVar[int]
    DURABLE_LSN_FIELD_NUMBER: _ClassVar[int]
    DATA_STATE_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    RESYNC_LIMIT_BPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: Role
    epoch: int
    mode: DurabilityMode
    last_lsn: int
    durable_lsn: int
    data_state: DataState
    primary_connected: bool
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    resync_limit_bps: int
    def __init__(self, name: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., epoch: _Optional[int] = ..., mode: _Optional[_Union[DurabilityMode, str]] = ..., last_lsn: _Optional[int] = ..., durable_lsn: _Optional[int] = ..., data_state: _Optional[_Union[DataState, str]] = ..., primary_connected: _Optional[bool] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ..., resync_limit_bps: _Optional[int] = ...) -> None: ...

class ChapSecret(_message.Message):
    __slots__ = ("user", "secret")
    USER_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    user: str
    secret: bytes
    def __init__(self, user: _Optional[str] = ..., secret: _Optional[bytes] = ...) -> None: ...

class SetVolumeAuthRequest(_message.Message):
    __slots__ = ("name", "chap", "mutual_chap")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHAP_FIELD_NUMBER: _ClassVar[int]
    MUTUAL_CHAP_FIELD_NUMBER: _ClassVar[int]
    name: str
    chap: ChapSecret
    mutual_chap: ChapSecret
    def __init__(self, name: _Optional[str] = ..., chap: _Optional[_Union[ChapSecret, _Mapping]] = ..., mutual_chap: _Optional[_Union[ChapSecret, _Mapping]] = ...) -> None: ...

class SetVolumeAccessRequest(_message.Message):
    __slots__ = ("name", "restricted", "allowed_initiators")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RESTRICTED_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_INITIATORS_FIELD_NUMBER: _ClassVar[int]
    name: str
    restricted: bool
    allowed_initiators: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., restricted: _Optional[bool] = ..., allowed_initiators: _Optional[_Iterable[str]] = ...) -> None: ...

class InitiatorRequest(_message.Message):
    __slots__ = ("name", "initiator_name")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INITIATOR_NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    initiator_name: str
    def __init__(self, name: _Optional[str] = ..., initiator_name: _Optional[str] = ...) -> None: ...
