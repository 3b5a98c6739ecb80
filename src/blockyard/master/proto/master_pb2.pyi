from blockyard.server.proto import volume_server_pb2 as _volume_server_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ServerAddresses(_message.Message):
    __slots__ = ("iscsi_portals", "api", "replication")
    ISCSI_PORTALS_FIELD_NUMBER: _ClassVar[int]
    API_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_FIELD_NUMBER: _ClassVar[int]
    iscsi_portals: _containers.RepeatedScalarFieldContainer[str]
    api: str
    replication: str
    def __init__(self, iscsi_portals: _Optional[_Iterable[str]] = ..., api: _Optional[str] = ..., replication: _Optional[str] = ...) -> None: ...

class ReplicaReport(_message.Message):
    __slots__ = ("address", "in_sync", "connected", "phase", "acked_lsn", "resync_total_bytes", "resync_done_bytes")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    IN_SYNC_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ACKED_LSN_FIELD_NUMBER: _ClassVar[int]
    RESYNC_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESYNC_DONE_BYTES_FIELD_NUMBER: _ClassVar[int]
    address: str
    in_sync: bool
    connected: bool
    phase: str
    acked_lsn: int
    resync_total_bytes: int
    resync_done_bytes: int
    def __init__(self, address: _Optional[str] = ..., in_sync: _Optional[bool] = ..., connected: _Optional[bool] = ..., phase: _Optional[str] = ..., acked_lsn: _Optional[int] = ..., resync_total_bytes: _Optional[int] = ..., resync_done_bytes: _Optional[int] = ...) -> None: ...

class VolumeReport(_message.Message):
    __slots__ = ("name", "uuid", "size_bytes", "role", "epoch", "last_lsn", "durable_lsn", "data_state", "allocated_bytes", "replicas", "mode", "failed", "deleted", "iqn")
    NAME_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAST_LSN_FIELD_NUMBER: _ClassVar[int]
    DURABLE_LSN_FIELD_NUMBER: _ClassVar[int]
    DATA_STATE_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    IQN_FIELD_NUMBER: _ClassVar[int]
    name: str
    uuid: str
    size_bytes: int
    role: _volume_server_pb2.Role
    epoch: int
    last_lsn: int
    durable_lsn: int
    data_state: _volume_server_pb2.DataState
    allocated_bytes: int
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaReport]
    mode: _volume_server_pb2.DurabilityMode
    failed: bool
    deleted: bool
    iqn: str
    def __init__(self, name: _Optional[str] = ..., uuid: _Optional[str] = ..., size_bytes: _Optional[int] = ..., role: _Optional[_Union[_volume_server_pb2.Role, str]] = ..., epoch: _Optional[int] = ..., last_lsn: _Optional[int] = ..., durable_lsn: _Optional[int] = ..., data_state: _Optional[_Union[_volume_server_pb2.DataState, str]] = ..., allocated_bytes: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ReplicaReport, _Mapping]]] = ..., mode: _Optional[_Union[_volume_server_pb2.DurabilityMode, str]] = ..., failed: _Optional[bool] = ..., deleted: _Optional[bool] = ..., iqn: _Optional[str] = ...) -> None: ...

