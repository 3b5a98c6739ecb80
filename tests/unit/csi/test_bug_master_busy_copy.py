"""ControllerPublishVolume right after a failover answered ABORTED: the new primary's server
was still applying the master's assignment (its one-operation-per-volume lock), and the
backend passed the server's OperationInProgressError straight up. The master backend now waits
(bounded) for a busy copy as for one not created yet; seen in
tests/integration/csi/test_csi_master.py about once in ten runs.

Also here: which copies the login rules go to (every copy but those on dead servers) and what a
copy that does not exist yet gives once the wait is over."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Collection
from typing import Any

import pytest

from blockyard.csi.master_backend import MasterBackend
from blockyard.engine.epoch import Role
from blockyard.errors import NotFoundError, OperationInProgressError, ServerUnavailableError
from blockyard.master.proto import master_pb2 as mpb
from blockyard.scsi.alua import AccessState
from blockyard.server.backend import AccessInfo, ExportInfo, PortalInfo, VolumeDescription
from blockyard.server.proto import volume_server_pb2 as vpb

VOLUME_UUID = uuid.UUID("28bb0dce-df37-4c8f-b453-24166558ccda")


class FakeMaster:
    def __init__(self, info: mpb.VolumeInfo) -> None:
        self.info = info

    async def get_volume(self, name: str) -> mpb.VolumeInfo:
        assert name == self.info.name
        out = mpb.VolumeInfo()
        out.CopyFrom(self.info)
        return out

    async def close(self) -> None:
        return None


class FakeServer:
    """One volume server's ACL calls; ``failures`` are raised first, one per call."""

    def __init__(self, failures: list[Exception] | None = None) -> None:
        self.failures = list(failures or [])
        self.allowed: list[str] = []
        self.calls = 0

    async def set_volume_access(
        self, name: str, allowed: Collection[str] | None
    ) -> VolumeDescription:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        self.allowed = list(allowed or ())
        return _desc(name, self.allowed)

    async def close(self) -> None:
        return None


def _desc(name: str, allowed: list[str]) -> VolumeDescription:
    export = ExportInfo(
        (PortalInfo("10.0.0.1", 3260, 1, AccessState.ACTIVE_OPTIMIZED),), f"iqn.x:{name}", 0, ""
    )
    return VolumeDescription(
        name=name,
        uuid=VOLUME_UUID,
        size_bytes=1 << 20,
        role=Role.PRIMARY,
        epoch=2,
        allocated_bytes=0,
        snapshot_count=0,
        created_ns=0,
        export=export,
        access=AccessInfo(restricted=True, allowed_initiators=tuple(allowed)),
    )


def _info(*copies: tuple[str, str]) -> mpb.VolumeInfo:
    return mpb.VolumeInfo(
        name="v",
        uuid=str(VOLUME_UUID),
        size_bytes=1 << 20,
        epoch=2,
        primary_server_id=copies[0][0],
        copies=[
            mpb.CopyInfo(
                server_id=sid,
                role=vpb.ROLE_PRIMARY if i == 0 else vpb.ROLE_REPLICA,
                state=state,
                addresses=mpb.ServerAddresses(
                    iscsi_portals=[f"10.0.0.{i + 1}:3260"], api=f"{sid}:7400"
                ),
            )
            for i, (sid, state) in enumerate(copies)
        ],
    )


def _backend(
    info: mpb.VolumeInfo, servers: dict[str, FakeServer], copy_wait_s: float
) -> MasterBackend:
    backend = MasterBackend(
        ["127.0.0.1:1"],
        client=FakeMaster(info),  # type: ignore[arg-type]
        copy_wait_s=copy_wait_s,
    )
    fakes: dict[str, Any] = {f"{sid}:7400": s for sid, s in servers.items()}
    backend._servers.update(fakes)
    return backend


def test_a_busy_copy_is_waited_for() -> None:
    busy = FakeServer([OperationInProgressError("another operation on volume 'v' is running")])
    other = FakeServer()
    backend = _backend(_info(("a", "in_sync"), ("b", "in_sync")), {"a": busy, "b": other}, 30.0)
    desc = asyncio.run(backend.set_volume_access("v", ["iqn.n"]))
    assert busy.allowed == other.allowed == ["iqn.n"]
    assert busy.calls == 2
    assert desc.access.allowed_initiators == ("iqn.n",)


def test_a_copy_busy_past_the_wait_is_aborted_naming_it() -> None:
    busy = FakeServer([OperationInProgressError("busy")] * 5)
    backend = _backend(_info(("a", "in_sync"), ("b", "in_sync")), {"a": FakeServer(), "b": busy}, 0)
    with pytest.raises(OperationInProgressError, match="copy on server b is still busy"):
        asyncio.run(backend.set_volume_access("v", ()))


def test_dead_copies_are_skipped_and_missing_ones_fail_unavailable() -> None:
    live, dead = FakeServer(), FakeServer()
    backend = _backend(_info(("a", "in_sync"), ("b", "dead")), {"a": live, "b": dead}, 0)
    asyncio.run(backend.set_volume_access("v", ()))
    assert (live.calls, dead.calls) == (1, 0)

    missing = FakeServer([NotFoundError("no volume 'v'")])
    backend = _backend(_info(("a", "in_sync"), ("c", "in_sync")), {"a": live, "c": missing}, 0)
    with pytest.raises(ServerUnavailableError, match=r"copy on server c .* does not exist yet"):
        asyncio.run(backend.set_volume_access("v", ()))

    backend = _backend(_info(("a", "in_sync"), ("d", "pending")), {"a": live}, 0)
    with pytest.raises(ServerUnavailableError, match="copy on server d"):
        asyncio.run(backend.set_volume_access("v", ()))
