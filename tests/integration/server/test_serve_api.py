"""Every management RPC against a real `blockyard serve`, positive and negative, with real
initiators (libiscsi tools, qemu-io) checking that what the API says is what iSCSI serves."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import grpc
import pytest
from serve_helpers import IQN_PREFIX, Serve, need_tools, qemu_io, run_tool, stop_tool

from blockyard.engine.epoch import Role
from blockyard.errors import (
    AlreadyExistsError,
    BlockyardError,
    FencedError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
)
from blockyard.scsi.alua import AccessState
from blockyard.server.backend import SnapshotRef
from blockyard.server.client import VolumeServerClient
from blockyard.server.proto import volume_server_pb2 as pb
from blockyard.server.proto import volume_server_pb2_grpc as pb_grpc

MIB = 1 << 20


def code_of(serve: Serve, method: str, request: object) -> grpc.StatusCode:
    """Send a raw request (bypassing the client's typing) and return the status code."""

    async def main() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(serve.api) as channel:
            stub = pb_grpc.VolumeServerStub(channel)
            try:
                await getattr(stub, method)(request, timeout=20)
            except grpc.aio.AioRpcError as exc:
                assert exc.details(), "every error carries a message"
                return exc.code()
            return grpc.StatusCode.OK

    return asyncio.run(main())


def expect(serve: Serve, code: grpc.StatusCode, fn: object) -> BlockyardError:
    with pytest.raises(BlockyardError) as info:
        serve.call(fn)  # type: ignore[arg-type]
    cause = info.value.__cause__
    assert isinstance(cause, grpc.aio.AioRpcError)
    assert cause.code() == code, cause.details()
    return info.value


def test_create_is_idempotent_and_size_mismatch_is_already_exists(shared_serve: Serve) -> None:
    first = shared_serve.call(lambda c: c.create_volume("idem", 4 * MIB))
    again = shared_serve.call(lambda c: c.create_volume("idem", 4 * MIB))
    assert again.uuid == first.uuid and again.export == first.export
    assert first.export.iqn == f"{IQN_PREFIX}:idem.{first.uuid.hex[:12]}"
    assert first.export.lun == 0
    assert [p.address for p in first.export.portals] == shared_serve.iscsi
    assert [p.portal_group_tag for p in first.export.portals] == [1, 2]
    err = expect(
        shared_serve, grpc.StatusCode.ALREADY_EXISTS, lambda c: c.create_volume("idem", 8 * MIB)
    )
    assert isinstance(err, AlreadyExistsError) and "ExpandVolume" in str(err)


BAD_REQUESTS = [
    ("CreateVolume", pb.CreateVolumeRequest(name="", size_bytes=MIB)),
    ("CreateVolume", pb.CreateVolumeRequest(name="bad/name", size_bytes=MIB)),
    ("CreateVolume", pb.CreateVolumeRequest(name="ok", size_bytes=0)),
    ("CreateVolume", pb.CreateVolumeRequest(name="ok", size_bytes=MIB + 1)),
    ("CreateVolume", pb.CreateVolumeRequest(name="ok", size_bytes=4096)),  # below 1 MiB
    (
        "CreateVolume",
        pb.CreateVolumeRequest(name="ok", source=pb.SnapshotSource(volume="", snapshot="s")),
    ),
    ("DeleteVolume", pb.DeleteVolumeRequest(name="")),
    ("GetVolume", pb.GetVolumeRequest(name=".hidden")),
    ("ListVolumes", pb.ListVolumesRequest(page_size=-1)),
    ("ListVolumes", pb.ListVolumesRequest(page_token="garbage!")),
    ("ExpandVolume", pb.ExpandVolumeRequest(name="ok", size_bytes=0)),
    ("CreateSnapshot", pb.CreateSnapshotRequest(volume="ok", name="")),
    ("DeleteSnapshot", pb.DeleteSnapshotRequest(volume="", name="s")),
    ("ListSnapshots", pb.ListSnapshotsRequest(volume="")),
    ("CloneVolume", pb.CloneVolumeRequest(name="c")),
    ("SetVolumeRole", pb.SetVolumeRoleRequest(name="ok", epoch=1)),
    ("SetPortState", pb.SetPortStateRequest(volume="ok", portal_group_tag=1)),
    (
        "SetPortState",
        pb.SetPortStateRequest(volume="ok", state=pb.PORT_STATE_STANDBY),
    ),
    (
        "SetPortState",
        pb.SetPortStateRequest(volume="ok", portal_group_tag=9, state=pb.PORT_STATE_STANDBY),
    ),
]


@pytest.mark.parametrize(
    ("method", "request_msg"),
    BAD_REQUESTS,
    ids=[f"{m}-{i}" for i, (m, _) in enumerate(BAD_REQUESTS)],
)
def test_invalid_requests_are_invalid_argument(
    shared_serve: Serve, method: str, request_msg: object
) -> None:
    assert code_of(shared_serve, method, request_msg) == grpc.StatusCode.INVALID_ARGUMENT


UNKNOWN = [
    ("GetVolume", pb.GetVolumeRequest(name="nope")),
    ("ExpandVolume", pb.ExpandVolumeRequest(name="nope", size_bytes=2 * MIB)),
    ("CreateSnapshot", pb.CreateSnapshotRequest(volume="nope", name="s")),
    ("ListSnapshots", pb.ListSnapshotsRequest(volume="nope")),
    ("SetVolumeRole", pb.SetVolumeRoleRequest(name="nope", role=pb.ROLE_PRIMARY, epoch=1)),
    (
        "SetPortState",
        pb.SetPortStateRequest(volume="nope", portal_group_tag=1, state=pb.PORT_STATE_STANDBY),
    ),
    (
        "CloneVolume",
        pb.CloneVolumeRequest(name="c", source=pb.SnapshotSource(volume="nope", snapshot="s")),
    ),
]


@pytest.mark.parametrize(
    ("method", "request_msg"), UNKNOWN, ids=[f"{m}-{i}" for i, (m, _) in enumerate(UNKNOWN)]
)
def test_unknown_volumes_are_not_found(
    shared_serve: Serve, method: str, request_msg: object
) -> None:
    assert code_of(shared_serve, method, request_msg) == grpc.StatusCode.NOT_FOUND


def test_clone_from_unknown_snapshot_is_not_found(shared_serve: Serve) -> None:
    shared_serve.call(lambda c: c.create_volume("nosnap", 2 * MIB))
    err = expect(
        shared_serve,
        grpc.StatusCode.NOT_FOUND,
        lambda c: c.clone_volume("c2", SnapshotRef("nosnap", "missing")),
    )
    assert isinstance(err, NotFoundError)


def test_delete_is_idempotent_and_removes_every_file(shared_serve: Serve) -> None:
    shared_serve.call(lambda c: c.create_volume("del1", 2 * MIB))
    shared_serve.call(lambda c: c.create_snapshot("del1", "s1"))
    assert (shared_serve.data_dir / "del1").is_dir()
    first = shared_serve.call(lambda c: c.delete_volume("del1"))
    second = shared_serve.call(lambda c: c.delete_volume("del1"))
    assert (first.existed, second.existed) == (True, False)
    assert not (shared_serve.data_dir / "del1").exists()
    assert not [p for p in shared_serve.data_dir.iterdir() if "del1" in p.name]
    expect(shared_serve, grpc.StatusCode.NOT_FOUND, lambda c: c.get_volume("del1"))


def test_snapshots_are_idempotent_by_name(shared_serve: Serve) -> None:
    shared_serve.call(lambda c: c.create_volume("snapvol", 2 * MIB))
    a = shared_serve.call(lambda c: c.create_snapshot("snapvol", "s1"))
    b = shared_serve.call(lambda c: c.create_snapshot("snapvol", "s1"))
    assert a.uuid == b.uuid
    shared_serve.call(lambda c: c.create_snapshot("snapvol", "s2"))
    names = [s.name for s in shared_serve.call(lambda c: c.list_snapshots("snapvol"))]
    assert names == ["s1", "s2"]
    assert shared_serve.call(lambda c: c.delete_snapshot("snapvol", "s1")) is True
    assert shared_serve.call(lambda c: c.delete_snapshot("snapvol", "s1")) is False
    names = [s.name for s in shared_serve.call(lambda c: c.list_snapshots("snapvol"))]
    assert names == ["s2"]
    assert shared_serve.call(lambda c: c.get_volume("snapvol")).snapshot_count == 1


def test_pagination_visits_every_volume_once(shared_serve: Serve) -> None:
    for i in range(5):
        shared_serve.call(lambda c, i=i: c.create_volume(f"page-{i}", 1 * MIB))

    async def walk(c: VolumeServerClient) -> list[list[str]]:
        pages, token = [], ""
        while True:
            page = await c.list_volumes(2, token)
            pages.append([v.name for v in page.volumes])
            if not page.next_page_token:
                return pages
            token = page.next_page_token

    pages = shared_serve.call(walk)
    names = [n for page in pages for n in page]
    assert all(len(p) <= 2 for p in pages) and len(pages) >= 3
    assert names == sorted(names) and len(names) == len(set(names))
    assert {f"page-{i}" for i in range(5)} <= set(names)
    total = shared_serve.call(lambda c: c.health()).volume_count
    assert len(names) == total


def test_capacity_and_health(shared_serve: Serve) -> None:
    cap = shared_serve.call(lambda c: c.get_capacity())
    assert 0 < cap.available_bytes <= cap.total_bytes
    assert cap.min_volume_size_bytes == MIB
    health = shared_serve.call(lambda c: c.health())
    assert health.serving
    assert [p.address for p in health.portals] == shared_serve.iscsi


def test_role_changes_and_epoch_fencing(shared_serve: Serve) -> None:
    shared_serve.call(lambda c: c.create_volume("roles", 2 * MIB))
    desc = shared_serve.call(lambda c: c.set_volume_role("roles", Role.REPLICA, 7))
    assert (desc.role, desc.epoch) == (Role.REPLICA, 7)
    assert {p.state for p in desc.export.portals} == {AccessState.STANDBY}
    err = expect(
        shared_serve,
        grpc.StatusCode.FAILED_PRECONDITION,
        lambda c: c.set_volume_role("roles", Role.PRIMARY, 6),
    )
    assert isinstance(err, FencedError) and "epoch" in str(err)
    desc = shared_serve.call(lambda c: c.set_volume_role("roles", Role.PRIMARY, 8))
    assert {p.state for p in desc.export.portals} == {AccessState.ACTIVE_OPTIMIZED}
    assert shared_serve.call(lambda c: c.get_volume("roles")).epoch == 8


def test_created_volume_is_discoverable_and_usable_at_once(shared_serve: Serve) -> None:
    need_tools("iscsi-ls", "qemu-io")
    fresh = shared_serve.call(lambda c: c.create_volume("fresh", 4 * MIB))
    listing = run_tool("iscsi-ls", "-s", f"iscsi://{shared_serve.iscsi[0]}")
    assert listing.returncode == 0, listing.stderr
    assert fresh.export.iqn in listing.stdout
    written = qemu_io(shared_serve.url("fresh"), "write -P 0x5a 0 64k", "flush")
    assert written.returncode == 0, written.stderr + written.stdout
    read = qemu_io(shared_serve.url("fresh", portal=1), "read -P 0x5a 0 64k")
    assert read.returncode == 0 and "Pattern verification failed" not in read.stdout, read.stdout


def test_expand_shows_in_readcapacity_and_shrink_is_out_of_range(shared_serve: Serve) -> None:
    need_tools("iscsi-readcapacity16")
    shared_serve.call(lambda c: c.create_volume("grow", 4 * MIB))
    desc = shared_serve.call(lambda c: c.expand_volume("grow", 12 * MIB))
    assert desc.size_bytes == 12 * MIB
    out = run_tool("iscsi-readcapacity16", shared_serve.url("grow"))
    assert out.returncode == 0, out.stderr
    assert f"Total size:{12 * MIB}" in out.stdout
    err = expect(
        shared_serve, grpc.StatusCode.OUT_OF_RANGE, lambda c: c.expand_volume("grow", 4 * MIB)
    )
    assert isinstance(err, OutOfRangeError | InvalidArgumentError) and "shrink" in str(err)


def test_clone_carries_the_snapshot_data(shared_serve: Serve) -> None:
    need_tools("qemu-io")
    shared_serve.call(lambda c: c.create_volume("origin", 4 * MIB))
    assert qemu_io(shared_serve.url("origin"), "write -P 0x11 0 64k", "flush").returncode == 0
    shared_serve.call(lambda c: c.create_snapshot("origin", "snap"))
    assert qemu_io(shared_serve.url("origin"), "write -P 0x22 0 64k", "flush").returncode == 0
    clone = shared_serve.call(lambda c: c.clone_volume("copy", SnapshotRef("origin", "snap")))
    assert clone.size_bytes == 4 * MIB and clone.export.naa_id != ""
    origin = shared_serve.call(lambda c: c.get_volume("origin"))
    assert clone.export.naa_id != origin.export.naa_id
    read = qemu_io(shared_serve.url("copy"), "read -P 0x11 0 64k")
    assert read.returncode == 0 and "Pattern verification failed" not in read.stdout


def test_standby_portal_refuses_reads_active_one_serves(shared_serve: Serve) -> None:
    need_tools("qemu-io")
    shared_serve.call(lambda c: c.create_volume("alua", 4 * MIB))
    desc = shared_serve.call(lambda c: c.set_port_state("alua", 2, AccessState.STANDBY))
    assert {p.portal_group_tag: p.state for p in desc.export.portals} == {
        1: AccessState.ACTIVE_OPTIMIZED,
        2: AccessState.STANDBY,
    }
    active = qemu_io(shared_serve.url("alua", portal=0), "read 0 4k")
    assert active.returncode == 0 and "read 4096/4096" in active.stdout, active.stderr
    standby = qemu_io(shared_serve.url("alua", portal=1), "read 0 4k")
    assert "read 4096/4096" not in standby.stdout, standby.stdout
    # Back to active/optimized: the same portal serves again.
    shared_serve.call(lambda c: c.set_port_state("alua", 2, AccessState.ACTIVE_OPTIMIZED))
    again = qemu_io(shared_serve.url("alua", portal=1), "read 0 4k")
    assert again.returncode == 0 and "read 4096/4096" in again.stdout


def test_delete_terminates_live_sessions(shared_serve: Serve, tmp_path: Path) -> None:
    need_tools("qemu-io")
    live = shared_serve.call(lambda c: c.create_volume("live", 4 * MIB))
    # An interactive qemu-io keeps its iSCSI session open until stdin closes.
    proc = subprocess.Popen(
        ["qemu-io", "-f", "raw", shared_serve.url("live")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("write -P 0x33 0 4k\n")
        proc.stdin.flush()
        assert "wrote 4096/4096" in proc.stdout.readline() + proc.stdout.readline()
        result = shared_serve.call(lambda c: c.delete_volume("live"))
        assert result.existed and result.sessions_dropped >= 1
        assert not (shared_serve.data_dir / "live").exists()
        listing = run_tool("iscsi-ls", f"iscsi://{shared_serve.iscsi[0]}")
        assert live.export.iqn not in listing.stdout
    finally:
        stop_tool(proc)
