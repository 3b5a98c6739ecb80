"""The CSI Controller service: provisioning through a :class:`VolumeBackend`.

Contract of every handler (CSI spec, "Controller Service RPC" and "Error Scheme"):

- Every REQUIRED field that is empty answers INVALID_ARGUMENT naming the field; ids this
  driver never issued, or that name nothing, answer NOT_FOUND (or OK where the spec says a
  missing object counts as done: DeleteVolume, ControllerUnpublishVolume, DeleteSnapshot).
- One operation at a time per volume and per snapshot name (:mod:`blockyard.csi.locks`): a
  concurrent second one answers ABORTED at once.
- Handlers look for an existing result first, so a retry after any failure or crash finishes
  the job or returns what the first call made.
- Errors turn into a status in one place (:mod:`blockyard.csi.rpc`), one log line per RPC.

Volume ids are backend volume names; snapshot ids are ``<volume>@<snapshot>``
(:mod:`blockyard.csi.ids`). What a volume was created as and where it is published lives in
the :class:`~blockyard.csi.publish_store.PublishStore`, which survives controller restarts.
Access control (docs/ARCHITECTURE.md, "Authentication"): every volume this driver creates is
restricted at once to no initiator; ControllerPublishVolume adds the node's initiator name
(:mod:`blockyard.csi.initiators`) to the volume's ACL, and, when the request carries CHAP
secrets (the StorageClass's controller-publish secret), makes the target require them;
ControllerUnpublishVolume removes the node's initiator from the ACL, which ends that node's
sessions, before it forgets the publication. Both are idempotent, and the ACL change comes
first so that a crash never leaves a node recorded as unpublished but still admitted.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from google.protobuf import timestamp_pb2, wrappers_pb2

from blockyard.csi import ids
from blockyard.csi.capabilities import (
    MULTI_NODE_MODES,
    AccessType,
    Capability,
    Mode,
    parse_capabilities,
    parse_capability,
)
from blockyard.csi.errors import (
    CapacityOutOfRangeError,
    IncompatibleVolumeError,
    InvalidParameterError,
    InvalidStartingTokenError,
    MissingFieldError,
    PublishConflictError,
    TopologyUnsatisfiableError,
    UnknownObjectError,
    UnsupportedCapabilityError,
    UnsupportedOperationError,
    VolumeInUseError,
)
from blockyard.csi.initiators import node_initiator_name
from blockyard.csi.locks import OperationLocks
from blockyard.csi.master_backend import MasterBackend, MasterVolumeDescription, parse_durability
from blockyard.csi.params import (
    VolumeParameters,
    check_range,
    parse_chap_secrets,
    parse_parameters,
    resolve_fs_type,
    round_up,
    size_for_range,
    size_in_range,
)
from blockyard.csi.proto import csi_pb2 as pb
from blockyard.csi.proto import csi_pb2_grpc as pb_grpc
from blockyard.csi.publish_store import Attachment, PublishStore, VolumeRecord
from blockyard.csi.rpc import Context, RpcRunner
from blockyard.engine.limits import MAX_VOLUME_SIZE_BYTES
from blockyard.engine.names import check_name
from blockyard.errors import (
    BlockyardError,
    InvalidArgumentError,
    InvalidNameError,
    NotFoundError,
)
from blockyard.scsi.alua import AccessState
from blockyard.server.backend import (
    SnapshotDescription,
    SnapshotRef,
    VolumeBackend,
    VolumeDescription,
)

log = logging.getLogger("blockyard.csi.controller")

RPC = pb.ControllerServiceCapability.RPC

DEFAULT_TOPOLOGY_KEY: Final = "topology.block.blockyard.io/pool"
DEFAULT_TOPOLOGY_VALUE: Final = "default"
#: MULTI_NODE_MULTI_WRITER block volumes: the source and the target of a VM live migration.
MAX_RWX_BLOCK_NODES: Final = 2
#: CSI spec "Size Limits": strings at most 128 bytes.
MAX_NODE_ID_BYTES: Final = 128
#: Entries one ListVolumes/ListSnapshots answer may hold when the CO sets no max_entries.
MAX_LIST_ENTRIES: Final = 100_000
#: Temporary snapshots behind clones of volumes; CreateSnapshot refuses names with the prefix.
CLONE_SNAPSHOT_PREFIX: Final = "csi-clone-"
#: Volume context key of the file system chosen at creation (read by the node service).
CONTEXT_FS_TYPE: Final = "fsType"
#: publish_context keys (read by the node service).
PUBLISH_PORTAL: Final = "portal"
PUBLISH_PORTALS: Final = "portals"
PUBLISH_IQN: Final = "iqn"
PUBLISH_LUN: Final = "lun"
PUBLISH_NAA_ID: Final = "naaId"
#: The initiator name the node must log in with (the one now in the volume's ACL).
PUBLISH_INITIATOR: Final = "initiatorName"

CONTROLLER_CAPABILITIES: Final = (
    RPC.CREATE_DELETE_VOLUME,
    RPC.PUBLISH_UNPUBLISH_VOLUME,
    RPC.LIST_VOLUMES,
    RPC.GET_CAPACITY,
    RPC.CREATE_DELETE_SNAPSHOT,
    RPC.LIST_SNAPSHOTS,
    RPC.CLONE_VOLUME,
    RPC.PUBLISH_READONLY,
    RPC.EXPAND_VOLUME,
    RPC.LIST_VOLUMES_PUBLISHED_NODES,
    RPC.VOLUME_CONDITION,
    RPC.GET_VOLUME,
    RPC.SINGLE_NODE_MULTI_WRITER,
    RPC.GET_SNAPSHOT,
)
#: Not offered through a master, which has no snapshot RPCs yet.
SNAPSHOT_CAPABILITIES: Final = frozenset(
    {RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS, RPC.CLONE_VOLUME, RPC.GET_SNAPSHOT}
)
#: Topology key of a volume server's zone (``blockyard serve --zone``): a volume placed by the
#: master is accessible from the zones of its copies; node plugins in zoned clusters report
#: ``--topology topology.block.blockyard.io/zone=ZONE``.
ZONE_TOPOLOGY_KEY: Final = "topology.block.blockyard.io/zone"

#: ALUA states in which a portal serves I/O, best first (SPC-4 §5.16.2).
_SERVING_STATES: Final = (AccessState.ACTIVE_OPTIMIZED, AccessState.ACTIVE_NON_OPTIMIZED)
_MULTI_WRITER: Final = Mode.Mode.Name(Mode.MULTI_NODE_MULTI_WRITER)


@dataclass(frozen=True, slots=True)
class TopologySegment:
    """The one topology segment every volume is accessible from (the node service reports the
    same one from NodeGetInfo)."""

    key: str = DEFAULT_TOPOLOGY_KEY
    value: str = DEFAULT_TOPOLOGY_VALUE


def required(value: str, field: str, what: str) -> str:
    if not value:
        raise MissingFieldError(f"{field} is required: give the {what}")
    return value


def clone_snapshot_name(volume_id: str) -> str:
    """The temporary snapshot behind a clone of a volume into ``volume_id``: deterministic, so
    a retried CreateVolume finds and removes it."""
    return CLONE_SNAPSHOT_PREFIX + hashlib.sha256(volume_id.encode()).hexdigest()[:32]


class ControllerService(pb_grpc.ControllerServicer):
    def __init__(
        self,
        backend: VolumeBackend,
        store: PublishStore,
        runner: RpcRunner,
        *,
        topology: TopologySegment | None = None,
    ) -> None:
        self._backend = backend
        self._store = store
        self._runner = runner
        self._topology = topology or TopologySegment()
        self._locks = OperationLocks()
        self._master = backend if isinstance(backend, MasterBackend) else None
        for volume_id in store.volume_ids():
            runner.metrics.publications_restored(volume_id, self._multi_writer_nodes(volume_id))

    # ---- CreateVolume / DeleteVolume -------------------------------------------------------

    async def CreateVolume(
        self, request: pb.CreateVolumeRequest, context: Context
    ) -> pb.CreateVolumeResponse:
        async def work() -> pb.CreateVolumeResponse:
            name = required(request.name, "name", "volume name (the CO's idempotency key)")
            try:
                check_name(name)
            except InvalidNameError as exc:
                raise InvalidNameError(f"name: {exc}") from exc
            caps = parse_capabilities("volume_capabilities", request.volume_capabilities)
            params = self._parse_parameters(request.parameters)
            fs_type = resolve_fs_type(caps, params)
            zones: list[str] = []
            if request.HasField("accessibility_requirements"):
                zones = self._check_requirements(request.accessibility_requirements)
            required_bytes = request.capacity_range.required_bytes
            limit_bytes = request.capacity_range.limit_bytes
            check_range("capacity_range", required_bytes, limit_bytes)
            kind, source_id = _content_source(request)
            if kind and self._master is not None:
                raise UnsupportedOperationError(
                    "volume_content_source: volumes from snapshots and clones are not available "
                    "through the master yet (CLONE_VOLUME is not advertised); leave "
                    "dataSource out, or provision from a single volume server's StorageClass"
                )
            volume_context = {CONTEXT_FS_TYPE: fs_type} if fs_type else {}
            with self._locks.claim("CreateVolume", f"volume:{name}"):
                existing = await self._find_volume(name)
                if existing is not None:
                    if self._store.get(name) is None:
                        # Created by a call that crashed before recording it: never published,
                        # so it may still be open. Close it before it is handed out.
                        existing = await self._restrict(existing)
                    record = self._check_existing(
                        existing, required_bytes, limit_bytes, volume_context, kind, source_id
                    )
                    if kind == "volume":
                        await self._drop_clone_snapshot(source_id, name)
                    return pb.CreateVolumeResponse(volume=self._volume_pb(existing, record))
                if kind == "snapshot":
                    desc = await self._create_from_snapshot(
                        name, source_id, required_bytes, limit_bytes
                    )
                elif kind == "volume":
                    desc = await self._clone_volume(name, source_id, required_bytes, limit_bytes)
                else:
                    size = size_for_range("capacity_range", required_bytes, limit_bytes)
                    desc = await self._create(name, size, params, zones)
                desc = await self._restrict(desc)
                record = self._store.put_volume(name, volume_context, kind, source_id)
                return pb.CreateVolumeResponse(volume=self._volume_pb(desc, record))

        return await self._runner.run(context, "CreateVolume", request.name or "-", work)

    def _parse_parameters(self, params: Mapping[str, str]) -> VolumeParameters:
        return parse_parameters("parameters", params, replicated=self._master is not None)

    async def _create(
        self, name: str, size: int, params: VolumeParameters, zones: Sequence[str]
    ) -> VolumeDescription:
        if self._master is None:
            return await self._backend.create_volume(name, size)
        durability = parse_durability(params.durability) if params.durability else None
        return await self._master.create_replicated_volume(
            name, size, replicas=params.replicas, durability=durability, zones=zones
        )

    async def _restrict(self, desc: VolumeDescription) -> VolumeDescription:
        """A new volume admits no initiator until it is published to a node."""
        if desc.access.restricted:
            return desc
        return await self._backend.set_volume_access(desc.name, ())

    def _check_requirements(self, requirement: pb.TopologyRequirement) -> list[str]:
        """CSI CreateVolume: the volume MUST be accessible from one of the requisite
        topologies. On one server ours is the only one there is; through a master, requisite
        zones restrict placement (returned; empty: anywhere)."""
        if self._master is not None:
            zones = [t.segments[ZONE_TOPOLOGY_KEY] for t in requirement.requisite
                     if t.segments.get(ZONE_TOPOLOGY_KEY)]  # fmt: skip
            if zones or not requirement.requisite:
                return list(dict.fromkeys(zones))
        if not requirement.requisite or any(self._matches(t) for t in requirement.requisite):
            return []
        raise TopologyUnsatisfiableError(
            "accessibility_requirements.requisite does not include this driver's topology "
            f"{{{self._topology.key}: {self._topology.value}}}; volumes are only accessible "
            "there (check the node plugins' topology settings)"
        )

    def _matches(self, topology: pb.Topology) -> bool:
        return topology.segments.get(self._topology.key) == self._topology.value

    def _check_existing(
        self,
        desc: VolumeDescription,
        required_bytes: int,
        limit_bytes: int,
        volume_context: dict[str, str],
        kind: str,
        source_id: str,
    ) -> VolumeRecord:
        """The record of an existing volume the request is compatible with (CSI: a repeated
        CreateVolume returns it); recorded now when a crash came between backend create and
        record."""
        if not size_in_range(desc.size_bytes, required_bytes, limit_bytes):
            raise IncompatibleVolumeError(
                f"volume {desc.name} exists with {desc.size_bytes} bytes, outside the requested "
                f"capacity range [{required_bytes}, {limit_bytes or 'unlimited'}]; use another "
                "name, or ControllerExpandVolume to grow it"
            )
        record = self._store.get(desc.name)
        if record is None:
            return self._store.put_volume(desc.name, volume_context, kind, source_id)
        if record.context != volume_context:
            raise IncompatibleVolumeError(
                f"volume {desc.name} exists with volume context {record.context}, not "
                f"{volume_context}; use another name"
            )
        if (record.source_kind, record.source_id) != (kind, source_id):
            was = f"{record.source_kind} {record.source_id}" if record.source_kind else "empty"
            raise IncompatibleVolumeError(
                f"volume {desc.name} exists, created from {was}, not from "
                f"{f'{kind} {source_id}' if kind else 'nothing'}; use another name"
            )
        return record

    async def _create_from_snapshot(
        self, name: str, snapshot_id: str, required_bytes: int, limit_bytes: int
    ) -> VolumeDescription:
        snapshot = await self._find_snapshot(snapshot_id, field="volume_content_source")
        size = size_for_range(
            "capacity_range", required_bytes, limit_bytes, floor_bytes=snapshot.size_bytes
        )
        return await self._backend.create_volume(
            name, size, source=SnapshotRef(snapshot.volume, snapshot.name)
        )

    async def _clone_volume(
        self, name: str, source_id: str, required_bytes: int, limit_bytes: int
    ) -> VolumeDescription:
        """Snapshot the source, clone the snapshot, drop the snapshot. The snapshot name is
        derived from the new volume's id, so a retry after a crash reuses and then drops it."""
        source = await self._get_volume(source_id, field="volume_content_source.volume")
        size = size_for_range(
            "capacity_range", required_bytes, limit_bytes, floor_bytes=source.size_bytes
        )
        ref = SnapshotRef(source.name, clone_snapshot_name(name))
        await self._backend.create_snapshot(ref.volume, ref.snapshot)
        try:
            desc = await self._backend.create_volume(name, size, source=ref)
        except BlockyardError:
            try:
                await self._backend.delete_snapshot(ref.volume, ref.snapshot)
            except BlockyardError as cleanup:
                log.warning(
                    "clone into %s failed; its temporary snapshot %s@%s stays "
                    "until CreateVolume is retried: %s",
                    name,
                    ref.volume,
                    ref.snapshot,
                    cleanup,
                )
            raise
        await self._backend.delete_snapshot(ref.volume, ref.snapshot)
        return desc

    async def _drop_clone_snapshot(self, source_id: str, name: str) -> None:
        """Remove the temporary snapshot a crashed clone may have left (idempotent)."""
        if ids.is_volume_id(source_id):
            try:
                await self._backend.delete_snapshot(source_id, clone_snapshot_name(name))
            except NotFoundError:
                return

    async def DeleteVolume(
        self, request: pb.DeleteVolumeRequest, context: Context
    ) -> pb.DeleteVolumeResponse:
        async def work() -> pb.DeleteVolumeResponse:
            volume_id = required(request.volume_id, "volume_id", "id of the volume to delete")
            if not ids.is_volume_id(volume_id):
                return pb.DeleteVolumeResponse()  # never issued, so nothing to delete
            with self._locks.claim("DeleteVolume", f"volume:{volume_id}"):
                nodes = self._store.published_node_ids(volume_id)
                if nodes:
                    raise VolumeInUseError(
                        f"volume {volume_id} is still published to node(s) {', '.join(nodes)}; "
                        "ControllerUnpublishVolume it from every node before deleting it"
                    )
                desc = await self._find_volume(volume_id)
                if desc is not None and desc.snapshot_count:
                    await self._check_no_snapshots(volume_id)
                await self._backend.delete_volume(volume_id)
                self._store.remove_volume(volume_id)
            return pb.DeleteVolumeResponse()

        return await self._runner.run(context, "DeleteVolume", request.volume_id or "-", work)

    async def _check_no_snapshots(self, volume_id: str) -> None:
        """Snapshots live in their volume's files: deleting the volume would delete them, which
        the CSI spec forbids (DeleteVolume, FAILED_PRECONDITION). Leftover clone snapshots are
        ours and go first."""
        snapshots = await self._backend.list_snapshots(volume_id)
        user = [s.name for s in snapshots if not s.name.startswith(CLONE_SNAPSHOT_PREFIX)]
        if user:
            shown = ", ".join(ids.snapshot_id(SnapshotRef(volume_id, n)) for n in user[:5])
            raise VolumeInUseError(
                f"volume {volume_id} has {len(user)} snapshot(s) ({shown}); snapshots live "
                "with their volume here, so delete them (VolumeSnapshots) before the volume"
            )
        for s in snapshots:
            await self._backend.delete_snapshot(volume_id, s.name)

    # ---- ControllerPublishVolume / ControllerUnpublishVolume -------------------------------

    async def ControllerPublishVolume(
        self, request: pb.ControllerPublishVolumeRequest, context: Context
    ) -> pb.ControllerPublishVolumeResponse:
        async def work() -> pb.ControllerPublishVolumeResponse:
            volume_id = required(request.volume_id, "volume_id", "id of the volume to publish")
            node_id = required(request.node_id, "node_id", "node id from NodeGetInfo")
            if len(node_id.encode()) > MAX_NODE_ID_BYTES:
                raise InvalidArgumentError(
                    f"node_id is longer than {MAX_NODE_ID_BYTES} bytes (CSI size limit)"
                )
            if not request.HasField("volume_capability"):
                raise MissingFieldError(
                    "volume_capability is required: say how the node will use the volume"
                )
            cap = parse_capability("volume_capability", request.volume_capability)
            secrets = parse_chap_secrets("secrets", request.secrets)
            initiator = node_initiator_name(node_id)
            with self._locks.claim("ControllerPublishVolume", f"volume:{volume_id}"):
                desc = await self._get_volume(volume_id, field="volume_id")
                wanted = Attachment(node_id, request.readonly, cap.access_type.value, cap.mode_name)
                attachments = self._store.attachments(volume_id)
                current = attachments.pop(node_id, None)
                if current is not None and current != wanted:
                    raise IncompatibleVolumeError(
                        f"volume {volume_id} is already published to node {node_id} as "
                        f"{_describe(current)}, not {_describe(wanted)}; unpublish it first"
                    )
                if current is None:
                    _check_sharing(volume_id, cap, list(attachments.values()))
                # Target settings first, the record last: a retry after a crash redoes both.
                if secrets.chap is not None:
                    desc = await self._backend.set_volume_auth(
                        volume_id, secrets.chap, secrets.mutual
                    )
                if initiator not in desc.access.allowed_initiators or not desc.access.restricted:
                    desc = await self._backend.allow_initiator(volume_id, initiator)
                if current is None:
                    self._store.attach(volume_id, wanted)
                    self._report_publications(volume_id)
                context = _publish_context(desc)
                context[PUBLISH_INITIATOR] = initiator
                return pb.ControllerPublishVolumeResponse(publish_context=context)

        subject = f"{request.volume_id or '-'} -> {request.node_id or '-'}"
        return await self._runner.run(context, "ControllerPublishVolume", subject, work)

    async def ControllerUnpublishVolume(
        self, request: pb.ControllerUnpublishVolumeRequest, context: Context
    ) -> pb.ControllerUnpublishVolumeResponse:
        async def work() -> pb.ControllerUnpublishVolumeResponse:
            volume_id = required(request.volume_id, "volume_id", "id of the volume to unpublish")
            with self._locks.claim("ControllerUnpublishVolume", f"volume:{volume_id}"):
                # Fence first: once this returns, the node can neither keep nor open a session.
                await self._revoke(volume_id, request.node_id)
                # Unknown volumes and nodes count as unpublished (CSI: 0 OK).
                if self._store.detach(volume_id, request.node_id):
                    self._report_publications(volume_id)
            return pb.ControllerUnpublishVolumeResponse()

        subject = f"{request.volume_id or '-'} -> {request.node_id or 'all nodes'}"
        return await self._runner.run(context, "ControllerUnpublishVolume", subject, work)

    async def _revoke(self, volume_id: str, node_id: str) -> None:
        """Take ``node_id`` (every node when empty) out of the volume's ACL, ending its
        sessions. A volume that no longer exists has nothing to fence."""
        if not ids.is_volume_id(volume_id):
            return
        try:
            if node_id:
                await self._backend.revoke_initiator(volume_id, node_initiator_name(node_id))
            else:
                await self._backend.set_volume_access(volume_id, ())
        except NotFoundError:
            return

    def _multi_writer_nodes(self, volume_id: str) -> int:
        """Nodes ``volume_id`` is published to read-write-many: two are both ends of a live
        migration (see :data:`MAX_RWX_BLOCK_NODES`)."""
        return sum(a.mode == _MULTI_WRITER for a in self._store.attachments(volume_id).values())

    def _report_publications(self, volume_id: str) -> None:
        nodes = self._multi_writer_nodes(volume_id)
        self._runner.metrics.publications_changed(volume_id, nodes)

    # ---- Validate / List / Get / Capacity ----------------------------------------------------

    async def ValidateVolumeCapabilities(
        self, request: pb.ValidateVolumeCapabilitiesRequest, context: Context
    ) -> pb.ValidateVolumeCapabilitiesResponse:
        async def work() -> pb.ValidateVolumeCapabilitiesResponse:
            volume_id = required(request.volume_id, "volume_id", "id of the volume to check")
            if not request.volume_capabilities:
                raise MissingFieldError(
                    "volume_capabilities is required: give the capabilities to check"
                )
            await self._get_volume(volume_id, field="volume_id")
            record = self._store.get(volume_id)
            try:
                caps = parse_capabilities("volume_capabilities", request.volume_capabilities)
                fs_type = resolve_fs_type(caps, self._parse_parameters(request.parameters))
            except (UnsupportedCapabilityError, InvalidParameterError) as exc:
                return pb.ValidateVolumeCapabilitiesResponse(message=str(exc))
            created_fs = record.context.get(CONTEXT_FS_TYPE, "") if record else ""
            if fs_type and created_fs and fs_type != created_fs:
                return pb.ValidateVolumeCapabilitiesResponse(
                    message=f"volume {volume_id} was created for {created_fs}, not {fs_type}"
                )
            confirmed = pb.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters,
            )
            return pb.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

        subject = request.volume_id or "-"
        return await self._runner.run(context, "ValidateVolumeCapabilities", subject, work)

    async def ListVolumes(
        self, request: pb.ListVolumesRequest, context: Context
    ) -> pb.ListVolumesResponse:
        async def work() -> pb.ListVolumesResponse:
            if request.max_entries < 0:
                raise InvalidArgumentError(
                    f"max_entries {request.max_entries} is negative: use 0 for no limit"
                )
            volumes: list[VolumeDescription] = []
            token = request.starting_token
            while True:
                try:
                    page = await self._backend.list_volumes(request.max_entries, token)
                except InvalidArgumentError as exc:
                    if not token:
                        raise
                    raise InvalidStartingTokenError(
                        f"starting_token {token[:64]!r} was not issued by this driver: pass "
                        "next_token from the previous ListVolumes answer unchanged, or empty "
                        "to start over"
                    ) from exc
                volumes.extend(page.volumes)
                token = page.next_page_token
                # max_entries 0 means "no limit" (CSI): follow the backend's pages.
                if request.max_entries or not token or len(volumes) >= MAX_LIST_ENTRIES:
                    break
            entries = [
                pb.ListVolumesResponse.Entry(
                    volume=self._volume_pb(v, self._store.get(v.name)),
                    status=pb.ListVolumesResponse.VolumeStatus(
                        published_node_ids=self._store.published_node_ids(v.name),
                        volume_condition=_condition(v),
                    ),
                )
                for v in volumes
            ]
            return pb.ListVolumesResponse(entries=entries, next_token=token)

        return await self._runner.run(context, "ListVolumes", "-", work)

    async def ControllerGetVolume(
        self, request: pb.ControllerGetVolumeRequest, context: Context
    ) -> pb.ControllerGetVolumeResponse:
        async def work() -> pb.ControllerGetVolumeResponse:
            volume_id = required(request.volume_id, "volume_id", "id of the volume")
            desc = await self._get_volume(volume_id, field="volume_id")
            return pb.ControllerGetVolumeResponse(
                volume=self._volume_pb(desc, self._store.get(volume_id)),
                status=pb.ControllerGetVolumeResponse.VolumeStatus(
                    published_node_ids=self._store.published_node_ids(volume_id),
                    volume_condition=_condition(desc),
                ),
            )

        subject = request.volume_id or "-"
        return await self._runner.run(context, "ControllerGetVolume", subject, work)

    async def GetCapacity(
        self, request: pb.GetCapacityRequest, context: Context
    ) -> pb.GetCapacityResponse:
        async def work() -> pb.GetCapacityResponse:
            capacity = await self._backend.get_capacity()
            answer = pb.GetCapacityResponse(
                available_capacity=capacity.available_bytes,
                maximum_volume_size=wrappers_pb2.Int64Value(
                    value=min(capacity.max_volume_size_bytes, capacity.available_bytes)
                ),
                minimum_volume_size=wrappers_pb2.Int64Value(value=capacity.min_volume_size_bytes),
            )
            # Nothing can be provisioned for capabilities, parameters or a topology this driver
            # does not serve (CSI: capacity of storage that satisfies ALL of them).
            try:
                if request.volume_capabilities:
                    caps = parse_capabilities("volume_capabilities", request.volume_capabilities)
                    resolve_fs_type(caps, self._parse_parameters(request.parameters))
                else:
                    self._parse_parameters(request.parameters)
            except (UnsupportedCapabilityError, InvalidParameterError):
                return pb.GetCapacityResponse(available_capacity=0)
            if (
                self._master is None
                and request.HasField("accessible_topology")
                and not self._matches(request.accessible_topology)
            ):
                return pb.GetCapacityResponse(available_capacity=0)
            return answer

        return await self._runner.run(context, "GetCapacity", "-", work)

    async def ControllerGetCapabilities(
        self, request: pb.ControllerGetCapabilitiesRequest, context: Context
    ) -> pb.ControllerGetCapabilitiesResponse:
        async def work() -> pb.ControllerGetCapabilitiesResponse:
            return pb.ControllerGetCapabilitiesResponse(
                capabilities=[
                    pb.ControllerServiceCapability(rpc=pb.ControllerServiceCapability.RPC(type=t))
                    for t in CONTROLLER_CAPABILITIES
                    if self._master is None or t not in SNAPSHOT_CAPABILITIES
                ]
            )

        return await self._runner.run(context, "ControllerGetCapabilities", "-", work)

    # ---- ControllerExpandVolume --------------------------------------------------------------

    async def ControllerExpandVolume(
        self, request: pb.ControllerExpandVolumeRequest, context: Context
    ) -> pb.ControllerExpandVolumeResponse:
        async def work() -> pb.ControllerExpandVolumeResponse:
            volume_id = required(request.volume_id, "volume_id", "id of the volume to grow")
            rng = request.capacity_range
            if not request.HasField("capacity_range") or not (
                rng.required_bytes or rng.limit_bytes
            ):
                raise MissingFieldError(
                    "capacity_range is required: set required_bytes to the new size"
                )
            check_range("capacity_range", rng.required_bytes, rng.limit_bytes)
            cap = (
                parse_capability("volume_capability", request.volume_capability)
                if request.HasField("volume_capability")
                else None
            )
            with self._locks.claim("ControllerExpandVolume", f"volume:{volume_id}"):
                desc = await self._get_volume(volume_id, field="volume_id")
                target = round_up(rng.required_bytes) if rng.required_bytes else desc.size_bytes
                target = max(target, desc.size_bytes)
                if rng.limit_bytes and target > rng.limit_bytes:
                    raise CapacityOutOfRangeError(
                        f"capacity_range: volume {volume_id} would be {target} bytes (whole "
                        f"4 KiB blocks, never smaller than its {desc.size_bytes} bytes), above "
                        f"limit_bytes {rng.limit_bytes}"
                    )
                if target > MAX_VOLUME_SIZE_BYTES:
                    raise CapacityOutOfRangeError(
                        f"capacity_range: {target} bytes is larger than the largest volume "
                        f"({MAX_VOLUME_SIZE_BYTES} bytes)"
                    )
                if target > desc.size_bytes:
                    desc = await self._backend.expand_volume(volume_id, target)
            return pb.ControllerExpandVolumeResponse(
                capacity_bytes=desc.size_bytes,
                node_expansion_required=self._needs_node_expansion(volume_id, cap),
            )

        return await self._runner.run(
            context, "ControllerExpandVolume", request.volume_id or "-", work
        )

    async def ControllerModifyVolume(
        self, request: pb.ControllerModifyVolumeRequest, context: Context
    ) -> pb.ControllerModifyVolumeResponse:
        async def work() -> pb.ControllerModifyVolumeResponse:
            raise UnsupportedOperationError(
                "ControllerModifyVolume is not supported: blockyard volumes have no mutable "
                "parameters yet (MODIFY_VOLUME is not advertised)"
            )

        subject = request.volume_id or "-"
        return await self._runner.run(context, "ControllerModifyVolume", subject, work)

    def _needs_node_expansion(self, volume_id: str, cap: Capability | None) -> bool:
        """A file system must be grown on the node; a raw block device is its new size at
        once. Without a capability, the volume's creation record decides, and an unknown
        volume gets the node step (harmless for block)."""
        if cap is not None:
            return cap.access_type is AccessType.MOUNT
        record = self._store.get(volume_id)
        return record is None or bool(record.context.get(CONTEXT_FS_TYPE))

    # ---- Snapshots ---------------------------------------------------------------------------

    async def CreateSnapshot(
        self, request: pb.CreateSnapshotRequest, context: Context
    ) -> pb.CreateSnapshotResponse:
        async def work() -> pb.CreateSnapshotResponse:
            source_id = required(
                request.source_volume_id, "source_volume_id", "id of the volume to snapshot"
            )
            name = required(request.name, "name", "snapshot name (the CO's idempotency key)")
            try:
                check_name(name, what="snapshot")
            except InvalidNameError as exc:
                raise InvalidNameError(f"name: {exc}") from exc
            if name.startswith(CLONE_SNAPSHOT_PREFIX):
                raise InvalidArgumentError(
                    f"name: snapshot names starting with {CLONE_SNAPSHOT_PREFIX!r} are reserved "
                    "for the driver's temporary clone snapshots"
                )
            if request.parameters:
                raise InvalidParameterError(
                    f"parameters: snapshots take none (got {sorted(request.parameters)[0]!r})"
                )
            with self._locks.claim("CreateSnapshot", f"snapshot:{name}", f"volume:{source_id}"):
                owner = await self._snapshot_owner(name, source_id)
                if owner is not None and owner.volume != source_id:
                    raise IncompatibleVolumeError(
                        f"snapshot name {name} is taken by a snapshot of volume {owner.volume}, "
                        f"not {source_id}; use another name"
                    )
                if owner is None:
                    await self._get_volume(source_id, field="source_volume_id")
                    owner = await self._backend.create_snapshot(source_id, name)
                return pb.CreateSnapshotResponse(snapshot=_snapshot_pb(owner))

        subject = f"{request.source_volume_id or '-'}@{request.name or '-'}"
        return await self._runner.run(context, "CreateSnapshot", subject, work)

    async def _snapshot_owner(self, name: str, source_id: str) -> SnapshotDescription | None:
        """The snapshot called ``name`` on any volume (CSI snapshot names are unique across the
        plugin); the source volume is looked at first, as retries usually find it there."""
        if ids.is_volume_id(source_id):
            found = [s for s in await self._snapshots_of(source_id) if s.name == name]
            if found:
                return found[0]
        for volume in await self._all_volumes():
            if volume.snapshot_count and volume.name != source_id:
                for s in await self._snapshots_of(volume.name):
                    if s.name == name:
                        return s
        return None

    async def DeleteSnapshot(
        self, request: pb.DeleteSnapshotRequest, context: Context
    ) -> pb.DeleteSnapshotResponse:
        async def work() -> pb.DeleteSnapshotResponse:
            snapshot_id = required(
                request.snapshot_id, "snapshot_id", "id of the snapshot to delete"
            )
            ref = ids.parse_snapshot_id(snapshot_id)
            if ref is None or ref.snapshot.startswith(CLONE_SNAPSHOT_PREFIX):
                return pb.DeleteSnapshotResponse()  # never issued, so nothing to delete
            keys = (f"snapshot:{ref.snapshot}", f"volume:{ref.volume}")
            with self._locks.claim("DeleteSnapshot", *keys):
                await self._backend.delete_snapshot(ref.volume, ref.snapshot)
            return pb.DeleteSnapshotResponse()

        subject = request.snapshot_id or "-"
        return await self._runner.run(context, "DeleteSnapshot", subject, work)

    async def ListSnapshots(
        self, request: pb.ListSnapshotsRequest, context: Context
    ) -> pb.ListSnapshotsResponse:
        async def work() -> pb.ListSnapshotsResponse:
            if request.max_entries < 0:
                raise InvalidArgumentError(
                    f"max_entries {request.max_entries} is negative: use 0 for no limit"
                )
            after = ids.decode_snapshot_token(request.starting_token)
            snapshots = await self._filtered_snapshots(
                request.snapshot_id, request.source_volume_id
            )
            listed = sorted(
                (ids.snapshot_id(SnapshotRef(s.volume, s.name)), s)
                for s in snapshots
                if not s.name.startswith(CLONE_SNAPSHOT_PREFIX)
            )
            if after is not None:
                listed = [(sid, s) for sid, s in listed if sid > after]
            limit = request.max_entries or MAX_LIST_ENTRIES
            page, rest = listed[:limit], listed[limit:]
            return pb.ListSnapshotsResponse(
                entries=[pb.ListSnapshotsResponse.Entry(snapshot=_snapshot_pb(s)) for _, s in page],
                next_token=ids.encode_snapshot_token(page[-1][0]) if rest else "",
            )

        return await self._runner.run(context, "ListSnapshots", "-", work)

    async def _filtered_snapshots(
        self, snapshot_id: str, source_volume_id: str
    ) -> list[SnapshotDescription]:
        """Snapshots matching the ListSnapshots filters; ids that name nothing match nothing
        (CSI: an empty answer, not an error)."""
        if snapshot_id:
            ref = ids.parse_snapshot_id(snapshot_id)
            if ref is None or (source_volume_id and source_volume_id != ref.volume):
                return []
            return [s for s in await self._snapshots_of(ref.volume) if s.name == ref.snapshot]
        if source_volume_id:
            if not ids.is_volume_id(source_volume_id):
                return []
            return list(await self._snapshots_of(source_volume_id))
        out: list[SnapshotDescription] = []
        for volume in await self._all_volumes():
            if volume.snapshot_count:
                out.extend(await self._snapshots_of(volume.name))
        return out

    async def GetSnapshot(
        self, request: pb.GetSnapshotRequest, context: Context
    ) -> pb.GetSnapshotResponse:
        async def work() -> pb.GetSnapshotResponse:
            snapshot_id = required(request.snapshot_id, "snapshot_id", "id of the snapshot")
            snapshot = await self._find_snapshot(snapshot_id, field="snapshot_id")
            return pb.GetSnapshotResponse(snapshot=_snapshot_pb(snapshot))

        return await self._runner.run(context, "GetSnapshot", request.snapshot_id or "-", work)

    # ---- lookups -----------------------------------------------------------------------------

    async def _find_volume(self, volume_id: str) -> VolumeDescription | None:
        try:
            return await self._backend.get_volume(volume_id)
        except NotFoundError:
            return None

    async def _get_volume(self, volume_id: str, *, field: str) -> VolumeDescription:
        desc = await self._find_volume(volume_id) if ids.is_volume_id(volume_id) else None
        if desc is None:
            raise UnknownObjectError(f"{field}: volume {volume_id!r} does not exist")
        return desc

    async def _snapshots_of(self, volume_id: str) -> Sequence[SnapshotDescription]:
        try:
            return await self._backend.list_snapshots(volume_id)
        except NotFoundError:
            return ()

    async def _find_snapshot(self, snapshot_id: str, *, field: str) -> SnapshotDescription:
        ref = ids.parse_snapshot_id(snapshot_id)
        if ref is not None:
            for s in await self._snapshots_of(ref.volume):
                if s.name == ref.snapshot:
                    return s
        raise UnknownObjectError(f"{field}: snapshot {snapshot_id!r} does not exist")

    async def _all_volumes(self) -> list[VolumeDescription]:
        out: list[VolumeDescription] = []
        token = ""
        while len(out) < MAX_LIST_ENTRIES:
            page = await self._backend.list_volumes(0, token)
            out.extend(page.volumes)
            token = page.next_page_token
            if not token:
                break
        return out

    def _volume_pb(self, desc: VolumeDescription, record: VolumeRecord | None) -> pb.Volume:
        if isinstance(desc, MasterVolumeDescription) and desc.zones:
            topology = [pb.Topology(segments={ZONE_TOPOLOGY_KEY: z}) for z in desc.zones]
        else:
            topology = [pb.Topology(segments={self._topology.key: self._topology.value})]
        volume = pb.Volume(
            capacity_bytes=desc.size_bytes, volume_id=desc.name, accessible_topology=topology
        )
        if record is not None:
            volume.volume_context.update(record.context)
            if record.source_kind == "snapshot":
                volume.content_source.snapshot.snapshot_id = record.source_id
            elif record.source_kind == "volume":
                volume.content_source.volume.volume_id = record.source_id
        return volume


