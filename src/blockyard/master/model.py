"""The master's records and their JSON codec.

A record is what the store keeps: :class:`ServerRecord` under ``servers/<id>`` and
:class:`VolumeRecord` under ``volumes/<name>``. Records are frozen; a change is a new record,
written to the store before the master acts on it. The store assigns each key a version; it is
not part of the encoded bytes (see :mod:`blockyard.master.store`).

The encoding is JSON (UTF-8) with a ``format`` field. A reader refuses a newer format and any
field outside its bounds with :class:`~blockyard.errors.InvalidArgumentError` naming the key and
the field, so a damaged or future record is reported, never half-used.
"""

from __future__ import annotations

import enum
import json
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Final, TypeVar

from blockyard.engine.epoch import Role
from blockyard.engine.limits import MAX_VOLUME_SIZE_BYTES
from blockyard.errors import InvalidArgumentError
from blockyard.replication.commit import DurabilityMode

_E = TypeVar("_E", bound=enum.Enum)

#: Version of the encoding; readers refuse records with a higher one.
FORMAT_VERSION: Final = 1
#: Bounds on what a record may hold (a record is one store value; etcd's default request limit
#: is 1.5 MiB, so records stay far below it).
MAX_RECORD_BYTES: Final = 256 * 1024
MAX_COPIES: Final = 5
MAX_PARAMETERS: Final = 64
MAX_TEXT_CHARS: Final = 256
MAX_PORTALS: Final = 16
MAX_PENDING_MARKS: Final = MAX_COPIES
#: Largest value a proto uint64 field carries (epochs, LSNs, byte counts).
UINT64_MAX: Final = (1 << 64) - 1


