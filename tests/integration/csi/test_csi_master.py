"""The CSI controller through the master, with real processes: a real ``blockyard master`` on
SQLite, three real ``blockyard serve --master`` volume servers and a real ``blockyard csi
--mode controller --backend master://...``.

CreateVolume with replicas=2 makes two copies with their roles; ControllerPublishVolume lists
the primary's portal first and admits the node on every copy's server; after kill -9 of the
primary's server and the failover (epoch 2), ControllerPublishVolume lists the new primary
first; ControllerUnpublishVolume fences the node on the live copy; once the killed server is
back (as a replica), DeleteVolume removes both copies; every call is retried and answers the
same."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import grpc
import pytest
from csi_helpers import Csi, block_cap, launch_csi, rpc_code, run_csi

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "master"))

from test_master_process import (
    Proc,
    alive_servers,
    cluster,
    get_volume,
    launch,
    server_volume,
    wait_for,
)

from blockyard.csi.initiators import node_initiator_name
from blockyard.csi.proto import csi_pb2 as pb
from blockyard.engine.epoch import Role
from blockyard.errors import NotFoundError
from blockyard.server.backend import VolumeDescription
from blockyard.server.client import VolumeServerClient
from blockyard.server.proto import volume_server_pb2 as vpb

__all__ = ["cluster"]  # the fixture, imported so pytest finds it here

MIB = 1 << 20
RPC_TIMEOUT_S = 60.0
RPC = pb.ControllerServiceCapability.RPC


def server_desc(api: str, name: str) -> VolumeDescription | None:
    async def main() -> VolumeDescription | None:
        async with VolumeServerClient(api, timeout_s=10.0) as c:
            try:
                return await c.get_volume(name)
            except NotFoundError:
                return None

    return asyncio.run(main())


def publish(csi: Csi, volume_id: str, node_id: str) -> dict[str, str]:
    resp = csi.controller.ControllerPublishVolume(
        pb.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=node_id, volume_capability=block_cap()
        ),
        timeout=RPC_TIMEOUT_S,
    )
    return dict(resp.publish_context)


def test_csi_controller_through_the_master_across_a_failover(
    cluster: tuple[Proc, list[Proc]], tmp_path: Path
) -> None:
    master, servers = cluster
    addr = master.fields["master"]
    wait_for("three alive servers", lambda: len(alive_servers(addr)) == 3)
    apis = alive_servers(addr)
    proc_of = {sid: next(s for s in servers if s.fields["api"] == api) for sid, api in apis.items()}
    portal_of = {sid: proc_of[sid].fields["iscsi"] for sid in apis}

    csi = launch_csi(
        tmp_path / "csi.sock",
        tmp_path / "csi-logs",
        "--mode", "controller", "--node-id", "controller-0",
        "--backend", f"master://{addr}", "--state-dir", str(tmp_path / "csi-state"),
    )  # fmt: skip
    assert csi.ready, csi.stderr()
    try:
        caps = {
            c.rpc.type
            for c in csi.controller.ControllerGetCapabilities(
                pb.ControllerGetCapabilitiesRequest(), timeout=RPC_TIMEOUT_S
            ).capabilities
        }
        assert RPC.CREATE_DELETE_VOLUME in caps and RPC.PUBLISH_UNPUBLISH_VOLUME in caps
        assert caps.isdisjoint({RPC.CREATE_DELETE_SNAPSHOT, RPC.CLONE_VOLUME, RPC.LIST_SNAPSHOTS})

        def create(**params: str) -> pb.CreateVolumeRequest:
            return pb.CreateVolumeRequest(
                name="pvc-a",
                capacity_range=pb.CapacityRange(required_bytes=8 * MIB),
                volume_capabilities=[block_cap()],
                parameters=params,
            )

        code, msg = rpc_code(csi.controller.CreateVolume, create(replicas="5"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "replicas" in msg, msg
        code, msg = rpc_code(csi.controller.CreateVolume, create(durability="local"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "sync_all" in msg, msg

        request = create(replicas="2", durability="sync_all")
        first = csi.controller.CreateVolume(request, timeout=RPC_TIMEOUT_S)
        again = csi.controller.CreateVolume(request, timeout=RPC_TIMEOUT_S)
        assert first.volume == again.volume
        assert (first.volume.volume_id, first.volume.capacity_bytes) == ("pvc-a", 8 * MIB)

        info = get_volume(addr, "pvc-a")
        assert (info.replica_count, info.mode, len(info.copies)) == (
            2,
            vpb.DURABILITY_MODE_SYNC_ALL,
            2,
        )
        primary = info.primary_server_id
        [replica] = [c.server_id for c in info.copies if c.server_id != primary]
        wait_for(
            "roles applied on both servers",
            lambda: (
                server_volume(apis[primary], "pvc-a") == (Role.PRIMARY, 1)
                and server_volume(apis[replica], "pvc-a") == (Role.REPLICA, 1)
            ),
        )
        # Created admitting nobody, on both copies.
        for sid in (primary, replica):
            d = server_desc(apis[sid], "pvc-a")
            assert d is not None and d.access.restricted and d.access.allowed_initiators == ()

        initiator = node_initiator_name("node-1")
        ctx = publish(csi, "pvc-a", "node-1")
        assert ctx["portals"].split(",") == [portal_of[primary], portal_of[replica]]
        assert ctx["portal"] == portal_of[primary]
        info = get_volume(addr, "pvc-a")
        assert ctx["iqn"] == info.iqn and info.iqn
        assert ctx["initiatorName"] == initiator
        for sid in (primary, replica):
            d = server_desc(apis[sid], "pvc-a")
            assert d is not None and d.access.allowed_initiators == (initiator,), sid
        assert publish(csi, "pvc-a", "node-1") == ctx  # a retry answers the same

        # Only an in-sync replica is promoted: the volume is active once it caught up.
        wait_for("the volume active", lambda: get_volume(addr, "pvc-a").status == "active")
        proc_of[primary].stop(signal.SIGKILL)
        wait_for("the replica promoted (epoch 2)", lambda: get_volume(addr, "pvc-a").epoch == 2)
        assert get_volume(addr, "pvc-a").primary_server_id == replica
        wait_for(
            "the new primary applied epoch 2",
            lambda: server_volume(apis[replica], "pvc-a") == (Role.PRIMARY, 2),
        )
        ctx2 = publish(csi, "pvc-a", "node-1")
        assert ctx2["portals"].split(",") == [portal_of[replica], portal_of[primary]]
        assert ctx2["portal"] == portal_of[replica]
        assert ctx2["iqn"] == ctx["iqn"]

        for _ in range(2):  # the retry answers the same
            csi.controller.ControllerUnpublishVolume(
                pb.ControllerUnpublishVolumeRequest(volume_id="pvc-a", node_id="node-1"),
                timeout=RPC_TIMEOUT_S,
            )
        d = server_desc(apis[replica], "pvc-a")
        assert d is not None and d.access.restricted and d.access.allowed_initiators == ()

        # The killed server returns on its data directory and API port, fenced by the epoch
        # as a replica; then DeleteVolume has every copy to remove. (Deleting while a copy's
        # server is still dead is refused by the master today; see test_bug_ below.)
        old = proc_of[primary]
        args = list(old.args)
        args[args.index("--api-listen") + 1] = old.fields["api"]
        back = launch(args, old.log.with_name("serve-back.log"))
        servers.append(back)
        assert back.fields, back.log.read_text()
        wait_for(
            "the old primary back as a replica at epoch 2",
            lambda: server_volume(apis[primary], "pvc-a") == (Role.REPLICA, 2),
        )

        for _ in range(2):
            csi.controller.DeleteVolume(
                pb.DeleteVolumeRequest(volume_id="pvc-a"), timeout=RPC_TIMEOUT_S
            )
        code, _ = rpc_code(
            csi.controller.ControllerGetVolume, pb.ControllerGetVolumeRequest(volume_id="pvc-a")
        )
        assert code == grpc.StatusCode.NOT_FOUND
        for api in (apis[primary], apis[replica]):
            wait_for(f"the copy on {api} removed", lambda a=api: server_desc(a, "pvc-a") is None)
        listed = csi.controller.ListVolumes(pb.ListVolumesRequest(), timeout=RPC_TIMEOUT_S)
        assert [e.volume.volume_id for e in listed.entries] == []
    finally:
        assert csi.stop() == 0, csi.stderr()


@pytest.mark.parametrize(
    "backend",
    ["master://", "master://127.0.0.1", "master://127.0.0.1:1,nothost"],
)
def test_bad_master_backend_is_a_usage_error(tmp_path: Path, backend: str) -> None:
    result = run_csi(
        tmp_path / "csi.sock", "--mode", "controller", "--node-id", "c", "--backend", backend
    )
    assert result.returncode == 2, result.stderr
    assert "--backend" in result.stderr and "HOST:PORT" in result.stderr, result.stderr


def test_delete_while_a_copy_server_is_dead(
    cluster: tuple[Proc, list[Proc]], tmp_path: Path
) -> None:
    master, servers = cluster
    addr = master.fields["master"]
    wait_for("three alive servers", lambda: len(alive_servers(addr)) == 3)
    apis = alive_servers(addr)
    proc_of = {sid: next(s for s in servers if s.fields["api"] == api) for sid, api in apis.items()}
    csi = launch_csi(
        tmp_path / "csi.sock",
        tmp_path / "csi-logs",
        "--mode", "controller", "--node-id", "controller-0",
        "--backend", f"master://{addr}", "--state-dir", str(tmp_path / "csi-state"),
    )  # fmt: skip
    assert csi.ready, csi.stderr()
    try:
        csi.controller.CreateVolume(
            pb.CreateVolumeRequest(
                name="pvc-b",
                capacity_range=pb.CapacityRange(required_bytes=8 * MIB),
                volume_capabilities=[block_cap()],
                parameters={"replicas": "2"},
            ),
            timeout=RPC_TIMEOUT_S,
        )
        info = get_volume(addr, "pvc-b")
        [replica] = [c.server_id for c in info.copies if c.server_id != info.primary_server_id]
        proc_of[replica].stop(signal.SIGKILL)
        wait_for(
            "the replica's server reported dead",
            lambda: (
                {c.server_id: c.state for c in get_volume(addr, "pvc-b").copies}[replica] == "dead"
            ),
        )
        code, msg = rpc_code(csi.controller.DeleteVolume, pb.DeleteVolumeRequest(volume_id="pvc-b"))
        assert code == grpc.StatusCode.OK, msg
    finally:
        assert csi.stop() == 0, csi.stderr()
