"""VolumeManager in-process: per-volume exclusion, ALUA per portal group, roles, pagination,
adoption and the data-directory lock. The iSCSI servers are built but never started."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from blockyard.engine.epoch import Role
from blockyard.errors import (
    EpochRegressionError,
    InvalidArgumentError,
    OperationInProgressError,
    ServerStoppingError,
    ShrinkRefusedError,
    VolumeBusyError,
    VolumeExistsError,
    VolumeNotFoundError,
)
from blockyard.scsi.alua import AccessState
from blockyard.scsi.constants import (
    ASYMMETRIC_ACCESS_STATE_CHANGED,
    CAPACITY_DATA_HAS_CHANGED,
    LU_NOT_ACCESSIBLE_STANDBY,
    SenseKey,
    Status,
)
from blockyard.scsi.nexus import Nexus
from blockyard.server.backend import SnapshotRef
from blockyard.server.iscsi_server import DictTargetRegistry, IscsiServer, ServerSettings
from blockyard.server.manager import PortalGroup, VolumeManager

T = TypeVar("T")
MIB = 1 << 20
READ_10 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0])
TEST_UNIT_READY = bytes(6)
RTPG_EXTENDED = bytes([0xA3, 0x0A | 0x20, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0])


def make_manager(data_dir: Path, groups: int = 2) -> VolumeManager:
    portal_groups = []
    for tag in range(1, groups + 1):
        settings = ServerSettings(relative_target_port_id=tag, target_port_group_id=tag)
        registry = DictTargetRegistry()
        server = IscsiServer(registry, "127.0.0.1", 0, settings=settings)
        portal_groups.append(PortalGroup(tag, server, registry, "127.0.0.1"))
    return VolumeManager(str(data_dir), portal_groups)


def run_with(data_dir: Path, body: Callable[[VolumeManager], Awaitable[T]]) -> T:
    async def main() -> T:
        manager = make_manager(data_dir)
        await manager.start()
        try:
            return await body(manager)
        finally:
            await manager.close(10)

    return asyncio.run(main())


def nexus(group: int) -> Nexus:
    return Nexus("iqn.2024-01.org.example:h,i,0x1", f"t,t,0x{group:04x}", group, group)


def clear_power_on_ua(lu: object, nx: Nexus) -> None:
    result = lu.execute(nx, TEST_UNIT_READY)  # type: ignore[attr-defined]
    assert result.sense_key == SenseKey.UNIT_ATTENTION


def test_create_exports_on_every_portal_group(tmp_path: Path) -> None:
    async def body(m: VolumeManager) -> None:
        desc = await m.create_volume("vol1", 4 * MIB)
        # The IQN names this volume instance: its name plus 12 hex digits of its UUID.
        assert desc.export.iqn == f"iqn.2026-11.io.blockyard:vol1.{desc.uuid.hex[:12]}"
        assert [p.portal_group_tag for p in desc.export.portals] == [1, 2]
        assert len(desc.export.naa_id) == 32 and desc.export.naa_id.startswith("6")
        for group in m._groups:
            target = group.registry.lookup(desc.export.iqn)
            assert target is not None
            assert target.config.portal_group_tag == group.portal_group_tag
        again = await m.create_volume("vol1", 4 * MIB)
        assert again.uuid == desc.uuid
        with pytest.raises(VolumeExistsError, match="ExpandVolume"):
            await m.create_volume("vol1", 8 * MIB)

    run_with(tmp_path, body)


def test_idempotent_create_re_exports_a_removed_target(tmp_path: Path) -> None:
    async def body(m: VolumeManager) -> None:
        desc = await m.create_volume("vol1", 4 * MIB)
        for group in m._groups:
            group.registry.remove(desc.export.iqn)
        await m.create_volume("vol1", 4 * MIB)
        assert all(g.registry.lookup(desc.export.iqn) is not None for g in m._groups)

    run_with(tmp_path, body)


def test_concurrent_operation_on_same_volume_is_aborted(tmp_path: Path) -> None:
    async def body(m: VolumeManager) -> None:
        # The first create holds the name while its WAL is zero-filled in the pool.
        first = asyncio.ensure_future(m.create_volume("vol1", 64 * MIB))
        await asyncio.sleep(0)
        with pytest.raises(OperationInProgressError, match="retry"):
            await m.create_volume("vol1", 64 * MIB)
        other = await m.create_volume("vol2", 4 * MIB)  # other names are not blocked
        assert other.name == "vol2"
        assert (await first).name == "vol1"
        assert (await m.create_volume("vol1", 64 * MIB)).name == "vol1"

    run_with(tmp_path, body)


def test_port_state_is_per_volume_and_per_group(tmp_path: Path) -> None:
    async def body(m: VolumeManager) -> None:
        await m.create_volume("vol1", 4 * MIB)
        await m.create_volume("vol2", 4 * MIB)
        lu = m._exported["vol1"].lu
        nx1, nx2 = nexus(1), nexus(2)
        for nx in (nx1, nx2):
            clear_power_on_ua(lu, nx)
        desc = await m.set_port_state("vol1", 2, AccessState.STANDBY)
        states = {p.portal_group_tag: p.state for p in desc.export.portals}
        assert states == {1: AccessState.ACTIVE_OPTIMIZED, 2: AccessState.STANDBY}
        assert lu.pending_unit_attentions(nx2) == (ASYMMETRIC_ACCESS_STATE_CHANGED,)
        lu.execute(nx1, TEST_UNIT_READY)
        lu.execute(nx2, TEST_UNIT_READY)
        assert lu.execute(nx1, READ_10).status == Status.GOOD
        refused = lu.execute(nx2, READ_10)
        assert refused.sense_key == SenseKey.NOT_READY
        assert refused.asc_ascq == LU_NOT_ACCESSIBLE_STANDBY
        rtpg = lu.execute(nx2, RTPG_EXTENDED)
        assert rtpg.status == Status.GOOD and rtpg.data_in is not None
        data = bytes(rtpg.data_in)
        # SPC-4 §6.37: two descriptors of 8 bytes + one 4-byte port each, after 8 header bytes.
        assert (data[8] & 0x0F, int.from_bytes(data[10:12], "big")) == (0, 1)
        assert (data[20] & 0x0F, int.from_bytes(data[22:24], "big")) == (2, 2)
        vol2 = await m.get_volume("vol2")
        assert {p.state for p in vol2.export.portals} == {AccessState.ACTIVE_OPTIMIZED}
        with pytest.raises(InvalidArgumentError, match="portal_group_tag 3"):
            await m.set_port_state("vol1", 3, AccessState.STANDBY)

    run_with(tmp_path, body)


def test_role_sets_alua_state_and_epochs_only_move_forward(tmp_path: Path) -> None:
    async def body(m: VolumeManager) -> None:
        await m.create_volume("vol1", 4 * MIB)
        desc = await m.set_volume_role("vol1", Role.REPLICA, 3)
        assert (desc.role, desc.epoch) == (Role.REPLICA, 3)
        assert {p.state for p in desc.export.portals} == {AccessState.STANDBY}
        desc = await m.set_volume_role("vol1", Role.REBUILDING, 3)
        assert {p.state for p in desc.export.portals} == {AccessState.UNAVAILABLE}
        desc = await m.set_volume_role("vol1", Role.REPLICA, 4)
        desc = await m.set_volume_role("vol1", Role.PRIMARY, 5)
        assert {p.state for p in desc.export.portals} == {AccessState.ACTIVE_OPTIMIZED}
        with pytest.raises(EpochRegressionError):
            await m.set_volume_role("vol1", Role.PRIMARY, 4)

    run_with(tmp_path, body)
    # The role is durable and the ALUA state at adoption follows it.
    desc = run_with(tmp_path, lambda m: m.get_volume("vol1"))
    assert (desc.role, desc.epoch) == (Role.PRIMARY, 5)


def test_replica_role_is_standby_after_restart(tmp_path: Path) -> None:
    run_with(tmp_path, lambda m: m.create_volume("vol1", 4 * MIB))
    run_with(tmp_path, lambda m: m.set_volume_role("vol1", Role.REPLICA, 1))
    desc = run_with(tmp_path, lambda m: m.get_volume("vol1"))
    assert {p.state for p in desc.export.portals} == {AccessState.STANDBY}


def test_expand_notifies_initiators_and_refuses_shrink(tmp_path: Path) -> None:
    async def body(m: VolumeManager) -> None:
        await m.create_volume("vol1", 4 * MIB)
        lu = m._exported["vol1"].lu
        nx = nexus(1)
        clear_power_on_ua(lu, nx)
        desc = await m.expand_volume("vol1", 8 * MIB)
        assert desc.size_bytes == 8 * MIB
        assert lu.pending_unit_attentions(nx) == (CAPACITY_DATA_HAS_CHANGED,)
        await m.expand_volume("vol1", 8 * MIB)  # same size: no-op, no second UA
        assert lu.pending_unit_attentions(nx) == (CAPACITY_DATA_HAS_CHANGED,)
        with pytest.raises(ShrinkRefusedError):
            await m.expand_volume("vol1", 4 * MIB)

    run_with(tmp_path, body)


def test_pagination_is_stable_across_inserts(tmp_path: Path) -> None:
    async def body(m: VolumeManager) -> None:
        for i in range(5):
            await m.create_volume(f"v{i}", 1 * MIB)
        page1 = await m.list_volumes(2)
        assert [v.name for v in page1.volumes] == ["v0", "v1"]
        await m.create_volume("v00", 1 * MIB)  # sorts before the cursor: not repeated later
        page2 = await m.list_volumes(2, page1.next_page_token)
        page3 = await m.list_volumes(2, page2.next_page_token)
        assert [v.name for v in page2.volumes] == ["v2", "v3"]
        assert [v.name for v in page3.volumes] == ["v4"]
        assert page3.next_page_token == ""
        everything = await m.list_volumes(0)
        assert [v.name for v in everything.volumes] == ["v0", "v00", "v1", "v2", "v3", "v4"]

    run_with(tmp_path, body)


def test_clone_and_snapshot_idempotency(tmp_path: Path) -> None:
    async def body(m: VolumeManager) -> None:
        await m.create_volume("src", 4 * MIB)
        vol = m._exported["src"].volume
        vol.write(0, b"\xab" * 4096)
        snap = await m.create_snapshot("src", "s1")
        assert (await m.create_snapshot("src", "s1")).uuid == snap.uuid
        vol.write(0, b"\xcd" * 4096)
        clone = await m.create_volume("big", 8 * MIB, source=SnapshotRef("src", "s1"))
        assert clone.size_bytes == 8 * MIB
        assert m._exported["big"].volume.read(0, 8) == b"\xab" * 4096
        with pytest.raises(ShrinkRefusedError):
            await m.create_volume("small", 2 * MIB, source=SnapshotRef("src", "s1"))
        assert "small" not in m._exported
        assert await m.delete_snapshot("src", "s1") is True
        assert await m.delete_snapshot("src", "s1") is False
        assert await m.delete_snapshot("gone", "s1") is False
        with pytest.raises(VolumeNotFoundError):
            await m.list_snapshots("gone")

    run_with(tmp_path, body)


def test_delete_removes_files_and_is_idempotent(tmp_path: Path) -> None:
    async def body(m: VolumeManager) -> None:
        desc = await m.create_volume("vol1", 4 * MIB)
        await m.create_snapshot("vol1", "s1")
        result = await m.delete_volume("vol1")
        assert result.existed
        assert all(g.registry.lookup(desc.export.iqn) is None for g in m._groups)
        assert not (tmp_path / "vol1").exists()
        assert not (await m.delete_volume("vol1")).existed

    run_with(tmp_path, body)


def test_data_dir_is_locked_against_a_second_server(tmp_path: Path) -> None:
    async def main() -> None:
        first = make_manager(tmp_path)
        await first.start()
        second = make_manager(tmp_path)
        with pytest.raises(VolumeBusyError, match="another blockyard serve"):
            await second.start()
        await second.close(1)
        await first.close(5)
        third = make_manager(tmp_path)
        await third.start()  # the lock went with the first manager
        await third.close(5)

    asyncio.run(main())


def test_closed_manager_refuses_new_operations(tmp_path: Path) -> None:
    async def main() -> None:
        m = make_manager(tmp_path)
        await m.start()
        await m.create_volume("vol1", 1 * MIB)
        await m.close(5)
        with pytest.raises(ServerStoppingError):
            await m.create_volume("vol2", 1 * MIB)

    asyncio.run(main())
