"""The seam between volume consumers (CSI controller, CLI, later the master) and volume servers.

:class:`VolumeBackend` is what the CSI controller needs; :class:`VolumeServerControl` adds what
only the master (and tests) do to one server: fence with roles and epochs, steer ALUA states.
Two implementations exist: :class:`blockyard.server.manager.VolumeManager` in the server
process and :class:`blockyard.server.client.VolumeServerClient` over gRPC; the master will be
a third.

Contract common to every implementation:

- Errors are :class:`blockyard.errors.BlockyardError` subclasses, the same type whichever side
  of the wire raised them (the client maps gRPC status codes back).
- Every mutating call is idempotent and safe to retry after any failure, including a timeout:
  create with the same name and size returns the existing volume, deletes of missing objects
  succeed, snapshot create with an existing name returns that snapshot.
- One operation at a time per volume name: a concurrent second one fails at once with
  :class:`OperationInProgressError` rather than queueing behind it.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from blockyard.engine.epoch import Role
from blockyard.iscsi.chap import ChapCredentials
from blockyard.replication.commit import DurabilityMode
from blockyard.replication.report import ReplicationInfo
from blockyard.scsi.alua import AccessState


@dataclass(frozen=True, slots=True)
class SnapshotRef:
    """A snapshot named by its volume and its own name."""

    volume: str
    snapshot: str


@dataclass(frozen=True, slots=True)
class PortalInfo:
    """One iSCSI portal of the volume: address, portal group tag (also the ALUA target port
    group id) and this volume's access state there."""

    host: str
    port: int
    portal_group_tag: int
    state: AccessState

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """How an initiator reaches the volume: any portal, this IQN, this LUN.

    ``naa_id`` is the 32-hex-digit NAA 6h designator (SPC-4 §7.8.6.6) the LU reports; it is
    derived from the volume UUID, so every server exporting the volume reports the same one.
    """

    portals: tuple[PortalInfo, ...]
    iqn: str
    lun: int
    naa_id: str


@dataclass(frozen=True, slots=True)
class AccessInfo:
    """Who may log in to the volume's target; never carries a secret.

    ``chap_user`` empty: no CHAP. ``restricted`` False: every initiator name may log in;
    True: only ``allowed_initiators`` (none when it is empty).
    """

    chap_user: str = ""
    mutual_chap_user: str = ""
    restricted: bool = False
    allowed_initiators: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class VolumeDescription:
    name: str
    uuid: uuidlib.UUID
    size_bytes: int
    role: Role
    epoch: int
    allocated_bytes: int
    snapshot_count: int
    created_ns: int
    export: ExportInfo
    access: AccessInfo = AccessInfo()


@dataclass(frozen=True, slots=True)
class SnapshotDescription:
    volume: str
    name: str
    uuid: uuidlib.UUID
    size_bytes: int
    created_ns: int
    delta_bytes: int


@dataclass(frozen=True, slots=True)
class VolumePage:
    """One page of volumes in name order; ``next_page_token`` is empty on the last page."""

    volumes: tuple[VolumeDescription, ...]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class DeleteResult:
    existed: bool
    sessions_dropped: int


@dataclass(frozen=True, slots=True)
class CapacityInfo:
    available_bytes: int
    total_bytes: int
    max_volume_size_bytes: int
    min_volume_size_bytes: int


@dataclass(frozen=True, slots=True)
class HealthInfo:
    serving: bool
    volume_count: int
    portals: tuple[PortalInfo, ...]
    version: str
    #: HOST:PORT of the server's replication listener ("" without one).
    replication_address: str = ""


@dataclass(frozen=True, slots=True)
class VolumeChecksum:
    sha256: str
    size_bytes: int
    last_lsn: int


