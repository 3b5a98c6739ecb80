"""A :class:`~blockyard.server.backend.VolumeBackend` over the master (``blockyard csi
--backend master://HOST:PORT[,HOST:PORT]``): the CSI controller provisions replicated volumes.

What goes where:

- Create, delete, get, list, expand and capacity go to the master (:class:`MasterClient`
  finds the leader), which places the copies and keeps every one of them in step.
- The login rules (initiator ACL, CHAP) are per volume server: the master does not carry
  them, so they are set on every copy's server directly, through the management API address
  the master reports for it (``VolumeInfo.copies[].addresses.api``). A copy whose server the
  master reports dead is skipped. A copy not created on its server yet (the master creates
  copies through heartbeat assignments), or whose server is busy with another operation on
  the volume (a role change during a failover), is waited for, up to :data:`COPY_WAIT_S`; one that
  still does not exist, or cannot be reached, fails the call (UNAVAILABLE), and the CO's
  retry applies the rule everywhere (every call is idempotent).
- Snapshots and clones: the master has no snapshot RPCs yet, so those calls raise
  :class:`~blockyard.csi.errors.UnsupportedOperationError` (CSI UNIMPLEMENTED) and the
  controller leaves their capabilities out.

Portals: a volume's :class:`ExportInfo` lists every portal of every copy, the current
primary's first (ACTIVE/OPTIMIZED), then in-sync replicas' (STANDBY), then the rest
(UNAVAILABLE), so the publish context leads the node's multipath to the primary. The access
state here is the master's view, not a probe of each portal.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Final

from blockyard import tls
from blockyard.csi.errors import UnsupportedOperationError
from blockyard.engine.epoch import Role
from blockyard.engine.limits import MAX_VOLUME_SIZE_BYTES, MIN_VOLUME_SIZE_BYTES
from blockyard.errors import (
    InvalidArgumentError,
    NotFoundError,
    OperationInProgressError,
    ServerUnavailableError,
)
from blockyard.iscsi.chap import ChapCredentials
from blockyard.master.client import MasterClient, parse_masters
from blockyard.master.proto import master_pb2 as mpb
from blockyard.replication.commit import DurabilityMode
from blockyard.scsi.alua import AccessState
from blockyard.scsi.identity import LuIdentity
from blockyard.server.backend import (
    AccessInfo,
    CapacityInfo,
    DeleteResult,
    ExportInfo,
    HealthInfo,
    PortalInfo,
    SnapshotDescription,
    SnapshotRef,
    VolumeDescription,
    VolumePage,
)
from blockyard.server.client import VolumeServerClient
from blockyard.server.convert import MODE_TO_PB
from blockyard.server.proto import volume_server_pb2 as vpb

log = logging.getLogger("blockyard.csi.master_backend")

#: ``--backend`` scheme that selects this backend.
MASTER_SCHEME: Final = "master://"
#: The LUN every volume server exports a volume as (server/manager.py ``LUN``).
LUN: Final = 0
#: Copy states (master.proto ``CopyInfo.state``): a copy on a server the master reports
#: dead is skipped; one not created yet cannot take rules yet.
_DEAD: Final = "dead"
_PENDING: Final = "pending"
_UNREACHABLE_STATES: Final = frozenset({_DEAD, _PENDING})
#: Copy states that may take over as primary (and so are offered right after it).
_IN_SYNC: Final = "in_sync"
#: Deadline of one login-rule call to one volume server.
COPY_TIMEOUT_S: Final = 30.0
#: How long a login-rule call waits for copies the master has placed but their servers have
#: not created yet (a few heartbeats), and how often it looks again.
COPY_WAIT_S: Final = 10.0
COPY_POLL_S: Final = 0.2
_ROLE_FROM_PB: Final = {
    vpb.ROLE_NONE: Role.NONE,
    vpb.ROLE_PRIMARY: Role.PRIMARY,
    vpb.ROLE_REPLICA: Role.REPLICA,
    vpb.ROLE_REBUILDING: Role.REBUILDING,
}
_SNAPSHOTS_UNSUPPORTED: Final = (
    "snapshots and clones are not available through the master yet (it has no snapshot "
    "RPCs); CREATE_DELETE_SNAPSHOT and CLONE_VOLUME are not advertised. Use a StorageClass on "
    "a single volume server (--backend HOST:PORT) for volumes that need them"
)


def _not_yet(name: str, copy: mpb.CopyInfo) -> str:
    return (
        f"volume {name}'s copy on server {copy.server_id} ({copy.addresses.api or 'no address'}) "
        "does not exist yet, so its login rules cannot be set; retry in a moment (the master "
        "creates it within a few heartbeats)"
    )


def is_master_backend(spec: str) -> bool:
    return spec.startswith(MASTER_SCHEME)


def parse_master_backend(spec: str) -> list[str]:
    """``master://HOST:PORT[,HOST:PORT]`` → the master addresses, checked."""
    if not is_master_backend(spec):
        raise InvalidArgumentError(f"--backend {spec!r} is not master://HOST:PORT[,HOST:PORT]")
    rest = spec.removeprefix(MASTER_SCHEME).rstrip("/")
    try:
        return parse_masters(rest)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"--backend {spec!r}: {exc}") from exc


