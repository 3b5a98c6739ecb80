"""The volume manager's replication operations (a mixin of
:class:`~blockyard.server.manager.VolumeManager`): ``SetReplication``/``GetReplication``,
``SetVolumeRole``'s effect on replication, and the hooks that start and stop a volume's
replication as it is opened, deleted or the server stops.

Assigning a role is one operation per volume (the manager's busy-name rule): the epoch is
persisted first (the engine refuses a lower one before anything changes), then the role's ALUA
state is set on every portal group, then replication follows: a primary starts or reconfigures
its links, anything else stops shipping and a replica's listener takes connections for it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from blockyard.engine.epoch import Role
from blockyard.engine.volume import Volume
from blockyard.replication.commit import DurabilityMode
from blockyard.replication.lease import PrimaryLease
from blockyard.replication.primary import ReplicatedDevice
from blockyard.replication.report import ReplicationInfo
from blockyard.replication.state import load_primary_state
from blockyard.server.backend import VolumeChecksum
from blockyard.server.replication_ctl import ReplicationController
from blockyard.server.validation import check_epoch, check_volume_name

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from blockyard.server.manager import _Exported, _Op

log = logging.getLogger("blockyard.server.manager")

T = TypeVar("T")


class ReplicationOps:
    """Replication in the volume manager; uses the manager's state (declared below)."""

    if TYPE_CHECKING:
        _exported: dict[str, _Exported]

        def _exclusive(self, *names: str) -> AbstractContextManager[_Op]: ...
        def _require(self, name: str) -> _Exported: ...
        def _apply_alua(self, exp: _Exported, role: Role) -> None: ...
        async def _offload(
            self, op: _Op | None, what: str, fn: Callable[..., T], *args: object
        ) -> T: ...

    def _init_replication(self, listen: tuple[str, int] | None, advertise: str | None) -> None:
        self.replication = ReplicationController(
            listen_host=None if listen is None else listen[0],
            listen_port=0 if listen is None else listen[1],
            advertise=advertise,
            volume_lookup=self._volume_of,
            device_lookup=self._device_of,
        )

    def _volume_of(self, name: str) -> Volume | None:
        exp = self._exported.get(name)
        return None if exp is None else exp.volume

    def _device_of(self, name: str) -> ReplicatedDevice | None:
        exp = self._exported.get(name)
        return None if exp is None else exp.device

    async def _start_replication(self) -> None:
        await self.replication.start()
        for exp in list(self._exported.values()):
            await self._volume_opened(exp)

    async def _stop_replication(self) -> None:
        await self.replication.close()

    async def _volume_opened(self, exp: _Exported) -> None:
        if exp.device is not None:
            try:
                await self.replication.volume_opened(exp.volume, exp.device)
            except Exception:  # one volume's replication must not keep the others from serving
                log.exception("volume %s: replication did not start", exp.volume.name)
                # A primary's lease stays suspended: without its replica set it cannot know
                # whether it needs one.
                return
            lease = exp.device.lease
            if lease is not None:
                lease.resume()

    async def _volume_closing(self, name: str) -> None:
        await self.replication.volume_closing(name)

    async def _assign(
        self,
        op: _Op,
        exp: _Exported,
        role: Role,
        epoch: int,
        replication: tuple[DurabilityMode, Sequence[str], int] | None,
    ) -> None:
        """Role and epoch, then replication. ``replication`` None keeps a primary's mode and
        replica set as they are."""
        vol = exp.volume
        device = exp.device
        assert device is not None
        if replication is None:
            state = await self._offload(op, "read replication state", load_primary_state,
                                        vol.directory)  # fmt: skip
            if role is Role.PRIMARY and state is not None:
                replication = (
                    state.mode,
                    [r.address for r in state.replicas],
                    state.resync_limit_bps,
                )
            else:
                replication = (DurabilityMode.SYNC_ALL, (), 0)
        mode, replicas, limit = replication
        lease = device.lease
        was_primary = vol.role is Role.PRIMARY
        promoting = lease is not None and role is Role.PRIMARY and not was_primary
        listener = self.replication.listener
        if promoting and lease is not None:
            # Nothing is acknowledged until the epoch has moved and the hold is known.
            lease.suspend()
        if role is Role.PRIMARY and not was_primary and listener is not None:
            # The old primary's session must not apply records (or a Hello) to this copy
            # while it becomes primary: both would rewrite its history file.
            await listener.hold(vol.name)
        try:
            await self.replication.configure(
                vol,
                device,
                role=role,
                epoch=epoch,
                mode=mode,
                replicas=replicas,
                resync_limit_bps=limit,
            )
        finally:
            if listener is not None:
                listener.release(vol.name)
        if lease is not None:
            self._update_lease(vol.name, lease, role, epoch, replicas, was_primary=was_primary)
        self._apply_alua(exp, role)
        log.info(
            "volume %s is %s at epoch %d%s",
            vol.name,
            role.name.lower(),
            epoch,
            f" ({mode.value}, replicas {', '.join(replicas)})" if replicas else "",
        )

    def _update_lease(
        self,
        name: str,
        lease: PrimaryLease,
        role: Role,
        epoch: int,
        replicas: Sequence[str],
        *,
        was_primary: bool,
    ) -> None:
        """After a role change took effect: the lease follows the new epoch and replica set; a
        copy that just became primary first waits out the old primary's replica lease (the
        last answer it gave; no answer can follow, its epoch has moved)."""
        stays = was_primary and role is Role.PRIMARY
        lease.set_epoch(epoch, stays_primary=stays)
        lease.set_replicas(replicas if role is Role.PRIMARY else ())
        listener = self.replication.listener
        if role is Role.PRIMARY and not stays and listener is not None:
            lease.hold_until(listener.answers.hold_until(name))
        lease.resume()

    async def set_replication(
        self,
        name: str,
        *,
        role: Role,
        epoch: int,
        mode: DurabilityMode = DurabilityMode.SYNC_ALL,
        replicas: Sequence[str] = (),
        resync_limit_bps: int = 0,
    ) -> ReplicationInfo:
        check_volume_name("name", name)
        check_epoch(epoch)
        with self._exclusive(name) as op:
            exp = self._require(name)
            await self._assign(op, exp, role, epoch, (mode, list(replicas), resync_limit_bps))
            return await self._offload(op, "describe replication", self.replication.info,
                                       exp.volume)  # fmt: skip

    async def checksum_volume(self, name: str) -> VolumeChecksum:
        check_volume_name("name", name)
        exp = self._require(name)
        return await self._offload(None, f"checksum volume {name!r}", _checksum, exp.volume)

    async def get_replication(self, name: str) -> ReplicationInfo:
        check_volume_name("name", name)
        exp = self._require(name)
        return await self._offload(None, "describe replication", self.replication.info,
                                   exp.volume)  # fmt: skip


#: Logical blocks read per step of a checksum (8 MiB: the engine's transfer cap).
_CHECKSUM_STEP_LBAS = 16384


def _checksum(volume: Volume) -> VolumeChecksum:
    lsn = volume.last_lsn
    digest = hashlib.sha256()
    total = volume.block_count
    for lba in range(0, total, _CHECKSUM_STEP_LBAS):
        digest.update(volume.read(lba, min(_CHECKSUM_STEP_LBAS, total - lba)))
    return VolumeChecksum(digest.hexdigest(), volume.size_bytes, lsn)
