"""In-process volume servers for tests: a real :class:`VolumeServerDaemon` (real sockets,
files and replication) on loopback ports the kernel picks, in the caller's event loop."""

from __future__ import annotations

from pathlib import Path

from blockyard.replication.primary import ReplicatedDevice
from blockyard.server.daemon import Address, DaemonConfig, VolumeServerDaemon

#: A master address nobody answers on: a server "run by a master" that can never reach it
#: (leases come from its replicas only; marks the master must record cannot be made).
UNREACHABLE_MASTER = "127.0.0.1:9"


async def start_volume_server(
    data_dir: Path, *, masters: tuple[str, ...] = ()
) -> VolumeServerDaemon:
    d = VolumeServerDaemon(
        DaemonConfig(
            data_dir=str(data_dir),
            iscsi_listen=(Address("127.0.0.1", 0),),
            api_listen=Address("127.0.0.1", 0),
            replication_listen=Address("127.0.0.1", 0),
            masters=masters,
            shutdown_timeout_s=10.0,
        )
    )
    await d.start()
    return d


def device_of(d: VolumeServerDaemon, name: str) -> ReplicatedDevice:
    """The device the SCSI layer writes through for volume ``name``."""
    assert d.manager is not None, "the server has not started"
    return {v.name: dev for v, dev in d.manager.devices()}[name]
