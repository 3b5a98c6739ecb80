"""An async :class:`~blockyard.server.backend.VolumeServerControl` over gRPC.

Every call has a deadline; a failed call raises the
:class:`~blockyard.errors.BlockyardError` subclass its status code maps to (see
:mod:`blockyard.server.status`), with the server's message, so callers handle local and remote
errors alike. Use as ``async with VolumeServerClient("host:port") as client: ...``.

The channel is plaintext to loopback by default; anything else needs ``security`` with mutual
TLS, or ``insecure`` (see :mod:`blockyard.tls`). Integer fields are range-checked before they
reach protobuf, so an impossible size is an :class:`~blockyard.errors.InvalidSizeError`, not a
``ValueError`` from the encoder.
"""

from __future__ import annotations

import asyncio
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Collection, Sequence
from types import TracebackType
from typing import Final, TypeVar

import grpc

from blockyard import tls
from blockyard.engine.epoch import Role
from blockyard.engine.limits import MAX_VOLUME_SIZE_BYTES
from blockyard.errors import InvalidArgumentError, InvalidSizeError, ServerUnavailableError
from blockyard.iscsi.chap import ChapCredentials
from blockyard.replication.commit import DurabilityMode
from blockyard.replication.report import ReplicationInfo
from blockyard.scsi.alua import AccessState
from blockyard.server import convert
from blockyard.server.backend import (
    CapacityInfo,
    DeleteResult,
    HealthInfo,
    SnapshotDescription,
    SnapshotRef,
    VolumeChecksum,
    VolumeDescription,
    VolumePage,
)
from blockyard.server.proto import volume_server_pb2 as pb
from blockyard.server.proto import volume_server_pb2_grpc as pb_grpc
from blockyard.server.status import error_for

#: Deadline of calls that only read state.
DEFAULT_TIMEOUT_S: Final = 30.0
#: Deadline of calls that may move data (create zero-fills the WAL, clone copies blocks).
DEFAULT_SLOW_TIMEOUT_S: Final = 300.0

#: Ranges of the protobuf scalar types of the requests (protobuf language guide, scalar types).
UINT32_MAX: Final = (1 << 32) - 1
INT32_MIN: Final = -(1 << 31)
INT32_MAX: Final = (1 << 31) - 1
UINT64_MAX: Final = (1 << 64) - 1

Resp = TypeVar("Resp")


def _check_size(field: str, size_bytes: int) -> int:
    """Sizes the uint64 field can carry; the server checks the volume limits themselves."""
    if size_bytes < 0:
        raise InvalidSizeError(f"{field} {size_bytes} is negative: give the size in bytes")
    if size_bytes > UINT64_MAX:
        raise InvalidSizeError(
            f"{field} {size_bytes} is larger than any volume can be (at most "
            f"{MAX_VOLUME_SIZE_BYTES} bytes); give a smaller size"
        )
    return size_bytes


def _check_int(field: str, value: int, minimum: int, maximum: int) -> int:
    if not minimum <= value <= maximum:
        raise InvalidArgumentError(f"{field} {value} is out of range: use {minimum} to {maximum}")
    return value


