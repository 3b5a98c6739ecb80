"""Regression: promoting a replica while its old primary's first record of a new history
segment was being applied made two threads rewrite the copy's ``history.json`` through the
same temporary file at once — the promotion failed with FileExistsError / FileNotFoundError on
``history.json.tmp`` (10 of 15 runs before the fix). Now a promotion first ends the copy's
replication session (and waits for its storage work in the pool) and takes no new one until
the role change is done.

Real in-process volume servers (real sockets, files and replication), three promotions in a
row, each right after a write on the old primary."""

from __future__ import annotations

import asyncio
from pathlib import Path

from blockyard.engine.epoch import Role
from blockyard.replication.commit import DurabilityMode
from blockyard.server.daemon import VolumeServerDaemon
from blockyard.testing.inproc import UNREACHABLE_MASTER, start_volume_server

MIB = 1 << 20
WAIT_S = 20.0


async def start(data_dir: Path) -> VolumeServerDaemon:
    # A master nobody answers: leases come from replicas only.
    return await start_volume_server(data_dir, masters=(UNREACHABLE_MASTER,))


async def promote_once(root: Path) -> None:
    p = await start(root / "p")
    r = await start(root / "r")
    try:
        assert p.manager is not None and r.manager is not None
        created = await p.manager.create_volume("v", 4 * MIB)
        await r.manager.create_volume("v", 4 * MIB, volume_uuid=created.uuid)
        await r.manager.set_replication("v", role=Role.REPLICA, epoch=3)
        # best_effort: the write returns before the replica applied it (sync_all would wait
        # for its receipt), so the promotion below races that apply.
        await p.manager.set_replication(
            "v",
            role=Role.PRIMARY,
            epoch=3,
            mode=DurabilityMode.BEST_EFFORT,
            replicas=[r.manager.replication.address],
        )
        dev = {v.name: d for v, d in p.manager.devices()}["v"]
        lease = dev.lease
        assert lease is not None
        async with asyncio.timeout(WAIT_S):
            while not lease.allows():
                await asyncio.sleep(0.01)
        await asyncio.to_thread(dev.write, 0, b"\x01" * 4096)
        # At once: the replica may be applying that record's new segment right now.
        await r.manager.set_replication("v", role=Role.PRIMARY, epoch=4)
        vol = {v.name: v for v, _ in r.manager.devices()}["v"]
        assert (vol.role, vol.epoch) == (Role.PRIMARY, 4)
    finally:
        await p.close()
        await r.close()


def test_promotion_never_races_the_old_session_on_the_history_file(tmp_path: Path) -> None:
    for i in range(3):
        asyncio.run(promote_once(tmp_path / str(i)))
