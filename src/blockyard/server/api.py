"""The gRPC face of a volume server: ``blockyard.v1.VolumeServer`` over any
:class:`~blockyard.server.backend.VolumeServerControl`.

Each RPC converts its request (refusing UNSPECIFIED enums and missing messages), calls the
backend, which validates names and sizes, and converts the answer. Errors become a status in
:meth:`VolumeServerService._run` only, through :func:`blockyard.server.status.status_for`, and
every RPC leaves exactly one log line with its outcome and duration.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from blockyard.engine.epoch import Role
from blockyard.errors import BlockyardError, InvalidArgumentError
from blockyard.replication.commit import DurabilityMode
from blockyard.server import convert
from blockyard.server.backend import VolumeServerControl
from blockyard.server.proto import volume_server_pb2 as pb
from blockyard.server.proto import volume_server_pb2_grpc as pb_grpc
from blockyard.server.status import status_for

log = logging.getLogger("blockyard.server.api")

R = TypeVar("R")
Context = grpc.aio.ServicerContext[Any, Any]


class VolumeServerService(pb_grpc.VolumeServerServicer):
    def __init__(self, backend: VolumeServerControl) -> None:
        self._backend = backend

    async def _run(
        self, context: Context, rpc: str, subject: str, work: Callable[[], Awaitable[R]]
    ) -> R:
        start = time.monotonic()
        try:
            result = await work()
        except BlockyardError as exc:
            code, message = status_for(exc), str(exc)
        except Exception as exc:  # a bug still answers with a status; the log keeps the cause
            log.exception("%s %s failed unexpectedly", rpc, subject)
            code = grpc.StatusCode.INTERNAL
            message = (
                f"internal error in the volume server ({type(exc).__name__}: {exc}); the server "
                "log has the details. Retrying is safe"
            )
        else:
            log.info("rpc %s %s OK %.1f ms", rpc, subject, (time.monotonic() - start) * 1e3)
            return result
        elapsed_ms = (time.monotonic() - start) * 1e3
        log.info("rpc %s %s %s %.1f ms: %s", rpc, subject, code.name, elapsed_ms, message)
        await context.abort(code, message)

    async def CreateVolume(self, request: pb.CreateVolumeRequest, context: Context) -> pb.Volume:
        async def work() -> pb.Volume:
            source = convert.source_from_pb(request.source) if request.HasField("source") else None
            desc = await self._backend.create_volume(
                request.name,
                request.size_bytes,
                source=source,
                volume_uuid=convert.uuid_from_pb(request.uuid) if request.uuid else None,
            )
            return convert.volume_to_pb(desc)

        return await self._run(context, "CreateVolume", request.name, work)

    async def DeleteVolume(
        self, request: pb.DeleteVolumeRequest, context: Context
    ) -> pb.DeleteVolumeResponse:
        async def work() -> pb.DeleteVolumeResponse:
            result = await self._backend.delete_volume(request.name)
            return pb.DeleteVolumeResponse(
                existed=result.existed, sessions_dropped=result.sessions_dropped
            )

        return await self._run(context, "DeleteVolume", request.name, work)

    async def GetVolume(self, request: pb.GetVolumeRequest, context: Context) -> pb.Volume:
        async def work() -> pb.Volume:
            return convert.volume_to_pb(await self._backend.get_volume(request.name))

        return await self._run(context, "GetVolume", request.name, work)

    async def ListVolumes(
        self, request: pb.ListVolumesRequest, context: Context
    ) -> pb.ListVolumesResponse:
        async def work() -> pb.ListVolumesResponse:
            page = await self._backend.list_volumes(request.page_size, request.page_token)
            return pb.ListVolumesResponse(
                volumes=[convert.volume_to_pb(v) for v in page.volumes],
                next_page_token=page.next_page_token,
            )

        return await self._run(context, "ListVolumes", f"page_size={request.page_size}", work)

    async def ExpandVolume(self, request: pb.ExpandVolumeRequest, context: Context) -> pb.Volume:
        async def work() -> pb.Volume:
            desc = await self._backend.expand_volume(request.name, request.size_bytes)
            return convert.volume_to_pb(desc)

        return await self._run(context, "ExpandVolume", request.name, work)

    async def CreateSnapshot(
        self, request: pb.CreateSnapshotRequest, context: Context
    ) -> pb.Snapshot:
        async def work() -> pb.Snapshot:
            desc = await self._backend.create_snapshot(request.volume, request.name)
            return convert.snapshot_to_pb(desc)

        return await self._run(context, "CreateSnapshot", f"{request.volume}@{request.name}", work)

    async def DeleteSnapshot(
        self, request: pb.DeleteSnapshotRequest, context: Context
    ) -> pb.DeleteSnapshotResponse:
        async def work() -> pb.DeleteSnapshotResponse:
            existed = await self._backend.delete_snapshot(request.volume, request.name)
            return pb.DeleteSnapshotResponse(existed=existed)

        return await self._run(context, "DeleteSnapshot", f"{request.volume}@{request.name}", work)

    async def ListSnapshots(
        self, request: pb.ListSnapshotsRequest, context: Context
    ) -> pb.ListSnapshotsResponse:
        async def work() -> pb.ListSnapshotsResponse:
            snaps = await self._backend.list_snapshots(request.volume)
            return pb.ListSnapshotsResponse(snapshots=[convert.snapshot_to_pb(s) for s in snaps])

        return await self._run(context, "ListSnapshots", request.volume, work)

    async def CloneVolume(self, request: pb.CloneVolumeRequest, context: Context) -> pb.Volume:
        async def work() -> pb.Volume:
            if not request.HasField("source"):
                raise InvalidArgumentError(
                    "source is required: give the volume and snapshot to clone from"
                )
            source = convert.source_from_pb(request.source)
            return convert.volume_to_pb(await self._backend.clone_volume(request.name, source))

        return await self._run(context, "CloneVolume", request.name, work)

    async def SetVolumeRole(self, request: pb.SetVolumeRoleRequest, context: Context) -> pb.Volume:
        async def work() -> pb.Volume:
            role = convert.role_from_pb(request.role)
            desc = await self._backend.set_volume_role(request.name, role, request.epoch)
            return convert.volume_to_pb(desc)

        return await self._run(context, "SetVolumeRole", request.name, work)

    async def SetPortState(self, request: pb.SetPortStateRequest, context: Context) -> pb.Volume:
        async def work() -> pb.Volume:
            state = convert.state_from_pb(request.state)
            if request.portal_group_tag == 0:
                raise InvalidArgumentError(
                    "portal_group_tag is required: Health lists this server's portal groups"
                )
            desc = await self._backend.set_port_state(
                request.volume, request.portal_group_tag, state
            )
            return convert.volume_to_pb(desc)

        return await self._run(context, "SetPortState", request.volume, work)

    async def GetCapacity(
        self, request: pb.GetCapacityRequest, context: Context
    ) -> pb.GetCapacityResponse:
        async def work() -> pb.GetCapacityResponse:
            return convert.capacity_to_pb(await self._backend.get_capacity())

        return await self._run(context, "GetCapacity", "-", work)

    async def Health(self, request: pb.HealthRequest, context: Context) -> pb.HealthResponse:
        async def work() -> pb.HealthResponse:
            return convert.health_to_pb(await self._backend.health())

        return await self._run(context, "Health", "-", work)

    # Access control. The log line names the volume only: requests carry secrets.

    async def SetVolumeAuth(self, request: pb.SetVolumeAuthRequest, context: Context) -> pb.Volume:
        async def work() -> pb.Volume:
            chap = convert.chap_from_pb(request.chap, "chap") if request.HasField("chap") else None
            mutual = (
                convert.chap_from_pb(request.mutual_chap, "mutual_chap")
                if request.HasField("mutual_chap")
                else None
            )
            desc = await self._backend.set_volume_auth(request.name, chap, mutual)
            return convert.volume_to_pb(desc)

        return await self._run(context, "SetVolumeAuth", request.name, work)

    async def SetVolumeAccess(
        self, request: pb.SetVolumeAccessRequest, context: Context
    ) -> pb.Volume:
        async def work() -> pb.Volume:
            if not request.restricted and request.allowed_initiators:
                raise InvalidArgumentError(
                    "allowed_initiators given with restricted false: set restricted to admit "
                    "only those initiators, or send no names to admit every initiator"
                )
            allowed = list(request.allowed_initiators) if request.restricted else None
            desc = await self._backend.set_volume_access(request.name, allowed)
            return convert.volume_to_pb(desc)

        return await self._run(context, "SetVolumeAccess", request.name, work)

    async def AllowInitiator(self, request: pb.InitiatorRequest, context: Context) -> pb.Volume:
        async def work() -> pb.Volume:
            desc = await self._backend.allow_initiator(request.name, request.initiator_name)
            return convert.volume_to_pb(desc)

        subject = f"{request.name} {request.initiator_name[:64]}"
        return await self._run(context, "AllowInitiator", subject, work)

    async def RevokeInitiator(self, request: pb.InitiatorRequest, context: Context) -> pb.Volume:
        async def work() -> pb.Volume:
            desc = await self._backend.revoke_initiator(request.name, request.initiator_name)
            return convert.volume_to_pb(desc)

        subject = f"{request.name} {request.initiator_name[:64]}"
        return await self._run(context, "RevokeInitiator", subject, work)

    async def SetReplication(
        self, request: pb.SetReplicationRequest, context: Context
    ) -> pb.ReplicationState:
        async def work() -> pb.ReplicationState:
            role = convert.role_from_pb(request.role)
            mode = (
                convert.mode_from_pb(request.mode)
                if role is Role.PRIMARY or request.mode
                else DurabilityMode.SYNC_ALL
            )
            info = await self._backend.set_replication(
                request.name,
                role=role,
                epoch=request.epoch,
                mode=mode,
                replicas=list(request.replicas),
                resync_limit_bps=request.resync_limit_bps,
            )
            return convert.replication_to_pb(info)

        return await self._run(context, "SetReplication", request.name, work)

    async def GetReplication(
        self, request: pb.GetReplicationRequest, context: Context
    ) -> pb.ReplicationState:
        async def work() -> pb.ReplicationState:
            return convert.replication_to_pb(await self._backend.get_replication(request.name))

        return await self._run(context, "GetReplication", request.name, work)

    async def ChecksumVolume(
        self, request: pb.ChecksumVolumeRequest, context: Context
    ) -> pb.ChecksumVolumeResponse:
        async def work() -> pb.ChecksumVolumeResponse:
            c = await self._backend.checksum_volume(request.name)
            return pb.ChecksumVolumeResponse(
                sha256=c.sha256, size_bytes=c.size_bytes, last_lsn=max(c.last_lsn, 0)
            )

        return await self._run(context, "ChecksumVolume", request.name, work)


def add_to_server(service: VolumeServerService, server: grpc.aio.Server) -> None:
    pb_grpc.add_VolumeServerServicer_to_server(service, server)
