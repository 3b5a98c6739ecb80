"""Self-fencing in the data path: a primary whose lease lapsed fails every command that moves
data — writes, flushes and reads (its copy may be stale: another copy may have been promoted
and written) — with NOT READY / 04h-0Ah (asymmetric access state transition), reports its port
groups TRANSITIONING, and resumes when a lease comes back; without a lease object nothing
changes."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockyard.engine.epoch import Role
from blockyard.engine.store import VolumeStore
from blockyard.engine.volume import Volume
from blockyard.errors import LeaseExpiredError
from blockyard.replication.lease import DEFAULT_LEASE_TTL_NS, PrimaryLease
from blockyard.replication.primary import ReplicatedDevice
from blockyard.scsi import LogicalUnit, LuIdentity, MemoryReservationStore, StaticAlua
from blockyard.scsi.alua import AccessState, TargetPortGroup
from blockyard.scsi.constants import LU_NOT_ACCESSIBLE_TRANSITION, SenseKey
from blockyard.scsi.lu import WOULD_BLOCK
from blockyard.scsi.nexus import Nexus
from blockyard.scsi.sense import ScsiResult, Status

NEXUS = Nexus("iqn.2024-01.test:init,i,0x23d000000001", "iqn.2024-01.test:tgt,t,0x1", 1, 1)
MIB = 1 << 20
BLOCK = 512
S = 1_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now_ns = 5000 * S

    def __call__(self) -> int:
        return self.now_ns


def write10(lba: int, blocks: int, *, fua: bool = False) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0x08 if fua else 0, lba, 0, blocks, 0)


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def sync_cache10() -> bytes:
    return struct.pack(">BBIBHB", 0x35, 0, 0, 0, 0, 0)


def write_same16(lba: int, blocks: int, *, unmap: bool) -> bytes:
    return struct.pack(">BBQIBB", 0x93, 0x08 if unmap else 0, lba, blocks, 0, 0)


def unmap_cdb(length: int) -> bytes:
    return struct.pack(">BBIBHB", 0x42, 0, 0, 0, length, 0)


def unmap_params(lba: int, blocks: int) -> bytes:
    return struct.pack(">HH4xQI4x", 22, 16, lba, blocks)


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Volume]:
    vol = VolumeStore(str(tmp_path)).create("v", 4 * MIB)
    vol.set_role(Role.PRIMARY, 3)
    yield vol
    vol.close()


def make_lu(device: ReplicatedDevice) -> LogicalUnit:
    lu = LogicalUnit(
        device,
        LuIdentity(uuid.uuid4()),
        StaticAlua.single(),
        MemoryReservationStore(),
        volume_name="v",
    )
    while lu.execute(NEXUS, bytes(6)).status != Status.GOOD:  # the power-on UA
        pass
    return lu


def is_transitioning(result: ScsiResult) -> bool:
    return (
        result.status is Status.CHECK_CONDITION
        and result.sense_key == SenseKey.NOT_READY
        and result.asc_ascq == LU_NOT_ACCESSIBLE_TRANSITION
    )


def test_lapsed_lease_fails_writes_flushes_and_reads(volume: Volume) -> None:
    clock = FakeClock()
    lease = PrimaryLease("v", epoch=3, clock=clock)
    lease.set_replicas(["127.0.0.1:1"])
    lease.grant(3, clock(), DEFAULT_LEASE_TTL_NS)
    lu = make_lu(ReplicatedDevice(volume, lease))
    block = b"\xab" * BLOCK
    assert lu.execute(NEXUS, write10(0, 1), block).status is Status.GOOD

    clock.now_ns += DEFAULT_LEASE_TTL_NS  # the lease lapses
    fenced = {
        "WRITE": lu.execute(NEXUS, write10(8, 1), b"\xcd" * BLOCK),
        "WRITE FUA": lu.execute(NEXUS, write10(8, 1, fua=True), b"\xcd" * BLOCK),
        "SYNCHRONIZE CACHE": lu.execute(NEXUS, sync_cache10()),
        "UNMAP": lu.execute(NEXUS, unmap_cdb(24), unmap_params(0, 8)),
        "WRITE SAME": lu.execute(NEXUS, write_same16(0, 8, unmap=False), b"\x11" * BLOCK),
        "WRITE SAME UNMAP": lu.execute(NEXUS, write_same16(0, 8, unmap=True), bytes(BLOCK)),
        "READ": lu.execute(NEXUS, read10(0, 1)),
    }
    assert {name: is_transitioning(r) for name, r in fenced.items()} == dict.fromkeys(fenced, True)
    # The fast path declines writes (the general path answers the sense): nothing was written.
    assert lu.try_execute(NEXUS, write10(8, 1), b"\xcd" * BLOCK) is WOULD_BLOCK
    # A fast read (the block is in the page cache) answers the sense itself.
    fast = lu.try_execute(NEXUS, read10(0, 1))
    assert isinstance(fast, ScsiResult) and is_transitioning(fast), fast
    assert volume.read(8, 1) == bytes(BLOCK)

    lease.grant(3, clock(), DEFAULT_LEASE_TTL_NS)  # a lease comes back
    read = lu.execute(NEXUS, read10(0, 1))
    assert read.status is Status.GOOD
    assert read.data_in is not None and bytes(read.data_in) == block
    assert lu.execute(NEXUS, write10(8, 1, fua=True), b"\xcd" * BLOCK).status is Status.GOOD
    assert lu.execute(NEXUS, sync_cache10()).status is Status.GOOD
    assert volume.read(8, 1) == b"\xcd" * BLOCK


def test_a_lease_lapsing_while_the_data_is_read_fails_the_read(
    volume: Volume, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check that counts comes after the data was read: a primary paused between a check
    and its read (SIGSTOP, a VM freeze) may wake up deposed, holding stale data."""
    clock = FakeClock()
    lease = PrimaryLease("v", epoch=3, clock=clock)
    lease.set_replicas(["127.0.0.1:1"])
    lease.grant(3, clock(), DEFAULT_LEASE_TTL_NS)
    device = ReplicatedDevice(volume, lease)
    device.write(0, b"\xab" * BLOCK, fua=False)
    real_read, real_readinto, real_try_read = volume.read, volume.readinto, volume.try_read

    def paused(fn):  # type: ignore[no-untyped-def]
        def run(*args):  # type: ignore[no-untyped-def]
            out = fn(*args)
            clock.now_ns += DEFAULT_LEASE_TTL_NS  # the process slept inside the read
            return out

        return run

    monkeypatch.setattr(volume, "read", paused(real_read))
    monkeypatch.setattr(volume, "readinto", paused(real_readinto))
    monkeypatch.setattr(volume, "try_read", paused(real_try_read))
    for name, call in {
        "read": lambda: device.read(0, 1),
        "readinto": lambda: device.readinto(0, memoryview(bytearray(BLOCK))),
        "try_read": lambda: device.try_read(0, 1),
    }.items():
        lease.grant(3, clock(), DEFAULT_LEASE_TTL_NS)
        assert lease.allows()
        with pytest.raises(LeaseExpiredError):
            call()
            pytest.fail(f"{name} returned data read after the lease ran out")