class ServerState(enum.Enum):
    """A server's state. ``alive``/``suspect``/``dead`` are liveness, judged by the master from
    heartbeats; ``draining`` is an operator's decision and is persisted."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    DRAINING = "draining"


class VolumeStatus(enum.Enum):
    #: Copies are being created; no assignment has gone out yet.
    PENDING = "pending"
    #: Every copy is placed and in sync.
    ACTIVE = "active"
    #: Fewer in-sync copies than the replica count (a copy is missing, rebuilding or behind).
    DEGRADED = "degraded"
    #: Copies are being deleted; the record goes once every copy is gone.
    DELETING = "deleting"


class CopyState(enum.Enum):
    IN_SYNC = "in_sync"
    OUT_OF_SYNC = "out_of_sync"
    REBUILDING = "rebuilding"
    #: Placed but not created (or not confirmed) yet.
    PENDING = "pending"


#: Allowed copy state changes. PENDING → REBUILDING is the sw-block "None → Rebuilding" case: a
#: copy placed on a fresh server starts as a rebuild target without ever having been in sync.
COPY_TRANSITIONS: Final[Mapping[CopyState, frozenset[CopyState]]] = {
    CopyState.PENDING: frozenset(
        {CopyState.PENDING, CopyState.IN_SYNC, CopyState.REBUILDING, CopyState.OUT_OF_SYNC}
    ),
    CopyState.IN_SYNC: frozenset({CopyState.IN_SYNC, CopyState.OUT_OF_SYNC, CopyState.REBUILDING}),
    CopyState.OUT_OF_SYNC: frozenset(
        {CopyState.OUT_OF_SYNC, CopyState.REBUILDING, CopyState.IN_SYNC}
    ),
    CopyState.REBUILDING: frozenset(
        {CopyState.REBUILDING, CopyState.IN_SYNC, CopyState.OUT_OF_SYNC}
    ),
}


def check_copy_transition(volume: str, server_id: str, old: CopyState, new: CopyState) -> None:
    if new not in COPY_TRANSITIONS[old]:
        raise InvalidArgumentError(
            f"volume {volume!r}: the copy on server {server_id} cannot go from {old.value} to "
            f"{new.value}"
        )


@dataclass(frozen=True, slots=True)
class ServerAddresses:
    iscsi_portals: tuple[str, ...] = ()
    api: str = ""
    replication: str = ""


@dataclass(frozen=True, slots=True)
class ServerRecord:
    server_id: str
    addresses: ServerAddresses
    zone: str = ""
    capacity_bytes: int = 0
    free_bytes: int = 0
    allocated_bytes: int = 0
    state: ServerState = ServerState.ALIVE
    registered_ns: int = 0


@dataclass(frozen=True, slots=True)
class CopyRecord:
    server_id: str
    role: Role
    state: CopyState
    #: As last persisted (the master keeps the live value from heartbeats in memory).
    durable_lsn: int = 0


@dataclass(frozen=True, slots=True)
class VolumeRecord:
    name: str
    uuid: str
    size_bytes: int
    replica_count: int
    mode: DurabilityMode
    epoch: int
    status: VolumeStatus
    #: Server id of the primary copy; "" while none is chosen.
    primary: str
    copies: tuple[CopyRecord, ...]
    created_ns: int = 0
    parameters: Mapping[str, str] = field(default_factory=dict)
    #: Replication addresses a primary marked out of sync (MarkOutOfSync) that matched no copy
    #: when the mark was written: kept so the mark is applied if that copy appears.
    pending_out_of_sync: tuple[str, ...] = ()

    def copy_on(self, server_id: str) -> CopyRecord | None:
        for c in self.copies:
            if c.server_id == server_id:
                return c
        return None

    @property
    def server_ids(self) -> tuple[str, ...]:
        return tuple(c.server_id for c in self.copies)

    def with_copy(self, copy: CopyRecord) -> VolumeRecord:
        """This record with the copy on ``copy.server_id`` replaced (or added)."""
        copies = [c for c in self.copies if c.server_id != copy.server_id]
        copies.append(copy)
        return replace(self, copies=tuple(copies))

    def without_copy(self, server_id: str) -> VolumeRecord:
        return replace(self, copies=tuple(c for c in self.copies if c.server_id != server_id))

    def in_sync_count(self) -> int:
        return sum(1 for c in self.copies if c.state is CopyState.IN_SYNC)

    def settled_status(self) -> VolumeStatus:
        """Active or degraded from the copies (a pending or deleting record keeps its
        status)."""
        if self.status in (VolumeStatus.PENDING, VolumeStatus.DELETING):
            return self.status
        full = len(self.copies) >= self.replica_count
        return (
            VolumeStatus.ACTIVE
            if full and self.in_sync_count() >= self.replica_count
            else (VolumeStatus.DEGRADED)
        )


# ---- validation -------------------------------------------------------------------------------


def _check_text(what: str, value: object, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT_CHARS:
        raise InvalidArgumentError(f"{what} is longer than {MAX_TEXT_CHARS} characters")
    if not allow_empty and not value:
        raise InvalidArgumentError(f"{what} is empty")
    return value


def _check_uint(what: str, value: object, maximum: int = UINT64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise InvalidArgumentError(f"{what} must be an integer from 0 to {maximum}, got {value!r}")
    return value


def validate_server(rec: ServerRecord, where: str = "") -> ServerRecord:
    where = where or f"server record {rec.server_id!r}"
    _check_text(f"{where}: server_id", rec.server_id, allow_empty=False)
    _check_text(f"{where}: zone", rec.zone)
    if len(rec.addresses.iscsi_portals) > MAX_PORTALS:
        raise InvalidArgumentError(f"{where}: more than {MAX_PORTALS} iSCSI portals")
    for p in rec.addresses.iscsi_portals:
        _check_text(f"{where}: iSCSI portal", p, allow_empty=False)
    _check_text(f"{where}: api address", rec.addresses.api)
    _check_text(f"{where}: replication address", rec.addresses.replication)
    for name in ("capacity_bytes", "free_bytes", "allocated_bytes", "registered_ns"):
        _check_uint(f"{where}: {name}", getattr(rec, name))
    return rec


def validate_volume(rec: VolumeRecord, where: str = "") -> VolumeRecord:
    where = where or f"volume record {rec.name!r}"
    _check_text(f"{where}: name", rec.name, allow_empty=False)
    try:
        uuidlib.UUID(rec.uuid)
    except (ValueError, TypeError, AttributeError):
        raise InvalidArgumentError(f"{where}: uuid {rec.uuid!r} is not a UUID") from None
    _check_uint(f"{where}: size_bytes", rec.size_bytes, MAX_VOLUME_SIZE_BYTES)
    if not 1 <= rec.replica_count <= MAX_COPIES:
        raise InvalidArgumentError(
            f"{where}: replica_count {rec.replica_count} is out of range: use 1 to {MAX_COPIES}"
        )
    _check_uint(f"{where}: epoch", rec.epoch)
    _check_uint(f"{where}: created_ns", rec.created_ns)
    if len(rec.copies) > MAX_COPIES:
        raise InvalidArgumentError(f"{where}: more than {MAX_COPIES} copies")
    seen: set[str] = set()
    for c in rec.copies:
        _check_text(f"{where}: copy server_id", c.server_id, allow_empty=False)
        _check_uint(f"{where}: copy durable_lsn", c.durable_lsn)
        if c.server_id in seen:
            raise InvalidArgumentError(
                f"{where}: two copies on server {c.server_id}; copies of a volume must be on "
                "different servers"
            )
        seen.add(c.server_id)
    primaries = [c.server_id for c in rec.copies if c.role is Role.PRIMARY]
    if len(primaries) > 1:
        raise InvalidArgumentError(f"{where}: more than one primary copy ({primaries})")
    if rec.primary and rec.primary not in seen:
        raise InvalidArgumentError(f"{where}: primary {rec.primary} holds no copy")
    if primaries and primaries[0] != rec.primary:
        raise InvalidArgumentError(
            f"{where}: copy on {primaries[0]} has role primary but the primary is "
            f"{rec.primary or 'unset'}"
        )
    if len(rec.parameters) > MAX_PARAMETERS:
        raise InvalidArgumentError(f"{where}: more than {MAX_PARAMETERS} parameters")
    for k, v in rec.parameters.items():
        _check_text(f"{where}: parameter name", k, allow_empty=False)
        _check_text(f"{where}: parameter {k!r}", v)
    if len(rec.pending_out_of_sync) > MAX_PENDING_MARKS:
        raise InvalidArgumentError(f"{where}: more than {MAX_PENDING_MARKS} pending marks")
    for a in rec.pending_out_of_sync:
        _check_text(f"{where}: pending out-of-sync address", a, allow_empty=False)
    return rec


# ---- codec ------------------------------------------------------------------------------------


def encode_server(rec: ServerRecord) -> bytes:
    validate_server(rec)
    doc = {
        "format": FORMAT_VERSION,
        "server_id": rec.server_id,
        "addresses": {
            "iscsi_portals": list(rec.addresses.iscsi_portals),
            "api": rec.addresses.api,
            "replication": rec.addresses.replication,
        },
        "zone": rec.zone,
        "capacity_bytes": rec.capacity_bytes,
        "free_bytes": rec.free_bytes,
        "allocated_bytes": rec.allocated_bytes,
        "state": rec.state.value,
        "registered_ns": rec.registered_ns,
    }
    return _dump(doc, f"server record {rec.server_id!r}")


def encode_volume(rec: VolumeRecord) -> bytes:
    validate_volume(rec)
    doc = {
        "format": FORMAT_VERSION,
        "name": rec.name,
        "uuid": rec.uuid,
        "size_bytes": rec.size_bytes,
        "replica_count": rec.replica_count,
        "mode": rec.mode.value,
        "epoch": rec.epoch,
        "status": rec.status.value,
        "primary": rec.primary,
        "copies": [
            {
                "server_id": c.server_id,
                "role": c.role.name.lower(),
                "state": c.state.value,
                "durable_lsn": c.durable_lsn,
            }
            for c in rec.copies
        ],
        "created_ns": rec.created_ns,
        "parameters": dict(sorted(rec.parameters.items())),
        "pending_out_of_sync": list(rec.pending_out_of_sync),
    }
    return _dump(doc, f"volume record {rec.name!r}")


def _dump(doc: dict[str, object], what: str) -> bytes:
    data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    if len(data) > MAX_RECORD_BYTES:
        raise InvalidArgumentError(f"{what} encodes to {len(data)} bytes, over {MAX_RECORD_BYTES}")
    return data


class _Doc:
    """Typed access to a decoded JSON object; every failure names the record and field."""

    def __init__(self, what: str, raw: object) -> None:
        if not isinstance(raw, dict):
            raise InvalidArgumentError(f"{what} is not a JSON object")
        self.what = what
        self.raw: dict[str, object] = raw

    def get(self, key: str) -> object:
        if key not in self.raw:
            raise InvalidArgumentError(f"{self.what} has no field {key!r}")
        return self.raw[key]

    def text(self, key: str) -> str:
        return _check_text(f"{self.what}: {key}", self.get(key))

    def uint(self, key: str, maximum: int = UINT64_MAX) -> int:
        return _check_uint(f"{self.what}: {key}", self.get(key), maximum)

    def enum(self, key: str, cls: type[_E]) -> _E:
        value = self.get(key)
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(str(m.value) for m in cls)
            raise InvalidArgumentError(
                f"{self.what}: {key} {value!r} is not one of {allowed}"
            ) from None

    def sub(self, key: str) -> _Doc:
        return _Doc(f"{self.what}: {key}", self.get(key))

    def items(self, key: str, limit: int) -> list[object]:
        value = self.get(key)
        if not isinstance(value, list):
            raise InvalidArgumentError(f"{self.what}: {key} is not a list")
        if len(value) > limit:
            raise InvalidArgumentError(f"{self.what}: {key} has more than {limit} entries")
        return value


def _load(data: bytes, what: str) -> _Doc:
    if len(data) > MAX_RECORD_BYTES:
        raise InvalidArgumentError(f"{what} is {len(data)} bytes, over {MAX_RECORD_BYTES}")
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgumentError(
            f"{what} is not valid JSON ({exc}); the store is damaged"
        ) from exc
    doc = _Doc(what, raw)
    fmt = doc.uint("format")
    if fmt > FORMAT_VERSION:
        raise InvalidArgumentError(
            f"{what} has format {fmt}, newer than this master understands ({FORMAT_VERSION}); "
            "upgrade this master to the version that wrote it"
        )
    return doc


def _role(what: str, value: object) -> Role:
    if isinstance(value, str):
        for r in Role:
            if r.name.lower() == value:
                return r
    raise InvalidArgumentError(
        f"{what}: role {value!r} is not one of none, primary, replica, rebuilding"
    )


def decode_server(data: bytes, key: str = "servers/?") -> ServerRecord:
    doc = _load(data, f"server record {key}")
    addr = doc.sub("addresses")
    portals = tuple(
        _check_text(f"{doc.what}: iSCSI portal", p)
        for p in addr.items("iscsi_portals", MAX_PORTALS)
    )
    rec = ServerRecord(
        server_id=doc.text("server_id"),
        addresses=ServerAddresses(portals, addr.text("api"), addr.text("replication")),
        zone=doc.text("zone"),
        capacity_bytes=doc.uint("capacity_bytes"),
        free_bytes=doc.uint("free_bytes"),
        allocated_bytes=doc.uint("allocated_bytes"),
        state=doc.enum("state", ServerState),
        registered_ns=doc.uint("registered_ns"),
    )
    return validate_server(rec, doc.what)


def decode_volume(data: bytes, key: str = "volumes/?") -> VolumeRecord:
    doc = _load(data, f"volume record {key}")
    copies = []
    for raw in doc.items("copies", MAX_COPIES):
        c = _Doc(f"{doc.what}: copy", raw)
        copies.append(
            CopyRecord(
                server_id=c.text("server_id"),
                role=_role(c.what, c.get("role")),
                state=c.enum("state", CopyState),
                durable_lsn=c.uint("durable_lsn"),
            )
        )
    params_raw = doc.get("parameters")
    if not isinstance(params_raw, dict) or len(params_raw) > MAX_PARAMETERS:
        raise InvalidArgumentError(
            f"{doc.what}: parameters is not an object of at most {MAX_PARAMETERS} entries"
        )
    params = {
        _check_text(f"{doc.what}: parameter name", k): _check_text(f"{doc.what}: parameter", v)
        for k, v in params_raw.items()
    }
    rec = VolumeRecord(
        name=doc.text("name"),
        uuid=doc.text("uuid"),
        size_bytes=doc.uint("size_bytes", MAX_VOLUME_SIZE_BYTES),
        replica_count=doc.uint("replica_count", MAX_COPIES),
        mode=doc.enum("mode", DurabilityMode),
        epoch=doc.uint("epoch"),
        status=doc.enum("status", VolumeStatus),
        primary=doc.text("primary"),
        copies=tuple(copies),
        created_ns=doc.uint("created_ns"),
        parameters=params,
        pending_out_of_sync=tuple(
            _check_text(f"{doc.what}: pending mark", a)
            for a in doc.items("pending_out_of_sync", MAX_PENDING_MARKS)
        ),
    )
    return validate_volume(rec, doc.what)


# ---- heartbeat content (wire-free; the service converts from protobuf) ------------------------


@dataclass(frozen=True, slots=True)
class ReplicaReport:
    address: str
    in_sync: bool
    connected: bool = False
    phase: str = ""
    acked_lsn: int = 0
    resync_total_bytes: int = 0
    resync_done_bytes: int = 0


@dataclass(frozen=True, slots=True)
class VolumeReport:
    name: str
    uuid: str
    role: Role
    epoch: int
    size_bytes: int = 0
    last_lsn: int = 0
    durable_lsn: int = 0
    allocated_bytes: int = 0
    #: Primary only: its replicas as it sees them.
    replicas: tuple[ReplicaReport, ...] = ()
    failed: bool = False
    deleted: bool = False
    #: The iSCSI target name the server exports the copy as.
    iqn: str = ""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    server_id: str
    full: bool
    addresses: ServerAddresses = ServerAddresses()
    zone: str = ""
    capacity_bytes: int = 0
    free_bytes: int = 0
    allocated_bytes: int = 0
    volumes: tuple[VolumeReport, ...] = ()
    sent_mono_ns: int = 0
    seq: int = 0
    stopping: bool = False