def _content_source(request: pb.CreateVolumeRequest) -> tuple[str, str]:
    """(kind, id) of the request's content source; ("", "") without one."""
    if not request.HasField("volume_content_source"):
        return "", ""
    source = request.volume_content_source
    kind = source.WhichOneof("type")
    if kind == "snapshot":
        sid = required(
            source.snapshot.snapshot_id,
            "volume_content_source.snapshot.snapshot_id",
            "id of the snapshot to restore",
        )
        return "snapshot", sid
    if kind == "volume":
        vid = required(
            source.volume.volume_id,
            "volume_content_source.volume.volume_id",
            "id of the volume to clone",
        )
        return "volume", vid
    raise MissingFieldError("volume_content_source: set snapshot or volume")


def _check_sharing(volume_id: str, cap: Capability, others: list[Attachment]) -> None:
    """May ``volume_id`` be published with ``cap`` while it is published to ``others``?"""
    if not others:
        return
    nodes = ", ".join(sorted(a.node_id for a in others))
    multi_names = {Mode.Mode.Name(m) for m in MULTI_NODE_MODES}
    if not cap.multi_node or any(a.mode not in multi_names for a in others):
        raise PublishConflictError(
            f"volume {volume_id} is published to node(s) {nodes} and its access mode allows one "
            "node at a time; ControllerUnpublishVolume it there first (or use a multi-node "
            "access mode)"
        )
    if any(a.mode != cap.mode_name for a in others):
        raise PublishConflictError(
            f"volume {volume_id} is published to node(s) {nodes} with another access mode "
            f"than {cap.mode_name}; publish it with one mode everywhere"
        )
    if cap.mode == Mode.MULTI_NODE_MULTI_WRITER and len(others) >= MAX_RWX_BLOCK_NODES:
        raise PublishConflictError(
            f"volume {volume_id} is published read-write to {len(others)} nodes ({nodes}) "
            f"already; a ReadWriteMany block volume serves at most {MAX_RWX_BLOCK_NODES} (the "
            "two ends of a live migration)"
        )