def test_port_groups_report_transitioning_without_the_lease(volume: Volume) -> None:
    clock = FakeClock()
    lease = PrimaryLease("v", epoch=3, clock=clock)
    lease.set_replicas(["127.0.0.1:1"])
    lease.grant(3, clock(), DEFAULT_LEASE_TTL_NS)
    alua = StaticAlua(
        [
            TargetPortGroup(1, AccessState.ACTIVE_OPTIMIZED, (1,), preferred=True),
            TargetPortGroup(2, AccessState.STANDBY, (2,)),
        ],
        serving=lease.allows,
    )
    assert alua.access_state(1) is AccessState.ACTIVE_OPTIMIZED
    clock.now_ns += DEFAULT_LEASE_TTL_NS
    assert alua.access_state(1) is AccessState.TRANSITIONING
    # Only active groups transition: a standby group stays what it is.
    assert alua.access_state(2) is AccessState.STANDBY
    assert [(g.group_id, g.state) for g in alua.port_groups()] == [
        (1, AccessState.TRANSITIONING),
        (2, AccessState.STANDBY),
    ]
    lease.grant(3, clock(), DEFAULT_LEASE_TTL_NS)
    assert [g.state for g in alua.port_groups()] == [AccessState.ACTIVE_OPTIMIZED,
                                                     AccessState.STANDBY]  # fmt: skip


def test_no_lease_object_means_standalone_behaviour(volume: Volume) -> None:
    lu = make_lu(ReplicatedDevice(volume))
    assert lu.execute(NEXUS, write10(0, 1, fua=True), b"\x01" * BLOCK).status is Status.GOOD
    assert lu.execute(NEXUS, sync_cache10()).status is Status.GOOD


def test_rf1_primary_needs_no_lease(volume: Volume) -> None:
    clock = FakeClock()
    lu = make_lu(ReplicatedDevice(volume, PrimaryLease("v", epoch=3, clock=clock)))
    clock.now_ns += 3600 * S
    assert lu.execute(NEXUS, write10(0, 1, fua=True), b"\x01" * BLOCK).status is Status.GOOD