def parse_durability(text: str) -> DurabilityMode:
    try:
        return DurabilityMode(text)
    except ValueError as exc:
        raise InvalidArgumentError(
            f"durability {text!r} is not one of {', '.join(m.value for m in DurabilityMode)}"
        ) from exc


@dataclass(frozen=True, slots=True)
class MasterVolumeDescription(VolumeDescription):
    """A volume as the master sees it: the common description (role and epoch are the
    primary's) plus the zones of its copies' servers (empty: no zones set)."""

    zones: tuple[str, ...] = ()
    replica_count: int = 0
    durability: str = ""


def ordered_copies(info: mpb.VolumeInfo) -> list[mpb.CopyInfo]:
    """The copies in the order a node should try them: the primary, the in-sync replicas, the
    rest; the master's order within each group."""

    def rank(c: mpb.CopyInfo) -> int:
        if c.server_id == info.primary_server_id and c.state not in _UNREACHABLE_STATES:
            return 0
        return 1 if c.state == _IN_SYNC else 2

    return sorted(info.copies, key=rank)


def _portal(address: str, tag: int, state: AccessState) -> PortalInfo:
    host, _, port = address.rpartition(":")
    return PortalInfo(host.strip("[]"), int(port), tag, state)


def export_of(info: mpb.VolumeInfo) -> ExportInfo:
    """Every portal of every copy, the primary's first (see the module docstring). Portal
    group tags are numbered in that order from 1: the master does not report the servers'
    own tags, and the node only needs addresses."""
    portals: list[PortalInfo] = []
    for rank_copy in ordered_copies(info):
        if rank_copy.server_id == info.primary_server_id and rank_copy.state != "dead":
            state = AccessState.ACTIVE_OPTIMIZED
        elif rank_copy.state == _IN_SYNC:
            state = AccessState.STANDBY
        else:
            state = AccessState.UNAVAILABLE
        for address in rank_copy.addresses.iscsi_portals:
            portals.append(_portal(address, len(portals) + 1, state))
    naa = LuIdentity(uuidlib.UUID(info.uuid)).naa_id().hex() if info.uuid else ""
    return ExportInfo(tuple(portals), info.iqn, LUN, naa)


def describe(info: mpb.VolumeInfo, access: AccessInfo | None = None) -> MasterVolumeDescription:
    primary = next((c for c in info.copies if c.server_id == info.primary_server_id), None)
    role = _ROLE_FROM_PB.get(primary.role, Role.NONE) if primary is not None else Role.NONE
    zones = tuple(dict.fromkeys(c.zone for c in info.copies if c.zone))
    mode = {int(v): k for k, v in MODE_TO_PB.items()}.get(int(info.mode))
    return MasterVolumeDescription(
        name=info.name,
        uuid=uuidlib.UUID(info.uuid) if info.uuid else uuidlib.UUID(int=0),
        size_bytes=info.size_bytes,
        role=role,
        epoch=info.epoch,
        allocated_bytes=0,
        snapshot_count=0,
        created_ns=info.created_ns,
        export=export_of(info),
        access=access or AccessInfo(),
        zones=zones,
        replica_count=info.replica_count,
        durability=mode.value if mode is not None else "",
    )


