"""The heartbeat client (``serve --master``) of a real in-process volume server daemon against a
small in-test grpc.aio Master servicer that records heartbeats and answers with scripted
leases and assignments (a test double for the client only)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from blockyard.engine.epoch import Role
from blockyard.master.proto import master_pb2 as mpb
from blockyard.master.proto import master_pb2_grpc as mgrpc
from blockyard.server.daemon import Address, DaemonConfig, VolumeServerDaemon
from blockyard.server.heartbeat import HeartbeatClient
from blockyard.server.proto import volume_server_pb2 as vpb
from blockyard.server.server_id import load_or_create_server_id

MIB = 1 << 20
WAIT_S = 20.0
INTERVAL_S = 0.05


class FakeMaster(mgrpc.MasterServicer):
    def __init__(self) -> None:
        self.heartbeats: list[mpb.ServerHeartbeat] = []
        self.assignments: list[mpb.Assignment] = []
        self.leases: list[mpb.Lease] = []
        self.redirect_to = ""
        self.changed = asyncio.Event()

    async def Heartbeat(
        self,
        request_iterator: AsyncIterator[mpb.ServerHeartbeat],
        context: grpc.aio.ServicerContext[mpb.ServerHeartbeat, mpb.MasterReply],
    ) -> AsyncIterator[mpb.MasterReply]:
        if self.redirect_to:
            context.set_trailing_metadata((("blockyard-leader", self.redirect_to),))
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"not the leader; {self.redirect_to} is"
            )
        async for hb in request_iterator:
            self.heartbeats.append(hb)
            self.changed.set()
            yield mpb.MasterReply(
                seq=hb.seq,
                sent_mono_ns=hb.sent_mono_ns,
                leases=self.leases,
                assignments=self.assignments,
                master_id="fake",
            )


async def start_master(servicer: FakeMaster) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    mgrpc.add_MasterServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def start_daemon(data_dir: Path, masters: tuple[str, ...]) -> VolumeServerDaemon:
    config = DaemonConfig(
        data_dir=str(data_dir),
        iscsi_listen=(Address("127.0.0.1", 0),),
        api_listen=Address("127.0.0.1", 0),
        replication_listen=Address("127.0.0.1", 0),
        masters=masters,
        heartbeat_interval_s=INTERVAL_S,
        shutdown_timeout_s=10.0,
    )
    d = VolumeServerDaemon(config)
    await d.start()
    return d


async def until(predicate: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(WAIT_S):
        while not predicate():
            await asyncio.sleep(0.01)
    assert predicate(), what


def run(tmp_path: Path, body: Callable[[FakeMaster, VolumeServerDaemon], Awaitable[None]]) -> None:
    async def main() -> None:
        master = FakeMaster()
        server, address = await start_master(master)
        d = await start_daemon(tmp_path / "data", (address,))
        try:
            await body(master, d)
        finally:
            await d.close()
            await server.stop(0)

    asyncio.run(main())


def test_registers_full_then_deltas_and_stops(tmp_path: Path) -> None:
    async def body(master: FakeMaster, d: VolumeServerDaemon) -> None:
        await until(lambda: len(master.heartbeats) >= 4, "heartbeats")
        first, *rest = master.heartbeats
        assert first.full and first.seq == 1
        assert first.server_id == load_or_create_server_id(str(tmp_path / "data"))
        assert first.addresses.api.endswith(f":{d.api_port}")
        assert first.addresses.replication == d.manager.replication.address  # type: ignore[union-attr]
        assert len(first.addresses.iscsi_portals) == 1
        assert first.capacity_bytes > 0
        assert not any(hb.full for hb in rest)
        seqs = [hb.seq for hb in master.heartbeats]
        assert seqs == list(range(1, len(seqs) + 1))
        sent = [hb.sent_mono_ns for hb in master.heartbeats]
        assert sent == sorted(sent) and len(set(sent)) == len(sent)
        hb_client = d.heartbeat
        assert hb_client is not None
        await hb_client.stop()
        await until(lambda: master.heartbeats[-1].stopping, "the stopping heartbeat")
        assert [hb.stopping for hb in master.heartbeats].count(True) == 1

    run(tmp_path, body)


def test_applies_assignments_reports_them_and_deletes(tmp_path: Path) -> None:
    vol_uuid = uuid.uuid4()

    async def body(master: FakeMaster, d: VolumeServerDaemon) -> None:
        manager = d.manager
        assert manager is not None
        master.assignments = [
            mpb.Assignment(
                volume="v1",
                uuid=str(vol_uuid),
                size_bytes=4 * MIB,
                role=vpb.ROLE_PRIMARY,
                epoch=3,
                mode=vpb.DURABILITY_MODE_SYNC_ALL,
                create=True,
            )
        ]

        def reported() -> bool:
            return any(
                v.name == "v1" and v.role == vpb.ROLE_PRIMARY and v.epoch == 3
                for hb in master.heartbeats
                for v in hb.volumes
            )

        await until(reported, "the assignment applied and reported")
        vol = {v.name: v for v, _ in manager.devices()}["v1"]
        assert (vol.uuid, vol.size_bytes, vol.role, vol.epoch) == (
            vol_uuid,
            4 * MIB,
            Role.PRIMARY,
            3,
        )
        # Re-sent until confirmed: applying again changes nothing and reports nothing new.
        n = len(master.heartbeats)
        await until(lambda: len(master.heartbeats) >= n + 5, "more heartbeats")
        assert not any(v.name == "v1" for hb in master.heartbeats[n + 1 :] for v in hb.volumes)

        master.assignments = [mpb.Assignment(volume="v1", uuid=str(vol_uuid), deleted=True)]

        def deleted() -> bool:
            return any(v.name == "v1" and v.deleted for hb in master.heartbeats for v in hb.volumes)

        await until(deleted, "the delete reported")
        assert manager.devices() == []

    run(tmp_path, body)


def test_leases_follow_grants(tmp_path: Path) -> None:
    async def body(master: FakeMaster, d: VolumeServerDaemon) -> None:
        manager = d.manager
        assert manager is not None
        await manager.create_volume("v2", 4 * MIB)
        # A replica nobody listens on: the replica lease never holds, only grants count.
        await manager.set_replication("v2", role=Role.PRIMARY, epoch=2, replicas=["127.0.0.1:9"])
        lease = {v.name: dev for v, dev in manager.devices()}["v2"].lease
        assert lease is not None and lease.required
        assert not lease.allows()
        master.leases = [mpb.Lease(volume="v2", epoch=2, ttl_ms=300)]
        await until(lease.allows, "a grant gives the lease")
        # A grant is timed from the heartbeat it answers, never from its arrival.
        hb_client = d.heartbeat
        assert hb_client is not None
        assert lease.deadline_ns <= master.heartbeats[-1].sent_mono_ns + 300_000_000
        master.leases = [mpb.Lease(volume="v2", epoch=1, ttl_ms=300)]  # a stale epoch
        await until(lambda: not lease.allows(), "the lease lapses without grants")
        master.leases = [mpb.Lease(volume="v2", epoch=2, ttl_ms=300)]
        await until(lease.allows, "it resumes")

    run(tmp_path, body)


def test_follows_the_leader_named_by_a_refusal(tmp_path: Path) -> None:
    async def main() -> None:
        leader, follower = FakeMaster(), FakeMaster()
        leader_server, leader_address = await start_master(leader)
        follower_server, follower_address = await start_master(follower)
        follower.redirect_to = leader_address
        d = await start_daemon(tmp_path / "data", (follower_address,))
        try:
            await until(lambda: len(leader.heartbeats) >= 2, "heartbeats reach the leader")
            assert leader.heartbeats[0].full
            assert follower.heartbeats == []
        finally:
            await d.close()
            await leader_server.stop(0)
            await follower_server.stop(0)

    asyncio.run(main())


def test_reconnects_with_full_state_after_the_master_restarts(tmp_path: Path) -> None:
    async def main() -> None:
        master = FakeMaster()
        server, address = await start_master(master)
        port = int(address.rsplit(":", 1)[1])
        d = await start_daemon(tmp_path / "data", (address,))
        try:
            await until(lambda: len(master.heartbeats) >= 2, "heartbeats")
            await server.stop(0)
            again = FakeMaster()
            server = grpc.aio.server()
            mgrpc.add_MasterServicer_to_server(again, server)  # type: ignore[no-untyped-call]
            assert server.add_insecure_port(f"127.0.0.1:{port}") == port
            await server.start()
            await until(lambda: len(again.heartbeats) >= 2, "heartbeats to the new master")
            assert again.heartbeats[0].full
        finally:
            await d.close()
            await server.stop(0)

    asyncio.run(main())


def test_without_master_no_heartbeat_and_no_lease(tmp_path: Path) -> None:
    async def main() -> None:
        d = await start_daemon(tmp_path / "data", ())
        try:
            assert d.heartbeat is None
            assert d.manager is not None
            await d.manager.create_volume("v", 4 * MIB)
            assert all(dev.lease is None for _, dev in d.manager.devices())
            assert not (tmp_path / "data" / ".server-id").exists()
        finally:
            await d.close()

    asyncio.run(main())


def test_client_needs_a_master() -> None:
    with pytest.raises(ValueError, match="master"):
        HeartbeatClient(None, None, [])  # type: ignore[arg-type]