def _describe(a: Attachment) -> str:
    return f"{a.access_type} {a.mode}{' read-only' if a.readonly else ''}"


def _publish_context(desc: VolumeDescription) -> dict[str, str]:
    """How the node reaches the volume: its portals, best ALUA state first (the current
    primary's portal leads), the target IQN, the LUN and the NAA id that identifies the LU
    on every path."""
    export = desc.export
    rank = {state: i for i, state in enumerate(_SERVING_STATES)}
    portals = sorted(export.portals, key=lambda p: rank.get(p.state, len(rank)))
    context = {
        PUBLISH_PORTALS: ",".join(p.address for p in portals),
        PUBLISH_IQN: export.iqn,
        PUBLISH_LUN: str(export.lun),
        PUBLISH_NAA_ID: export.naa_id,
    }
    if portals:
        context[PUBLISH_PORTAL] = portals[0].address
    return context


def _condition(desc: VolumeDescription) -> pb.VolumeCondition:
    serving = [p for p in desc.export.portals if p.state in _SERVING_STATES]
    if not serving:
        states = ", ".join(f"{p.address} {p.state.name}" for p in desc.export.portals) or "none"
        return pb.VolumeCondition(
            abnormal=True,
            message=f"no portal serves volume {desc.name} (portals: {states}; role "
            f"{desc.role.name}, epoch {desc.epoch})",
        )
    return pb.VolumeCondition(
        abnormal=False,
        message=f"served on {len(serving)} portal(s); role {desc.role.name}, epoch {desc.epoch}",
    )


def _snapshot_pb(s: SnapshotDescription) -> pb.Snapshot:
    created = timestamp_pb2.Timestamp()
    created.FromNanoseconds(s.created_ns)
    return pb.Snapshot(
        size_bytes=s.size_bytes,
        snapshot_id=ids.snapshot_id(SnapshotRef(s.volume, s.name)),
        source_volume_id=s.volume,
        creation_time=created,
        ready_to_use=True,
    )