class _CopyMissing(Exception):
    """A copy's server does not have the volume (yet), or is busy with another operation on
    it (``busy``); internal to :class:`MasterBackend`."""

    def __init__(self, copy: mpb.CopyInfo, busy: OperationInProgressError | None = None) -> None:
        super().__init__(copy.server_id)
        self.copy = copy
        self.busy = busy


class MasterBackend:
    """The CSI controller's backend when a master places the volumes. Use it from one event
    loop. ``access`` of the descriptions it returns is the primary server's after a login-rule
    call, and the default (unrestricted, nobody listed) otherwise: the master does not report
    login rules, so the controller re-applies them at every publish (idempotent)."""

    def __init__(
        self,
        masters: Sequence[str],
        *,
        security: tls.TransportSecurity = tls.PLAINTEXT,
        master_security: tls.TransportSecurity | None = None,
        client: MasterClient | None = None,
        copy_wait_s: float = COPY_WAIT_S,
    ) -> None:
        """``security`` protects the calls to the copies' volume servers, and to the master
        too unless ``master_security`` is given."""
        self._security = security
        self._copy_wait_s = copy_wait_s
        self._master = client or MasterClient(masters, security=master_security or security)
        self._servers: dict[str, VolumeServerClient] = {}

    async def close(self) -> None:
        servers, self._servers = self._servers, {}
        for c in servers.values():
            await c.close()
        await self._master.close()

    # ---- volumes ---------------------------------------------------------------------------

    async def create_replicated_volume(
        self,
        name: str,
        size_bytes: int,
        *,
        replicas: int = 0,
        durability: DurabilityMode | None = None,
        zones: Sequence[str] = (),
    ) -> MasterVolumeDescription:
        """Create ``name`` with ``replicas`` copies (0: the master's default, 2 when at least
        two servers are alive, else 1) in ``durability`` (None: the master's default). The
        same name and size again returns the existing volume."""
        mode = int(MODE_TO_PB[durability]) if durability is not None else 0
        info = await self._master.create_volume(
            name, size_bytes, replica_count=replicas, mode=mode, zones=zones
        )
        return describe(info)

    async def create_volume(
        self,
        name: str,
        size_bytes: int,
        *,
        source: SnapshotRef | None = None,
        volume_uuid: uuidlib.UUID | None = None,
    ) -> VolumeDescription:
        if source is not None:
            raise UnsupportedOperationError(_SNAPSHOTS_UNSUPPORTED)
        if volume_uuid is not None:
            raise InvalidArgumentError(
                "the master chooses a volume's UUID; create copies with a given UUID on a "
                "volume server directly"
            )
        return await self.create_replicated_volume(name, size_bytes)

    async def delete_volume(self, name: str) -> DeleteResult:
        return DeleteResult(existed=await self._master.delete_volume(name), sessions_dropped=0)

    async def get_volume(self, name: str) -> VolumeDescription:
        return describe(await self._master.get_volume(name))

    async def get_info(self, name: str) -> mpb.VolumeInfo:
        return await self._master.get_volume(name)

    async def list_volumes(self, page_size: int = 0, page_token: str = "") -> VolumePage:
        page = await self._master.list_volumes(max(page_size, 0), page_token)
        return VolumePage(tuple(describe(v) for v in page.volumes), page.next_token)

    async def expand_volume(self, name: str, size_bytes: int) -> VolumeDescription:
        return describe(await self._master.expand_volume(name, size_bytes))

    async def get_capacity(self) -> CapacityInfo:
        """Free space of the alive servers. A volume of the default two copies takes its
        size on two servers, so the room for one is the second-largest free space, and the
        total available is halved; with one alive server it is that server's."""
        free = sorted(
            (s.free_bytes for s in await self._master.list_servers() if s.state == "alive"),
            reverse=True,
        )
        copies = 2 if len(free) >= 2 else 1
        largest = free[copies - 1] if free else 0
        total = sum(free)
        return CapacityInfo(
            available_bytes=total // copies,
            total_bytes=total,
            max_volume_size_bytes=min(largest, MAX_VOLUME_SIZE_BYTES),
            min_volume_size_bytes=MIN_VOLUME_SIZE_BYTES,
        )

    async def health(self) -> HealthInfo:
        leader = await self._master.get_leader()
        return HealthInfo(
            serving=bool(leader.leader_id or leader.is_leader),
            volume_count=0,
            portals=(),
            version="",
        )

    # ---- snapshots (not through the master yet) --------------------------------------------

    async def create_snapshot(self, volume: str, name: str) -> SnapshotDescription:
        raise UnsupportedOperationError(_SNAPSHOTS_UNSUPPORTED)

    async def delete_snapshot(self, volume: str, name: str) -> bool:
        raise UnsupportedOperationError(_SNAPSHOTS_UNSUPPORTED)

    async def list_snapshots(self, volume: str) -> tuple[SnapshotDescription, ...]:
        # Listing has a true answer: no volume made through the master has snapshots.
        await self._master.get_volume(volume)
        return ()

    async def clone_volume(self, name: str, source: SnapshotRef) -> VolumeDescription:
        raise UnsupportedOperationError(_SNAPSHOTS_UNSUPPORTED)

    # ---- login rules, on every copy --------------------------------------------------------

    def _server(self, api: str) -> VolumeServerClient:
        client = self._servers.get(api)
        if client is None:
            client = VolumeServerClient(api, timeout_s=COPY_TIMEOUT_S, security=self._security)
            self._servers[api] = client
        return client

    async def _on_every_copy(
        self, name: str, call: Callable[[VolumeServerClient], Awaitable[VolumeDescription]]
    ) -> VolumeDescription:
        """Run ``call`` on every copy's server at once, but those of copies on servers the
        master reports dead; the answer is the master's description with the primary copy's
        login rules. A copy not created on its server yet is waited for (bounded, see the
        module docstring), then fails the call with :class:`ServerUnavailableError`: left
        out, it would start with no rules at all, open to every initiator."""
        deadline = time.monotonic() + self._copy_wait_s
        while True:
            info = await self._master.get_volume(name)
            targets = [c for c in ordered_copies(info) if c.state != _DEAD]
            missing = [c for c in targets if c.state == _PENDING or not c.addresses.api]
            busy: OperationInProgressError | None = None
            if not missing:
                try:
                    answers = await asyncio.gather(*(self._one(name, c, call) for c in targets))
                except _CopyMissing as exc:
                    missing, busy = [exc.copy], exc.busy
                else:
                    break
            if time.monotonic() + COPY_POLL_S > deadline:
                if busy is not None:
                    raise OperationInProgressError(
                        f"volume {name}'s copy on server {missing[0].server_id} is still busy "
                        f"after {self._copy_wait_s:g} s ({busy}); retry later"
                    ) from busy
                raise ServerUnavailableError(_not_yet(name, missing[0]))
            await asyncio.sleep(COPY_POLL_S)
        desc = answers[0] if answers else None
        access = desc.access if desc is not None else AccessInfo()
        if not info.iqn and desc is not None:
            # The master learns the target name from heartbeats; a fresh volume may not have
            # reported it yet, but its primary's server just did.
            info.iqn = desc.export.iqn
        return describe(info, access)

    async def _one(
        self,
        name: str,
        copy: mpb.CopyInfo,
        call: Callable[[VolumeServerClient], Awaitable[VolumeDescription]],
    ) -> VolumeDescription:
        try:
            return await call(self._server(copy.addresses.api))
        except NotFoundError as exc:
            raise _CopyMissing(copy) from exc
        except OperationInProgressError as exc:
            # The server's own one-operation-per-volume lock: during a failover the master's
            # assignments (role, replica set) hold it for a moment.
            raise _CopyMissing(copy, busy=exc) from exc

    async def set_volume_auth(
        self,
        name: str,
        chap: ChapCredentials | None,
        mutual_chap: ChapCredentials | None = None,
    ) -> VolumeDescription:
        return await self._on_every_copy(name, lambda c: c.set_volume_auth(name, chap, mutual_chap))

    async def set_volume_access(
        self, name: str, allowed_initiators: Collection[str] | None
    ) -> VolumeDescription:
        allowed = None if allowed_initiators is None else tuple(allowed_initiators)
        return await self._on_every_copy(name, lambda c: c.set_volume_access(name, allowed))

    async def allow_initiator(self, name: str, initiator_name: str) -> VolumeDescription:
        return await self._on_every_copy(name, lambda c: c.allow_initiator(name, initiator_name))

    async def revoke_initiator(self, name: str, initiator_name: str) -> VolumeDescription:
        return await self._on_every_copy(name, lambda c: c.revoke_initiator(name, initiator_name))
