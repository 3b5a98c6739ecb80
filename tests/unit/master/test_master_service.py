"""The master's gRPC servicer over an in-memory store: status codes, idempotence, paging, the
degrade decision persisted before the answer, follower redirects."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from memstore import MemStore
from test_bug_master_idempotent_create_after_restart import REQ, Ctx, FakeServers, boot

from blockyard.master.proto import master_pb2 as mpb
from blockyard.master.store import KIND_VOLUMES


def run(fn: object) -> None:
    asyncio.run(fn())  # type: ignore[operator]


def test_follower_answers_failed_precondition_naming_the_leader() -> None:
    async def main() -> None:
        store, servers, now = MemStore(), FakeServers(), [10**12]
        svc = await boot(store, servers, now)
        await store.close()  # leadership gone
        store._leader = None
        from blockyard.master.store import LeaderInfo  # noqa: PLC0415

        store.leader = lambda: LeaderInfo("m2", "10.1.1.1:9400", 9)  # type: ignore[method-assign]
        ctx = Ctx()
        md: list[object] = []
        ctx.set_trailing_metadata = md.append  # type: ignore[method-assign]
        with pytest.raises(grpc.RpcError):
            await svc.GetVolume(mpb.MasterGetVolumeRequest(name="x"), ctx)  # type: ignore[arg-type]
        assert ctx.code is grpc.StatusCode.FAILED_PRECONDITION
        assert "10.1.1.1:9400" in ctx.details
        assert md == [(("blockyard-leader", "10.1.1.1:9400"),)]

    run(main)


def test_delete_is_idempotent_and_deletes_every_copy() -> None:
    async def main() -> None:
        store, servers, now = MemStore(), FakeServers(), [10**12]
        svc = await boot(store, servers, now)
        await svc.CreateVolume(REQ, Ctx())  # type: ignore[arg-type]
        r = await svc.DeleteVolume(mpb.MasterDeleteVolumeRequest(name="vol"), Ctx())  # type: ignore[arg-type]
        assert r.existed
        assert all(not v for v in servers.volumes.values())
        assert store.records.get(KIND_VOLUMES, {}) == {}
        r = await svc.DeleteVolume(mpb.MasterDeleteVolumeRequest(name="vol"), Ctx())  # type: ignore[arg-type]
        assert not r.existed

    run(main)


def test_delete_with_a_copy_server_down_keeps_only_that_copy() -> None:
    async def main() -> None:
        store, servers, now = MemStore(), FakeServers(), [10**12]
        svc = await boot(store, servers, now)
        await svc.CreateVolume(REQ, Ctx())  # type: ignore[arg-type]
        rec = svc.core.registry.volumes["vol"]
        [replica] = [c.server_id for c in rec.copies if c.server_id != rec.primary]
        down_api = svc.core.registry.servers[replica].addresses.api
        servers.down.add(down_api)
        r = await svc.DeleteVolume(mpb.MasterDeleteVolumeRequest(name="vol"), Ctx())  # type: ignore[arg-type]
        assert r.existed
        left = svc.core.registry.volumes["vol"]
        # The primary's copy is deleted, so the record must not name it primary any more.
        assert left.server_ids == (replica,) and left.primary == ""
        assert left.status.value == "deleting"
        stored = json.loads(store.records[KIND_VOLUMES]["vol"].value)
        assert stored["primary"] == "" and len(stored["copies"]) == 1
        # A retry (the CSI sidecar's) is still answered OK and keeps the copy to delete.
        r = await svc.DeleteVolume(mpb.MasterDeleteVolumeRequest(name="vol"), Ctx())  # type: ignore[arg-type]
        assert r.existed
        servers.down.clear()
        await svc.DeleteVolume(mpb.MasterDeleteVolumeRequest(name="vol"), Ctx())  # type: ignore[arg-type]
        assert "vol" not in svc.core.registry.volumes
        assert all(not v for v in servers.volumes.values())

    run(main)


def test_create_with_other_parameters_is_already_exists() -> None:
    async def main() -> None:
        store, servers, now = MemStore(), FakeServers(), [10**12]
        svc = await boot(store, servers, now)
        await svc.CreateVolume(REQ, Ctx())  # type: ignore[arg-type]
        other = mpb.MasterCreateVolumeRequest(name="vol", size_bytes=2 << 30)
        ctx = Ctx()
        with pytest.raises(grpc.RpcError):
            await svc.CreateVolume(other, ctx)  # type: ignore[arg-type]
        assert ctx.code is grpc.StatusCode.ALREADY_EXISTS and "size" in ctx.details

    run(main)


def test_busy_volume_is_aborted() -> None:
    async def main() -> None:
        store, servers, now = MemStore(), FakeServers(), [10**12]
        svc = await boot(store, servers, now)
        svc.core.begin("vol")
        ctx = Ctx()
        with pytest.raises(grpc.RpcError):
            await svc.CreateVolume(REQ, ctx)  # type: ignore[arg-type]
        assert ctx.code is grpc.StatusCode.ABORTED

    run(main)


def test_list_pages() -> None:
    async def main() -> None:
        store, servers, now = MemStore(), FakeServers(), [10**12]
        svc = await boot(store, servers, now)
        for i in range(5):
            req = mpb.MasterCreateVolumeRequest(name=f"v{i}", size_bytes=1 << 20, replica_count=1)
            await svc.CreateVolume(req, Ctx())  # type: ignore[arg-type]
        names: list[str] = []
        token = ""
        for _ in range(10):
            page = await svc.ListVolumes(
                mpb.MasterListVolumesRequest(max_entries=2, starting_token=token),
                Ctx(),  # type: ignore[arg-type]
            )
            names += [v.name for v in page.volumes]
            token = page.next_token
            if not token:
                break
        assert names == [f"v{i}" for i in range(5)]

    run(main)


def test_expand_grows_every_copy_and_refuses_to_shrink() -> None:
    async def main() -> None:
        store, servers, now = MemStore(), FakeServers(), [10**12]
        svc = await boot(store, servers, now)
        await svc.CreateVolume(REQ, Ctx())  # type: ignore[arg-type]
        info = await svc.ExpandVolume(
            mpb.MasterExpandVolumeRequest(name="vol", size_bytes=2 << 30),
            Ctx(),  # type: ignore[arg-type]
        )
        assert info.size_bytes == 2 << 30
        assert sorted(c[1] for c in servers.calls if c[0] == "expand") == [
            "10.0.0.1:9500",
            "10.0.0.2:9500",
        ]
        ctx = Ctx()
        with pytest.raises(grpc.RpcError):
            await svc.ExpandVolume(mpb.MasterExpandVolumeRequest(name="vol", size_bytes=1), ctx)  # type: ignore[arg-type]
        assert ctx.code is grpc.StatusCode.OUT_OF_RANGE

    run(main)


def test_mark_out_of_sync_is_in_the_store_before_the_answer() -> None:
    async def main() -> None:
        store, servers, now = MemStore(), FakeServers(), [10**12]
        svc = await boot(store, servers, now)
        info = await svc.CreateVolume(REQ, Ctx())  # type: ignore[arg-type]
        req = mpb.MarkOutOfSyncRequest(
            volume="vol", epoch=1, server_id=info.primary_server_id, replica_address="10.0.0.2:9600"
        )
        await svc.MarkOutOfSync(req, Ctx())  # type: ignore[arg-type]
        doc = json.loads(store.records[KIND_VOLUMES]["vol"].value)
        assert {c["server_id"]: c["state"] for c in doc["copies"]}["s2"] == "out_of_sync"
        # A stale primary (old epoch) is refused.
        stale = mpb.MarkOutOfSyncRequest(
            volume="vol", epoch=0, server_id=info.primary_server_id, replica_address="x:1"
        )
        ctx = Ctx()
        with pytest.raises(grpc.RpcError):
            await svc.MarkOutOfSync(stale, ctx)  # type: ignore[arg-type]
        assert ctx.code is grpc.StatusCode.FAILED_PRECONDITION and "epoch 1" in ctx.details

    run(main)


def test_drain_is_persisted_and_reports_progress() -> None:
    async def main() -> None:
        store, servers, now = MemStore(), FakeServers(), [10**12]
        svc = await boot(store, servers, now)
        await svc.CreateVolume(REQ, Ctx())  # type: ignore[arg-type]
        info = await svc.DrainServer(mpb.DrainServerRequest(server_id="s2"), Ctx())  # type: ignore[arg-type]
        assert (info.state, info.drain_remaining) == ("draining", 1)
        doc = json.loads(store.records["servers"]["s2"].value)
        assert doc["state"] == "draining"
        ctx = Ctx()
        with pytest.raises(grpc.RpcError):
            await svc.DrainServer(mpb.DrainServerRequest(server_id="nope"), ctx)  # type: ignore[arg-type]
        assert ctx.code is grpc.StatusCode.NOT_FOUND

    run(main)


def test_mark_send_time_outlasts_the_hold_window() -> None:
    """With the primary's send time on the mark, a heartbeat it sent earlier is ignored however
    late it arrives (the hold window alone would have expired)."""

    async def main() -> None:
        from master_harness import addresses  # noqa: PLC0415

        from blockyard.engine.epoch import Role  # noqa: PLC0415
        from blockyard.master.model import Heartbeat, ReplicaReport, VolumeReport  # noqa: PLC0415

        store, servers, now = MemStore(), FakeServers(), [10**12]
        svc = await boot(store, servers, now)
        info = await svc.CreateVolume(REQ, Ctx())  # type: ignore[arg-type]
        req = mpb.MarkOutOfSyncRequest(
            volume="vol",
            epoch=1,
            server_id="s1",
            replica_address=addresses("s2").replication,
            sent_mono_ns=5_000,
        )
        await svc.MarkOutOfSync(req, Ctx())  # type: ignore[arg-type]
        now[0] += 3600 * 10**9
        late = VolumeReport(
            "vol",
            info.uuid,
            Role.PRIMARY,
            1,
            replicas=(ReplicaReport(addresses("s2").replication, True, True, "in_sync"),),
        )
        stream = svc.core.open_stream()
        hb = Heartbeat("s1", True, addresses("s1"), volumes=(late,), sent_mono_ns=4_000)
        _, intents = svc.core.on_heartbeat(stream, hb, now[0])
        await svc.run_intents(intents)
        copy = svc.core.registry.volumes["vol"].copy_on("s2")
        assert copy is not None and copy.state.value == "out_of_sync"

    run(main)
