"""A plain write to a sync_all (or sync_quorum) volume is acknowledged only once the replica
*received* it (commit.py, "Receipt"): the promoted copy must hold every write the initiator was
told is done, or a flush the initiator re-issues after a failover would cover a write that is
gone. Two real in-process volume servers (no master) and a real replication link; the write
goes in as the iSCSI fast path sends it (``ReplicatedDevice.try_write_pending`` on the event
loop) and as the general path does (``write`` on a worker thread)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from blockyard.engine.epoch import Role
from blockyard.replication.commit import DurabilityMode
from blockyard.server.daemon import VolumeServerDaemon
from blockyard.testing.inproc import device_of, start_volume_server

MIB = 1 << 20
WAIT_S = 20.0


start = start_volume_server
device = device_of


async def until(predicate: object, what: str) -> None:
    assert callable(predicate)
    async with asyncio.timeout(WAIT_S):
        while not predicate():
            await asyncio.sleep(0.01)


async def pair(tmp_path: Path, mode: DurabilityMode) -> tuple[VolumeServerDaemon, ...]:
    p = await start(tmp_path / "p")
    r = await start(tmp_path / "r")
    assert p.manager is not None and r.manager is not None
    created = await p.manager.create_volume("v", 4 * MIB)
    await r.manager.create_volume("v", 4 * MIB, volume_uuid=created.uuid)
    await r.manager.set_replication("v", role=Role.REPLICA, epoch=2)
    await p.manager.set_replication(
        "v", role=Role.PRIMARY, epoch=2, mode=mode, replicas=[r.manager.replication.address]
    )
    replication = device(p, "v").replication
    assert replication is not None
    await until(lambda: replication.tracker.in_sync() != [], "the replica in sync")
    return p, r


def test_a_fast_path_write_is_acknowledged_only_once_the_replica_holds_it(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        p, r = await pair(tmp_path, DurabilityMode.SYNC_ALL)
        try:
            dev, replica = device(p, "v"), device(r, "v").volume
            for i in range(20):
                got = dev.try_write_pending(8 * i, bytes([i + 1]) * 4096)
                assert isinstance(got, asyncio.Future), "sync_all: the answer must wait"
                held_at_ack: list[int] = []
                got.add_done_callback(lambda _f, seen=held_at_ack: seen.append(replica.last_lsn))
                async with asyncio.timeout(WAIT_S):
                    await got
                dev.finish_pending_write(got)
                # When the write could be acknowledged, the replica had applied it.
                assert held_at_ack == [dev.volume.last_lsn], (held_at_ack, dev.volume.last_lsn)
            # And the worker-thread path waits as well.
            lsn = await asyncio.to_thread(dev.write, 0, b"\xee" * 4096)
            assert replica.last_lsn >= lsn
            assert replica.read(0, 8) == b"\xee" * 4096
        finally:
            await p.close()
            await r.close()

    asyncio.run(main())


def test_best_effort_acknowledges_on_the_local_wal_alone(tmp_path: Path) -> None:
    async def main() -> None:
        p, r = await pair(tmp_path, DurabilityMode.BEST_EFFORT)
        try:
            dev = device(p, "v")
            got = dev.try_write_pending(0, b"\x01" * 4096)
            assert isinstance(got, int) and got == dev.volume.last_lsn
        finally:
            await p.close()
            await r.close()

    asyncio.run(main())
