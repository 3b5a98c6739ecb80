"""sw-block's CreateVolume retried after a master restart found the record and returned it
without re-exporting the volume: the copies were never assigned again. A create retried
against a restarted master must return the same volume (same uuid, no new copies) and queue
every copy's assignment again; one interrupted mid-create (pending) must be finished."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from master_harness import addresses
from memstore import MemStore

from blockyard.engine.epoch import Role
from blockyard.master import model
from blockyard.master.core import MasterConfig, MasterCore
from blockyard.master.model import Heartbeat
from blockyard.master.proto import master_pb2 as mpb
from blockyard.master.service import MasterService
from blockyard.master.store import KIND_VOLUMES
from blockyard.server.proto import volume_server_pb2 as vpb


@dataclass
class FakeServers:
    """Volume servers' management APIs: records every create/delete (by api address)."""

    volumes: dict[str, dict[str, str]] = field(default_factory=dict)
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)
    #: Servers whose delete fails as if they were down.
    down: set[str] = field(default_factory=set)

    def client(self, api: str) -> Any:
        servers = self

        class Client:
            async def create_volume(
                self, name: str, size_bytes: int, *, volume_uuid: uuid.UUID | None = None
            ) -> None:
                servers.calls.append(("create", api, name))
                if api in servers.refuse:
                    from blockyard.errors import NoSpaceError  # noqa: PLC0415

                    raise NoSpaceError("full")
                servers.volumes.setdefault(api, {})[name] = str(volume_uuid)

            async def delete_volume(self, name: str) -> None:
                servers.calls.append(("delete", api, name))
                if api in servers.down:
                    from blockyard.errors import ServerUnavailableError  # noqa: PLC0415

                    raise ServerUnavailableError(f"{api} is down")
                servers.volumes.get(api, {}).pop(name, None)

            async def expand_volume(self, name: str, size_bytes: int) -> None:
                servers.calls.append(("expand", api, name))

            async def close(self) -> None:
                return None

        return Client()


class Ctx:
    """The part of a ServicerContext the service uses; abort raises like gRPC's."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def set_trailing_metadata(self, md: object) -> None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise grpc.RpcError(details)


async def boot(store: MemStore, servers: FakeServers, now: list[int]) -> MasterService:
    await store.campaign("m1", "m1:1")
    snap = await store.load()
    core = MasterCore(MasterConfig("m1"), now[0])
    core.load(
        [(model.decode_server(r.value), r.version) for r in snap.servers.values()],
        [(model.decode_volume(r.value), r.version) for r in snap.volumes.values()],
    )
    svc = MasterService(
        core, store, servers.client, address="m1:1", store_kind="mem", clock_ns=lambda: now[0]
    )
    for sid in ("s1", "s2"):
        _, intents = core.on_heartbeat(
            core.open_stream(),
            Heartbeat(sid, True, addresses(sid), capacity_bytes=1 << 40, free_bytes=1 << 40),
            now[0],
        )
        await svc.run_intents(intents)
    return svc


REQ = mpb.MasterCreateVolumeRequest(
    name="vol", size_bytes=1 << 30, replica_count=2, mode=vpb.DURABILITY_MODE_SYNC_ALL
)


def test_retried_create_after_restart_reassigns_every_copy() -> None:
    async def main() -> None:
        store, servers, now = MemStore(), FakeServers(), [10**12]
        svc = await boot(store, servers, now)
        info = await svc.CreateVolume(REQ, Ctx())  # type: ignore[arg-type]
        assert info.status in ("active", "degraded") and len(info.copies) == 2
        creates = len([c for c in servers.calls if c[0] == "create"])
        # The master restarts: a new core over the same store.
        svc2 = await boot(store, servers, now)
        svc2.core.assignments = type(svc2.core.assignments)()  # nothing queued survives
        again = await svc2.CreateVolume(REQ, Ctx())  # type: ignore[arg-type]
        assert again.uuid == info.uuid
        assert len([c for c in servers.calls if c[0] == "create"]) == creates
        queued = {
            sid: [(a.volume, a.role, a.epoch) for a in svc2.core.assignments.pending(sid)]
            for sid in ("s1", "s2")
        }
        assert queued == {"s1": [("vol", Role.PRIMARY, 1)], "s2": [("vol", Role.REPLICA, 1)]}

    asyncio.run(main())


def test_retried_create_finishes_a_pending_record() -> None:
    async def main() -> None:
        store, servers, now = MemStore(), FakeServers(), [10**12]
        svc = await boot(store, servers, now)
        # A master crashed after persisting the pending record, before creating copies.
        rec = model.VolumeRecord(
            name="vol",
            uuid=str(uuid.uuid4()),
            size_bytes=1 << 30,
            replica_count=2,
            mode=model.DurabilityMode.SYNC_ALL,
            epoch=1,
            status=model.VolumeStatus.PENDING,
            primary="s1",
            copies=(
                model.CopyRecord("s1", Role.PRIMARY, model.CopyState.PENDING),
                model.CopyRecord("s2", Role.REPLICA, model.CopyState.PENDING),
            ),
        )
        await store.put(KIND_VOLUMES, "vol", model.encode_volume(rec), expect_version=0)
        svc = await boot(store, servers, now)
        info = await svc.CreateVolume(REQ, Ctx())  # type: ignore[arg-type]
        assert info.uuid == rec.uuid and info.status != "pending"
        assert servers.volumes == {
            "10.0.0.1:9500": {"vol": rec.uuid},
            "10.0.0.2:9500": {"vol": rec.uuid},
        }

    asyncio.run(main())


def test_sync_all_refuses_to_be_created_short_and_cleans_up() -> None:
    async def main() -> None:
        store, servers, now = MemStore(), FakeServers(refuse={"10.0.0.2:9500"}), [10**12]
        svc = await boot(store, servers, now)
        ctx = Ctx()
        with pytest.raises(grpc.RpcError):
            await svc.CreateVolume(REQ, ctx)  # type: ignore[arg-type]
        assert ctx.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "best_effort" in ctx.details
        assert servers.volumes.get("10.0.0.1:9500", {}) == {}
        assert store.records.get(KIND_VOLUMES, {}) == {}
        best = mpb.MasterCreateVolumeRequest(
            name="vol", size_bytes=1 << 30, replica_count=2, mode=vpb.DURABILITY_MODE_BEST_EFFORT
        )
        info = await svc.CreateVolume(best, Ctx())  # type: ignore[arg-type]
        assert (info.status, len(info.copies)) == ("degraded", 1)

    asyncio.run(main())
