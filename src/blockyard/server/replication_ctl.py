"""Replication in the volume server: the listener replicas accept primaries on, the per-volume
replication of primaries, and the management operations that assign both.

The volume manager owns one :class:`ReplicationController`. It is told when a volume is opened
or goes away, and carries out ``SetReplication``: a role, an epoch, a durability mode and a
replica set — everything the master will later assign. All methods run on the server's event
loop; storage work goes to the replication worker pool.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid as uuidlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Final, TypeVar

from blockyard.engine.epoch import Role
from blockyard.engine.volume import Volume
from blockyard.errors import InvalidArgumentError
from blockyard.replication.commit import DurabilityMode
from blockyard.replication.engine_store import EngineReplicaStore
from blockyard.replication.messages import ReplicaDataState
from blockyard.replication.primary import (
    NoObserver,
    OutOfSyncMarker,
    ReplicatedDevice,
    ReplicationObserver,
    VolumeReplication,
)
from blockyard.replication.receiver import ReplicationListener
from blockyard.replication.report import ReplicationInfo
from blockyard.replication.state import (
    MAX_REPLICAS,
    PrimaryState,
    ReplicaEntry,
    ReplicaState,
    check_replica_address,
    load_primary_state,
    load_replica_state,
    remove_primary_state,
    save_primary_state,
    save_replica_state,
)

log = logging.getLogger("blockyard.server.replication")

T = TypeVar("T")

#: Threads for replication storage work (applying records, resync reads, bitmap and state
#: persistence), shared by every volume of the server.
REPLICATION_WORKERS: Final = 8


class ReplicationController:
    """See the module docstring."""

    def __init__(
        self,
        *,
        listen_host: str | None = None,
        listen_port: int = 0,
        advertise: str | None = None,
        volume_lookup: Callable[[str], Volume | None],
        device_lookup: Callable[[str], ReplicatedDevice | None],
    ) -> None:
        self._listen_host = listen_host
        self._listen_port = listen_port
        self._advertise = advertise
        self._volume_lookup = volume_lookup
        self._device_lookup = device_lookup
        #: Where primaries report replication events (the server's metrics); set before
        #: :meth:`start`, it reaches every primary started after.
        self.observer: ReplicationObserver = NoObserver()
        #: How primaries have the master record a replica out of sync (``serve --master``);
        #: see :meth:`set_marker`.
        self.marker: OutOfSyncMarker | None = None
        self.executor = ThreadPoolExecutor(
            max_workers=REPLICATION_WORKERS, thread_name_prefix="replication"
        )
        self.listener: ReplicationListener | None = None
        self._primaries: dict[str, VolumeReplication] = {}

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if self._listen_host is not None:
            self.listener = ReplicationListener(
                self, self._listen_host, self._listen_port, executor=self.executor
            )
            await self.listener.start()

    async def close(self) -> None:
        for name in list(self._primaries):
            await self.volume_closing(name)
        if self.listener is not None:
            await self.listener.close()
            self.listener = None
        self.executor.shutdown(wait=False, cancel_futures=True)

    @property
    def address(self) -> str:
        """This server's replication address as replicas are named (empty without a
        listener)."""
        if self.listener is None:
            return ""
        host = self._advertise or self.listener.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{self.listener.port}"

    def set_marker(self, marker: OutOfSyncMarker | None) -> None:
        """Primaries running now and started later ask ``marker`` before they drop a replica
        (until it is set, a primary with a lease cannot drop one: its flushes follow the
        mode's rule for an unreachable master)."""
        self.marker = marker
        for vr in self._primaries.values():
            vr.marker = marker

    async def _sync(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args))

    # ---- volumes coming and going ---------------------------------------------------------

    async def volume_opened(self, volume: Volume, device: ReplicatedDevice) -> None:
        """A volume was opened: a primary with a replica set starts shipping to it."""
        if volume.role is not Role.PRIMARY:
            return
        state = await self._sync(load_primary_state, volume.directory)
        if state is None or not state.replicas:
            return
        await self._start_primary(volume, device, state)

    async def _start_primary(
        self, volume: Volume, device: ReplicatedDevice, state: PrimaryState
    ) -> None:
        vr = VolumeReplication(
            volume,
            state,
            executor=self.executor,
            primary_id=self.address or volume.name,
            observer=self.observer,
            lease=device.lease,
            marker=self.marker,
        )
        await vr.start()
        self._primaries[volume.name] = vr
        device.replication = vr

    async def volume_closing(self, name: str) -> None:
        """The volume is being closed or deleted: stop replicating it either way."""
        vr = self._primaries.pop(name, None)
        if vr is not None:
            device = self._device_lookup(name)
            if device is not None:
                device.replication = None
            await vr.stop()
        if self.listener is not None:
            self.listener.drop(name)

    # ---- the replica side (ReplicaVolumes) ------------------------------------------------

    def replica_store(self, name: str, volume_uuid: uuidlib.UUID) -> EngineReplicaStore | None:
        volume = self._volume_lookup(name)
        if volume is None or volume.uuid != volume_uuid:
            return None
        if volume.role not in (Role.REPLICA, Role.REBUILDING):
            return None
        return EngineReplicaStore(volume)

    # ---- management -----------------------------------------------------------------------

    async def configure(
        self,
        volume: Volume,
        device: ReplicatedDevice,
        *,
        role: Role,
        epoch: int,
        mode: DurabilityMode,
        replicas: Sequence[str],
        resync_limit_bps: int,
    ) -> None:
        """Assign the volume's replication; idempotent. The epoch may stay or move forward
        (a lower one is refused by the engine before anything changes)."""
        addresses = [check_replica_address(a) for a in replicas]
        if len(set(addresses)) != len(addresses):
            raise InvalidArgumentError(f"replica addresses repeat: {addresses}")
        if role is not Role.PRIMARY and addresses:
            raise InvalidArgumentError(
                "only a primary has replicas; send replicas only with role PRIMARY"
            )
        if len(addresses) > MAX_REPLICAS:
            raise InvalidArgumentError(
                f"{len(addresses)} replicas: a volume has at most {MAX_REPLICAS} (RF 3)"
            )
        # The replica set is the primary's: a replica is told the mode but no replicas.
        if role is Role.PRIMARY and mode is DurabilityMode.SYNC_QUORUM and len(addresses) < 2:
            raise InvalidArgumentError(
                "sync_quorum needs at least two replicas (RF 3); use sync_all for RF 2"
            )
        if resync_limit_bps < 0:
            raise InvalidArgumentError("resync_limit_bps must be >= 0 (0 = unlimited)")
        if self.address and self.address in addresses:
            raise InvalidArgumentError(f"{self.address} is this server: not a replica of itself")
        if role is not Role.PRIMARY:
            # The role first: from here the engine refuses host writes, and the device fails
            # any write already past that check instead of taking "no replication" for "none
            # needed" (a demoted primary acknowledged writes its replicas never received
            # between the two steps when they ran the other way round; seen by chaos).
            await self._sync(volume.set_role, role, epoch)
            await self.volume_closing(volume.name)
            await self._sync(remove_primary_state, volume.directory)
            if role in (Role.REPLICA, Role.REBUILDING):
                await self._sync(self._init_replica_state, volume)
            return
        await self._sync(volume.set_role, role, epoch)
        vr = self._primaries.get(volume.name)
        if vr is not None and vr.volume is volume:
            # Running: it persists the new set itself, in order with its own marks.
            old = vr.state
            await vr.reconfigure(mode, addresses, resync_limit_bps)
        else:
            loaded: PrimaryState | None = await self._sync(load_primary_state, volume.directory)
            old = loaded or PrimaryState()
            entries = []
            for a in addresses:
                previous = old.replica(a)
                entries.append(ReplicaEntry(a, previous is not None and previous.in_sync))
            state = PrimaryState(mode, tuple(entries), resync_limit_bps)
            await self._sync(save_primary_state, volume.directory, state)
            if state.replicas:
                await self._start_primary(volume, device, state)
        for gone in {r.address for r in old.replicas} - set(addresses):
            log.info("volume %s: replica %s left the replica set", volume.name, gone)

    @staticmethod
    def _init_replica_state(volume: Volume) -> None:
        if load_replica_state(volume.directory) is None and not volume.history.segments:
            save_replica_state(volume.directory, ReplicaState(ReplicaDataState.EMPTY))

    def info(self, volume: Volume) -> ReplicationInfo:
        vr = self._primaries.get(volume.name)
        data_state: ReplicaDataState | None = None
        if volume.role in (Role.REPLICA, Role.REBUILDING):
            data_state = EngineReplicaStore(volume).data_state().data_state
        state = vr.state if vr is not None else None
        return ReplicationInfo(
            name=volume.name,
            role=volume.role,
            epoch=volume.epoch,
            mode=None if state is None else state.mode,
            last_lsn=volume.last_lsn,
            durable_lsn=volume.durable_lsn,
            data_state=data_state,
            primary_connected=self.listener is not None and self.listener.connected(volume.name),
            replicas=() if vr is None else tuple(vr.report()),
            resync_limit_bps=0 if state is None else state.resync_limit_bps,
        )

    def primaries(self) -> dict[str, VolumeReplication]:
        return dict(self._primaries)