class VolumeServerClient:
    """A client of one volume server's management API. Not thread-safe: use it from the event
    loop that created it."""

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        slow_timeout_s: float = DEFAULT_SLOW_TIMEOUT_S,
        security: tls.TransportSecurity = tls.PLAINTEXT,
    ) -> None:
        """Raises TlsConfigError (plaintext off loopback without ``insecure``) or
        TlsFileError (TLS files unusable) before any connection is made."""
        self.target = target
        self._timeout_s = timeout_s
        self._slow_timeout_s = slow_timeout_s
        self._security = security
        self._channel = tls.open_channel(target, security)
        self._stub = pb_grpc.VolumeServerStub(self._channel)

    async def __aenter__(self) -> VolumeServerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(
        self,
        method: Callable[..., Awaitable[Resp]],
        request: object,
        *,
        slow: bool = False,
    ) -> Resp:
        timeout = self._slow_timeout_s if slow else self._timeout_s
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            details = exc.details() or "no details"
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                # Transport failures carry gRPC's words, not ours: say which server it was,
                # and what to check when TLS is what failed (gRPC cannot tell us that it was).
                hint = tls.transport_hint(self._security, tls.target_host(self.target) or "")
                details = f"volume server {self.target}: {details} ({hint})"
            raise error_for(code, details) from exc

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait until the channel connects (for tools that just started the server)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._channel.channel_ready()
        except TimeoutError as exc:
            raise ServerUnavailableError(
                f"no volume server answered at {self.target} within {timeout_s:.0f} s; is "
                "`blockyard serve` running there with that --api-listen address? "
                f"({tls.transport_hint(self._security, tls.target_host(self.target) or '')})"
            ) from exc

    # ---- VolumeBackend --------------------------------------------------------------------

    async def create_volume(
        self,
        name: str,
        size_bytes: int,
        *,
        source: SnapshotRef | None = None,
        volume_uuid: uuidlib.UUID | None = None,
    ) -> VolumeDescription:
        request = pb.CreateVolumeRequest(
            name=name,
            size_bytes=_check_size("size_bytes", size_bytes),
            uuid="" if volume_uuid is None else str(volume_uuid),
        )
        if source is not None:
            request.source.CopyFrom(convert.source_to_pb(source))
        msg: pb.Volume = await self._call(self._stub.CreateVolume, request, slow=True)
        return convert.volume_from_pb(msg)

    async def delete_volume(self, name: str) -> DeleteResult:
        msg: pb.DeleteVolumeResponse = await self._call(
            self._stub.DeleteVolume, pb.DeleteVolumeRequest(name=name), slow=True
        )
        return DeleteResult(msg.existed, msg.sessions_dropped)

    async def get_volume(self, name: str) -> VolumeDescription:
        msg: pb.Volume = await self._call(self._stub.GetVolume, pb.GetVolumeRequest(name=name))
        return convert.volume_from_pb(msg)

    async def list_volumes(self, page_size: int = 0, page_token: str = "") -> VolumePage:
        msg: pb.ListVolumesResponse = await self._call(
            self._stub.ListVolumes,
            pb.ListVolumesRequest(
                page_size=_check_int("page_size", page_size, INT32_MIN, INT32_MAX),
                page_token=page_token,
            ),
        )
        return VolumePage(
            tuple(convert.volume_from_pb(v) for v in msg.volumes), msg.next_page_token
        )

    async def list_all_volumes(self, page_size: int = 0) -> list[VolumeDescription]:
        """Every volume, following page tokens (bounded by the server's pages)."""
        out: list[VolumeDescription] = []
        token = ""
        while True:
            page = await self.list_volumes(page_size, token)
            out.extend(page.volumes)
            if not page.next_page_token:
                return out
            token = page.next_page_token

    async def expand_volume(self, name: str, size_bytes: int) -> VolumeDescription:
        msg: pb.Volume = await self._call(
            self._stub.ExpandVolume,
            pb.ExpandVolumeRequest(name=name, size_bytes=_check_size("size_bytes", size_bytes)),
            slow=True,
        )
        return convert.volume_from_pb(msg)

    async def create_snapshot(self, volume: str, name: str) -> SnapshotDescription:
        msg: pb.Snapshot = await self._call(
            self._stub.CreateSnapshot, pb.CreateSnapshotRequest(volume=volume, name=name), slow=True
        )
        return convert.snapshot_from_pb(msg)

    async def delete_snapshot(self, volume: str, name: str) -> bool:
        msg: pb.DeleteSnapshotResponse = await self._call(
            self._stub.DeleteSnapshot, pb.DeleteSnapshotRequest(volume=volume, name=name), slow=True
        )
        return msg.existed

    async def list_snapshots(self, volume: str) -> tuple[SnapshotDescription, ...]:
        msg: pb.ListSnapshotsResponse = await self._call(
            self._stub.ListSnapshots, pb.ListSnapshotsRequest(volume=volume)
        )
        return tuple(convert.snapshot_from_pb(s) for s in msg.snapshots)

    async def clone_volume(self, name: str, source: SnapshotRef) -> VolumeDescription:
        msg: pb.Volume = await self._call(
            self._stub.CloneVolume,
            pb.CloneVolumeRequest(name=name, source=convert.source_to_pb(source)),
            slow=True,
        )
        return convert.volume_from_pb(msg)

    async def get_capacity(self) -> CapacityInfo:
        msg: pb.GetCapacityResponse = await self._call(
            self._stub.GetCapacity, pb.GetCapacityRequest()
        )
        return convert.capacity_from_pb(msg)

    async def health(self) -> HealthInfo:
        msg: pb.HealthResponse = await self._call(self._stub.Health, pb.HealthRequest())
        return convert.health_from_pb(msg)

    # ---- access control -------------------------------------------------------------------

    async def set_volume_auth(
        self,
        name: str,
        chap: ChapCredentials | None,
        mutual_chap: ChapCredentials | None = None,
    ) -> VolumeDescription:
        request = pb.SetVolumeAuthRequest(name=name)
        if chap is not None:
            request.chap.CopyFrom(convert.chap_to_pb(chap))
        if mutual_chap is not None:
            request.mutual_chap.CopyFrom(convert.chap_to_pb(mutual_chap))
        msg: pb.Volume = await self._call(self._stub.SetVolumeAuth, request, slow=True)
        return convert.volume_from_pb(msg)

    async def set_volume_access(
        self, name: str, allowed_initiators: Collection[str] | None
    ) -> VolumeDescription:
        request = pb.SetVolumeAccessRequest(
            name=name,
            restricted=allowed_initiators is not None,
            allowed_initiators=sorted(allowed_initiators or ()),
        )
        msg: pb.Volume = await self._call(self._stub.SetVolumeAccess, request, slow=True)
        return convert.volume_from_pb(msg)

    async def allow_initiator(self, name: str, initiator_name: str) -> VolumeDescription:
        request = pb.InitiatorRequest(name=name, initiator_name=initiator_name)
        msg: pb.Volume = await self._call(self._stub.AllowInitiator, request, slow=True)
        return convert.volume_from_pb(msg)

    async def revoke_initiator(self, name: str, initiator_name: str) -> VolumeDescription:
        request = pb.InitiatorRequest(name=name, initiator_name=initiator_name)
        msg: pb.Volume = await self._call(self._stub.RevokeInitiator, request, slow=True)
        return convert.volume_from_pb(msg)

    # ---- VolumeServerControl --------------------------------------------------------------

    async def set_volume_role(self, name: str, role: Role, epoch: int) -> VolumeDescription:
        request = pb.SetVolumeRoleRequest(
            name=name,
            role=convert.ROLE_TO_PB[role],
            epoch=_check_int("epoch", epoch, 0, UINT64_MAX),
        )
        msg: pb.Volume = await self._call(self._stub.SetVolumeRole, request, slow=True)
        return convert.volume_from_pb(msg)

    async def set_port_state(
        self, volume: str, portal_group_tag: int, state: AccessState
    ) -> VolumeDescription:
        request = pb.SetPortStateRequest(
            volume=volume,
            portal_group_tag=_check_int("portal_group_tag", portal_group_tag, 0, UINT32_MAX),
            state=convert.STATE_TO_PB[state],
        )
        msg: pb.Volume = await self._call(self._stub.SetPortState, request)
        return convert.volume_from_pb(msg)

    async def set_replication(
        self,
        name: str,
        *,
        role: Role,
        epoch: int,
        mode: DurabilityMode = DurabilityMode.SYNC_ALL,
        replicas: Sequence[str] = (),
        resync_limit_bps: int = 0,
    ) -> ReplicationInfo:
        request = pb.SetReplicationRequest(
            name=name,
            role=convert.ROLE_TO_PB[role],
            epoch=_check_int("epoch", epoch, 0, UINT64_MAX),
            mode=convert.MODE_TO_PB[mode],
            replicas=list(replicas),
            resync_limit_bps=_check_int("resync_limit_bps", resync_limit_bps, 0, UINT64_MAX),
        )
        msg: pb.ReplicationState = await self._call(self._stub.SetReplication, request, slow=True)
        return convert.replication_from_pb(msg)

    async def checksum_volume(self, name: str) -> VolumeChecksum:
        msg: pb.ChecksumVolumeResponse = await self._call(
            self._stub.ChecksumVolume, pb.ChecksumVolumeRequest(name=name), slow=True
        )
        return VolumeChecksum(msg.sha256, msg.size_bytes, msg.last_lsn)

    async def get_replication(self, name: str) -> ReplicationInfo:
        msg: pb.ReplicationState = await self._call(
            self._stub.GetReplication, pb.GetReplicationRequest(name=name)
        )
        return convert.replication_from_pb(msg)
