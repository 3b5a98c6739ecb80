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

The snapshot RPCs are a mixin in :mod:`blockyard.csi.controller_snapshots`; what a publication
may share and tells the node is in :mod:`blockyard.csi.publish_rules`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from google.protobuf import wrappers_pb2

from blockyard.csi import ids
from blockyard.csi.capabilities import (
    AccessType,
    Capability,
    Mode,
    parse_capabilities,
    parse_capability,
)
from blockyard.csi.controller_snapshots import (
    CLONE_SNAPSHOT_PREFIX,
    MAX_LIST_ENTRIES,
    SnapshotRpcs,
    clone_snapshot_name,
)
from blockyard.csi.errors import (
    CapacityOutOfRangeError,
    IncompatibleVolumeError,
    InvalidParameterError,
    InvalidStartingTokenError,
    MissingFieldError,
    TopologyUnsatisfiableError,
    UnknownObjectError,
    UnsupportedCapabilityError,
    UnsupportedOperationError,
    VolumeInUseError,
    required,
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
from blockyard.csi.publish_rules import (
    CONTEXT_FS_TYPE,
    PUBLISH_INITIATOR,
    check_sharing,
    describe_attachment,
    publish_context,
    volume_condition,
)
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
#: CSI spec "Size Limits": strings at most 128 bytes.
MAX_NODE_ID_BYTES: Final = 128

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

_MULTI_WRITER: Final = Mode.Mode.Name(Mode.MULTI_NODE_MULTI_WRITER)


@dataclass(frozen=True, slots=True)
class TopologySegment:
    """The one topology segment every volume is accessible from (the node service reports the
    same one from NodeGetInfo)."""

    key: str = DEFAULT_TOPOLOGY_KEY
    value: str = DEFAULT_TOPOLOGY_VALUE


class ControllerService(SnapshotRpcs, pb_grpc.ControllerServicer):
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
                        f"{describe_attachment(current)}, not {describe_attachment(wanted)}; "
                        "unpublish it first"
                    )
                if current is None:
                    check_sharing(volume_id, cap, list(attachments.values()))
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
                context = publish_context(desc)
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
                        volume_condition=volume_condition(v),
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
                    volume_condition=volume_condition(desc),
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