class VolumeBackend(Protocol):
    """What the CSI controller calls to provision volumes. See the module docstring for the
    error, idempotency and concurrency contract."""

    async def create_volume(
        self,
        name: str,
        size_bytes: int,
        *,
        source: SnapshotRef | None = None,
        volume_uuid: uuidlib.UUID | None = None,
    ) -> VolumeDescription:
        """Create ``name`` (all zeros, or a copy of ``source``) and export it; durable and
        usable over iSCSI on return. With ``source``, ``size_bytes`` 0 means the snapshot's
        size and a larger size grows the clone. An existing volume of the same size (or any
        size when ``size_bytes`` is 0 with a source) is returned and re-exported; a different
        size raises :class:`~blockyard.errors.VolumeExistsError`. ``volume_uuid`` makes the
        copy of a volume elsewhere (a replica): same UUID, hence same NAA id and IQN; an
        existing volume with another UUID is :class:`~blockyard.errors.VolumeExistsError`."""
        ...

    async def delete_volume(self, name: str) -> DeleteResult:
        """Stop exporting ``name``, end its iSCSI sessions, then remove every file it owns."""
        ...

    async def get_volume(self, name: str) -> VolumeDescription: ...

    async def list_volumes(self, page_size: int = 0, page_token: str = "") -> VolumePage:
        """Volumes in name order. ``page_size`` 0 is the server's default; larger than the
        maximum is clamped. Volumes created or deleted between pages never make a page repeat
        or skip a volume that existed throughout."""
        ...

    async def expand_volume(self, name: str, size_bytes: int) -> VolumeDescription:
        """Grow online (durable on return) and tell initiators the capacity changed. The same
        size is a no-op; a smaller one raises :class:`~blockyard.errors.ShrinkRefusedError`."""
        ...

    async def create_snapshot(self, volume: str, name: str) -> SnapshotDescription:
        """Snapshot everything acknowledged before the call; durable on return."""
        ...

    async def delete_snapshot(self, volume: str, name: str) -> bool:
        """Delete a snapshot; returns whether it existed (a missing volume counts as not)."""
        ...

    async def list_snapshots(self, volume: str) -> tuple[SnapshotDescription, ...]: ...

    async def clone_volume(self, name: str, source: SnapshotRef) -> VolumeDescription:
        """Same as :meth:`create_volume` with ``source`` and the snapshot's size."""
        ...

    async def get_capacity(self) -> CapacityInfo: ...

    async def health(self) -> HealthInfo: ...

    async def set_volume_auth(
        self,
        name: str,
        chap: ChapCredentials | None,
        mutual_chap: ChapCredentials | None = None,
    ) -> VolumeDescription:
        """Require CHAP (``chap``; ``mutual_chap`` lets initiators authenticate the target too)
        for new logins, or stop requiring it (None). Durable on return. Turning CHAP on ends
        the sessions that logged in without it; changing credentials keeps sessions that
        authenticated with the old ones (a rotation does not interrupt I/O)."""
        ...

    async def set_volume_access(
        self, name: str, allowed_initiators: Collection[str] | None
    ) -> VolumeDescription:
        """Replace the initiator ACL: None admits every initiator name, a collection only
        those (empty: nobody). Durable on return; sessions of initiators no longer admitted
        are ended, and only those."""
        ...

    async def allow_initiator(self, name: str, initiator_name: str) -> VolumeDescription:
        """Add one initiator to the ACL (an open volume becomes restricted to it, ending
        other initiators' sessions). Idempotent; durable on return."""
        ...

    async def revoke_initiator(self, name: str, initiator_name: str) -> VolumeDescription:
        """Remove one initiator from the ACL and end its sessions, so an unpublished node
        cannot keep writing. Idempotent; durable on return. An open volume becomes restricted
        to nobody."""
        ...


class VolumeServerControl(VolumeBackend, Protocol):
    """A volume server's own controls, used by the master and by tests."""

    async def set_volume_role(self, name: str, role: Role, epoch: int) -> VolumeDescription:
        """Change role and epoch atomically and durably; epochs never move backwards
        (:class:`~blockyard.errors.EpochRegressionError`). Every portal group of the volume
        takes the role's ALUA state: primary or none active/optimized, replica standby,
        rebuilding unavailable; overrides from :meth:`set_port_state` are replaced."""
        ...

    async def set_port_state(
        self, volume: str, portal_group_tag: int, state: AccessState
    ) -> VolumeDescription:
        """Set one portal group's ALUA state for one volume, in memory only (a restart or the
        next :meth:`set_volume_role` recomputes it from the role)."""
        ...

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
        """Assign role, epoch, durability mode and replica set (replica servers' replication
        addresses); idempotent, durable on return. The epoch may stay or move forward only."""
        ...

    async def checksum_volume(self, name: str) -> VolumeChecksum:
        """SHA-256 of the volume's whole content as reads see it now (to compare copies)."""
        ...

    async def get_replication(self, name: str) -> ReplicationInfo:
        """Replication state of the volume: per replica in sync, catching up, resyncing (with
        progress) or out of sync, and lag."""
        ...