class ServerHeartbeat(_message.Message):
    __slots__ = ("server_id", "full", "addresses", "zone", "capacity_bytes", "free_bytes", "allocated_bytes", "volumes", "sent_mono_ns", "seq", "stopping")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    SENT_MONO_NS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    full: bool
    addresses: ServerAddresses
    zone: str
    capacity_bytes: int
    free_bytes: int
    allocated_bytes: int
    volumes: _containers.RepeatedCompositeFieldContainer[VolumeReport]
    sent_mono_ns: int
    seq: int
    stopping: bool
    def __init__(self, server_id: _Optional[str] = ..., full: _Optional[bool] = ..., addresses: _Optional[_Union[ServerAddresses, _Mapping]] = ..., zone: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., allocated_bytes: _Optional[int] = ..., volumes: _Optional[_Iterable[_Union[VolumeReport, _Mapping]]] = ..., sent_mono_ns: _Optional[int] = ..., seq: _Optional[int] = ..., stopping: _Optional[bool] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("volume", "uuid", "size_bytes", "role", "epoch", "replicas", "mode", "create", "deleted", "resync_limit_bps")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CREATE_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    RESYNC_LIMIT_BPS_FIELD_NUMBER: _ClassVar[int]
    volume: str
    uuid: str
    size_bytes: int
    role: _volume_server_pb2.Role
    epoch: int
    replicas: _containers.RepeatedScalarFieldContainer[str]
    mode: _volume_server_pb2.DurabilityMode
    create: bool
    deleted: bool
    resync_limit_bps: int
    def __init__(self, volume: _Optional[str] = ..., uuid: _Optional[str] = ..., size_bytes: _Optional[int] = ..., role: _Optional[_Union[_volume_server_pb2.Role, str]] = ..., epoch: _Optional[int] = ..., replicas: _Optional[_Iterable[str]] = ..., mode: _Optional[_Union[_volume_server_pb2.DurabilityMode, str]] = ..., create: _Optional[bool] = ..., deleted: _Optional[bool] = ..., resync_limit_bps: _Optional[int] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("volume", "epoch", "ttl_ms")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    volume: str
    epoch: int
    ttl_ms: int
    def __init__(self, volume: _Optional[str] = ..., epoch: _Optional[int] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class MasterReply(_message.Message):
    __slots__ = ("seq", "sent_mono_ns", "leases", "assignments", "send_full", "heartbeat_interval_ms", "master_id")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SENT_MONO_NS_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    SEND_FULL_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    MASTER_ID_FIELD_NUMBER: _ClassVar[int]
    seq: int
    sent_mono_ns: int
    leases: _containers.RepeatedCompositeFieldContainer[Lease]
    assignments: _containers.RepeatedCompositeFieldContainer[Assignment]
    send_full: bool
    heartbeat_interval_ms: int
    master_id: str
    def __init__(self, seq: _Optional[int] = ..., sent_mono_ns: _Optional[int] = ..., leases: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ..., assignments: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ..., send_full: _Optional[bool] = ..., heartbeat_interval_ms: _Optional[int] = ..., master_id: _Optional[str] = ...) -> None: ...

class CopyInfo(_message.Message):
    __slots__ = ("server_id", "role", "state", "durable_lsn", "addresses", "zone", "resync_total_bytes", "resync_done_bytes")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DURABLE_LSN_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    RESYNC_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESYNC_DONE_BYTES_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    role: _volume_server_pb2.Role
    state: str
    durable_lsn: int
    addresses: ServerAddresses
    zone: str
    resync_total_bytes: int
    resync_done_bytes: int
    def __init__(self, server_id: _Optional[str] = ..., role: _Optional[_Union[_volume_server_pb2.Role, str]] = ..., state: _Optional[str] = ..., durable_lsn: _Optional[int] = ..., addresses: _Optional[_Union[ServerAddresses, _Mapping]] = ..., zone: _Optional[str] = ..., resync_total_bytes: _Optional[int] = ..., resync_done_bytes: _Optional[int] = ...) -> None: ...

class VolumeInfo(_message.Message):
    __slots__ = ("name", "uuid", "size_bytes", "replica_count", "mode", "epoch", "status", "primary_server_id", "copies", "created_ns", "iqn", "parameters")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPLICA_COUNT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    CREATED_NS_FIELD_NUMBER: _ClassVar[int]
    IQN_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    uuid: str
    size_bytes: int
    replica_count: int
    mode: _volume_server_pb2.DurabilityMode
    epoch: int
    status: str
    primary_server_id: str
    copies: _containers.RepeatedCompositeFieldContainer[CopyInfo]
    created_ns: int
    iqn: str
    parameters: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., uuid: _Optional[str] = ..., size_bytes: _Optional[int] = ..., replica_count: _Optional[int] = ..., mode: _Optional[_Union[_volume_server_pb2.DurabilityMode, str]] = ..., epoch: _Optional[int] = ..., status: _Optional[str] = ..., primary_server_id: _Optional[str] = ..., copies: _Optional[_Iterable[_Union[CopyInfo, _Mapping]]] = ..., created_ns: _Optional[int] = ..., iqn: _Optional[str] = ..., parameters: _Optional[_Mapping[str, str]] = ...) -> None: ...

class MasterCreateVolumeRequest(_message.Message):
    __slots__ = ("name", "size_bytes", "replica_count", "mode", "zones", "parameters")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPLICA_COUNT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    ZONES_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    size_bytes: int
    replica_count: int
    mode: _volume_server_pb2.DurabilityMode
    zones: _containers.RepeatedScalarFieldContainer[str]
    parameters: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., replica_count: _Optional[int] = ..., mode: _Optional[_Union[_volume_server_pb2.DurabilityMode, str]] = ..., zones: _Optional[_Iterable[str]] = ..., parameters: _Optional[_Mapping[str, str]] = ...) -> None: ...

class MasterDeleteVolumeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class MasterDeleteVolumeResponse(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: _Optional[bool] = ...) -> None: ...

class MasterGetVolumeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class MasterListVolumesRequest(_message.Message):
    __slots__ = ("max_entries", "starting_token")
    MAX_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    STARTING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    max_entries: int
    starting_token: str
    def __init__(self, max_entries: _Optional[int] = ..., starting_token: _Optional[str] = ...) -> None: ...

class MasterListVolumesResponse(_message.Message):
    __slots__ = ("volumes", "next_token")
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    volumes: _containers.RepeatedCompositeFieldContainer[VolumeInfo]
    next_token: str
    def __init__(self, volumes: _Optional[_Iterable[_Union[VolumeInfo, _Mapping]]] = ..., next_token: _Optional[str] = ...) -> None: ...

class MasterExpandVolumeRequest(_message.Message):
    __slots__ = ("name", "size_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    size_bytes: int
    def __init__(self, name: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("server_id", "addresses", "zone", "state", "capacity_bytes", "free_bytes", "allocated_bytes", "primary_count", "replica_count", "last_heartbeat_ms_ago", "drain_remaining")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_COUNT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_MS_AGO_FIELD_NUMBER: _ClassVar[int]
    DRAIN_REMAINING_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    addresses: ServerAddresses
    zone: str
    state: str
    capacity_bytes: int
    free_bytes: int
    allocated_bytes: int
    primary_count: int
    replica_count: int
    last_heartbeat_ms_ago: int
    drain_remaining: int
    def __init__(self, server_id: _Optional[str] = ..., addresses: _Optional[_Union[ServerAddresses, _Mapping]] = ..., zone: _Optional[str] = ..., state: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., allocated_bytes: _Optional[int] = ..., primary_count: _Optional[int] = ..., replica_count: _Optional[int] = ..., last_heartbeat_ms_ago: _Optional[int] = ..., drain_remaining: _Optional[int] = ...) -> None: ...

class ListServersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListServersResponse(_message.Message):
    __slots__ = ("servers",)
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    servers: _containers.RepeatedCompositeFieldContainer[ServerInfo]
    def __init__(self, servers: _Optional[_Iterable[_Union[ServerInfo, _Mapping]]] = ...) -> None: ...

class DrainServerRequest(_message.Message):
    __slots__ = ("server_id",)
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    def __init__(self, server_id: _Optional[str] = ...) -> None: ...

class ForgetServerRequest(_message.Message):
    __slots__ = ("server_id",)
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    def __init__(self, server_id: _Optional[str] = ...) -> None: ...

class ForgetServerResponse(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: _Optional[bool] = ...) -> None: ...

class MarkOutOfSyncRequest(_message.Message):
    __slots__ = ("volume", "epoch", "server_id", "replica_address", "sent_mono_ns")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SENT_MONO_NS_FIELD_NUMBER: _ClassVar[int]
    volume: str
    epoch: int
    server_id: str
    replica_address: str
    sent_mono_ns: int
    def __init__(self, volume: _Optional[str] = ..., epoch: _Optional[int] = ..., server_id: _Optional[str] = ..., replica_address: _Optional[str] = ..., sent_mono_ns: _Optional[int] = ...) -> None: ...

class MarkOutOfSyncResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetLeaderRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeaderInfo(_message.Message):
    __slots__ = ("leader_id", "leader_address", "master_id", "is_leader", "store", "promotions_allowed", "lease_ttl_ms")
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MASTER_ID_FIELD_NUMBER: _ClassVar[int]
    IS_LEADER_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    PROMOTIONS_ALLOWED_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    leader_id: str
    leader_address: str
    master_id: str
    is_leader: bool
    store: str
    promotions_allowed: bool
    lease_ttl_ms: int
    def __init__(self, leader_id: _Optional[str] = ..., leader_address: _Optional[str] = ..., master_id: _Optional[str] = ..., is_leader: _Optional[bool] = ..., store: _Optional[str] = ..., promotions_allowed: _Optional[bool] = ..., lease_ttl_ms: _Optional[int] = ...) -> None: ...
