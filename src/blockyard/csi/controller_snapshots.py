"""The CSI Controller's snapshot RPCs (CreateSnapshot, DeleteSnapshot, ListSnapshots,
GetSnapshot): a mixin of :class:`~blockyard.csi.controller.ControllerService`, which holds the
backend, the locks and the lookups it uses (declared below). The handlers' contract is the
controller's (see its module docstring). Snapshot ids are ``<volume>@<snapshot>``
(:mod:`blockyard.csi.ids`); names starting with :data:`CLONE_SNAPSHOT_PREFIX` are the driver's
own temporary snapshots behind volume clones and are never listed or taken by a user."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from google.protobuf import timestamp_pb2

from blockyard.csi import ids
from blockyard.csi.errors import IncompatibleVolumeError, InvalidParameterError, required
from blockyard.csi.proto import csi_pb2 as pb
from blockyard.engine.names import check_name
from blockyard.errors import InvalidArgumentError, InvalidNameError
from blockyard.server.backend import SnapshotDescription, SnapshotRef

if TYPE_CHECKING:
    from blockyard.csi.locks import OperationLocks
    from blockyard.csi.rpc import Context, RpcRunner
    from blockyard.server.backend import VolumeBackend, VolumeDescription

#: Temporary snapshots behind clones of volumes; CreateSnapshot refuses names with the prefix.
CLONE_SNAPSHOT_PREFIX: Final = "csi-clone-"
#: Entries one ListVolumes/ListSnapshots answer may hold when the CO sets no max_entries.
MAX_LIST_ENTRIES: Final = 100_000


def clone_snapshot_name(volume_id: str) -> str:
    """The temporary snapshot behind a clone of a volume into ``volume_id``: deterministic, so
    a retried CreateVolume finds and removes it."""
    return CLONE_SNAPSHOT_PREFIX + hashlib.sha256(volume_id.encode()).hexdigest()[:32]


class SnapshotRpcs:
    """The snapshot handlers; uses the controller's state (declared below)."""

    if TYPE_CHECKING:
        _backend: VolumeBackend
        _locks: OperationLocks
        _runner: RpcRunner

        async def _get_volume(self, volume_id: str, *, field: str) -> VolumeDescription: ...
        async def _snapshots_of(self, volume_id: str) -> Sequence[SnapshotDescription]: ...
        async def _find_snapshot(self, snapshot_id: str, *, field: str) -> SnapshotDescription: ...
        async def _all_volumes(self) -> list[VolumeDescription]: ...

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
                return pb.CreateSnapshotResponse(snapshot=snapshot_pb(owner))

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
                entries=[pb.ListSnapshotsResponse.Entry(snapshot=snapshot_pb(s)) for _, s in page],
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
            return pb.GetSnapshotResponse(snapshot=snapshot_pb(snapshot))

        return await self._runner.run(context, "GetSnapshot", request.snapshot_id or "-", work)


def snapshot_pb(s: SnapshotDescription) -> pb.Snapshot:
    created = timestamp_pb2.Timestamp()
    created.FromNanoseconds(s.created_ns)
    return pb.Snapshot(
        size_bytes=s.size_bytes,
        snapshot_id=ids.snapshot_id(SnapshotRef(s.volume, s.name)),
        source_volume_id=s.volume,
        creation_time=created,
        ready_to_use=True,
    )
