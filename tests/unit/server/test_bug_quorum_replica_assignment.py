"""Bug: a replica of a sync_quorum volume refused its role. SetReplication checked "sync_quorum
needs at least two replicas" for every role, but only a primary is given replicas, so every
3-copy sync_quorum volume created through the master stayed pending: its replicas failed the
assignment on every heartbeat. The check is the primary's alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_heartbeat import MIB, start_daemon

from blockyard.engine.epoch import Role
from blockyard.errors import InvalidArgumentError
from blockyard.replication.commit import DurabilityMode


def test_a_sync_quorum_replica_takes_its_role_without_replicas(tmp_path: Path) -> None:
    async def main() -> None:
        d = await start_daemon(tmp_path / "data", ())
        try:
            manager = d.manager
            assert manager is not None
            await manager.create_volume("q", 4 * MIB)
            info = await manager.set_replication(
                "q", role=Role.REPLICA, epoch=1, mode=DurabilityMode.SYNC_QUORUM
            )
            assert (info.role, info.epoch) == (Role.REPLICA, 1)
            # A primary in sync_quorum still needs two replicas (RF 3).
            await manager.create_volume("p", 4 * MIB)
            with pytest.raises(InvalidArgumentError, match="at least two replicas"):
                await manager.set_replication(
                    "p",
                    role=Role.PRIMARY,
                    epoch=1,
                    mode=DurabilityMode.SYNC_QUORUM,
                    replicas=["127.0.0.1:9"],
                )
        finally:
            await d.close()

    asyncio.run(main())
