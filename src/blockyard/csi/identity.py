"""The CSI Identity service of ``block.blockyard.io``."""

from __future__ import annotations

import asyncio
from typing import Final

from google.protobuf import wrappers_pb2

import blockyard
from blockyard.csi.proto import csi_pb2 as pb
from blockyard.csi.proto import csi_pb2_grpc as pb_grpc
from blockyard.csi.rpc import Context, RpcRunner
from blockyard.errors import BlockyardError
from blockyard.server.backend import VolumeBackend

#: CSI spec GetPluginInfo: domain name notation, at most 63 characters.
PLUGIN_NAME: Final = "block.blockyard.io"
#: Probe waits this long for the backend's Health answer before reporting "not ready".
PROBE_TIMEOUT_S: Final = 5.0

Service = pb.PluginCapability.Service
Expansion = pb.PluginCapability.VolumeExpansion


class IdentityService(pb_grpc.IdentityServicer):
    """Identity answers the same capabilities in every mode (the CSI spec asks every instance
    of one version to agree). ``backend`` is None where no volume server is configured (node
    mode); Probe then reports ready."""

    def __init__(self, backend: VolumeBackend | None, runner: RpcRunner) -> None:
        self._backend = backend
        self._runner = runner

    async def GetPluginInfo(
        self, request: pb.GetPluginInfoRequest, context: Context
    ) -> pb.GetPluginInfoResponse:
        async def work() -> pb.GetPluginInfoResponse:
            return pb.GetPluginInfoResponse(name=PLUGIN_NAME, vendor_version=blockyard.__version__)

        return await self._runner.run(context, "GetPluginInfo", "-", work)

    async def GetPluginCapabilities(
        self, request: pb.GetPluginCapabilitiesRequest, context: Context
    ) -> pb.GetPluginCapabilitiesResponse:
        async def work() -> pb.GetPluginCapabilitiesResponse:
            return pb.GetPluginCapabilitiesResponse(
                capabilities=[
                    pb.PluginCapability(service=Service(type=Service.CONTROLLER_SERVICE)),
                    pb.PluginCapability(
                        service=Service(type=Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)
                    ),
                    pb.PluginCapability(volume_expansion=Expansion(type=Expansion.ONLINE)),
                ]
            )

        return await self._runner.run(context, "GetPluginCapabilities", "-", work)

    async def Probe(self, request: pb.ProbeRequest, context: Context) -> pb.ProbeResponse:
        async def work() -> pb.ProbeResponse:
            return pb.ProbeResponse(ready=wrappers_pb2.BoolValue(value=await self._ready()))

        return await self._runner.run(context, "Probe", "-", work)

    async def _ready(self) -> bool:
        """Ready once the backend answers Health and serves. A backend that does not answer
        is "not ready" rather than an error: restarting this plugin would not help."""
        if self._backend is None:
            return True
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                health = await self._backend.health()
        except (BlockyardError, TimeoutError):
            return False
        return health.serving
