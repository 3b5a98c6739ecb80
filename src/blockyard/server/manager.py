"""The volume manager: owns the data directory's volumes while ``blockyard serve`` runs.

It holds the :class:`~blockyard.engine.store.VolumeStore`, every open
:class:`~blockyard.engine.volume.Volume`, the :class:`~blockyard.scsi.lu.LogicalUnit` in front of
each, and their entries in every portal group's target registry. It implements
:class:`~blockyard.server.backend.VolumeServerControl`.

Threading: every coroutine runs on the event loop that called :meth:`VolumeManager.start`; the
busy-name set and the export table are only touched there, so they need no lock. Engine work
that may block (create zero-fills the WAL, clone copies data, snapshot drains the WAL, delete
removes files, close flushes) runs in a bounded thread pool. A call that times out (or whose
caller goes away) leaves its engine work running to completion in the pool, and the volume
name stays busy until it has finished, so a retry can never race with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from blockyard import __version__
from blockyard.engine.epoch import Role
from blockyard.engine.limits import BLOCK_SIZE, MAX_VOLUME_SIZE_BYTES, MIN_VOLUME_SIZE_BYTES
from blockyard.engine.store import VolumeInfo, VolumeStore
from blockyard.engine.volume import SnapshotInfo, Volume
from blockyard.errors import (
    BlockyardError,
    BlockyardTimeoutError,
    InvalidArgumentError,
    OperationInProgressError,
    ServerStoppingError,
    ShrinkRefusedError,
    SnapshotNotFoundError,
    VolumeBusyError,
    VolumeExistsError,
    VolumeNotFoundError,
)
from blockyard.iscsi.discovery import iqn_for_volume
from blockyard.iscsi.login import TargetConfig
from blockyard.replication.lease import PrimaryLease
from blockyard.replication.primary import ReplicatedDevice
from blockyard.scsi.alua import AccessState, StaticAlua, TargetPortGroup
from blockyard.scsi.identity import LuIdentity
from blockyard.scsi.lu import LogicalUnit
from blockyard.scsi.reservations import FileReservationStore
from blockyard.server.auth import OPEN, VolumeAuth, load_auth
from blockyard.server.backend import (
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
from blockyard.server.iscsi_server import DictTargetRegistry, IscsiServer, ServedTarget
from blockyard.server.manager_access import AccessOps
from blockyard.server.manager_replication import ReplicationOps
from blockyard.server.validation import (
    check_epoch,
    check_page_size,
    check_size,
    check_snapshot_name,
    check_volume_name,
    decode_page_token,
    encode_page_token,
)

log = logging.getLogger("blockyard.server.manager")

T = TypeVar("T")

DEFAULT_IQN_PREFIX: Final = "iqn.2026-11.io.blockyard"
RESERVATIONS_FILE: Final = "reservations.json"
#: Held (flock) while a server owns the data directory; the store skips dot-files.
SERVE_LOCK_FILE: Final = ".serve.lock"
DEFAULT_WORKERS: Final = 4
#: Longest one engine call may take before the RPC gives up (the work itself goes on).
DEFAULT_OP_TIMEOUT_S: Final = 120.0
#: How long delete waits for dropped iSCSI sessions to end before removing files anyway.
SESSION_DRAIN_TIMEOUT_S: Final = 5.0
_SESSION_POLL_S: Final = 0.01
#: The logical unit number every volume is exported at (one LU per target).
LUN: Final = 0
#: Hex digits of the volume UUID in its IQN: 48 bits, so two instances of one name never
#: share a target name by chance.
IQN_UUID_HEX_DIGITS: Final = 12

#: Role → ALUA state on every portal group of the volume (SPC-4 §5.15).
ROLE_ACCESS_STATE: Final[dict[Role, AccessState]] = {
    Role.NONE: AccessState.ACTIVE_OPTIMIZED,
    Role.PRIMARY: AccessState.ACTIVE_OPTIMIZED,
    Role.REPLICA: AccessState.STANDBY,
    Role.REBUILDING: AccessState.UNAVAILABLE,
}


def volume_iqn(prefix: str, name: str, volume_uuid: uuidlib.UUID) -> str:
    """The target name of one volume instance: ``<prefix>:<name>.<12 hex digits of its UUID>``
    (made valid by :func:`~blockyard.iscsi.discovery.iqn_for_volume`).

    The UUID part is why an initiator still holding the name of a deleted volume can never log
    in to a later volume of the same name: the new one has another UUID, so another IQN. A
    replica of the volume on another server has the same UUID, hence the same IQN and NAA id,
    which is what multipath expects. The suffix has a fixed length, so distinct (name, UUID)
    pairs give distinct strings, and ``iqn_for_volume`` keeps distinct strings distinct.
    """
    return iqn_for_volume(prefix, f"{name}.{volume_uuid.hex[:IQN_UUID_HEX_DIGITS]}")


@dataclass(frozen=True, slots=True)
class PortalGroup:
    """One iSCSI listener: its own target registry and its portal group tag, which is also
    its ALUA target port group id and relative target port id."""

    portal_group_tag: int
    server: IscsiServer
    registry: DictTargetRegistry
    advertised_host: str

    @property
    def port(self) -> int:
        return self.server.port


@dataclass(slots=True)
class _Exported:
    volume: Volume
    alua: StaticAlua
    lu: LogicalUnit
    iqn: str
    naa_id: str
    auth: VolumeAuth = OPEN
    #: What the LU writes through: the volume plus the replication commit point.
    device: ReplicatedDevice | None = None


@dataclass(slots=True, eq=False)
class _Op:
    names: tuple[str, ...]
    pending: set[asyncio.Future[Any]] = field(default_factory=set)


def _report_abandoned(fut: asyncio.Future[Any]) -> None:
    # Attached only once the caller stopped waiting (timeout or cancellation): the shielded
    # call still finishes, and nobody else will see what it raised. Log that once. Errors the
    # caller did receive are its to report, not ours.
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("background engine call failed after its caller gave up: %s", fut.exception())


class VolumeManager(AccessOps, ReplicationOps):
    """Owns and exports the volumes of ``data_dir``. See the module docstring for threading."""

    def __init__(
        self,
        data_dir: str,
        portal_groups: Sequence[PortalGroup],
        *,
        iqn_prefix: str = DEFAULT_IQN_PREFIX,
        workers: int = DEFAULT_WORKERS,
        op_timeout_s: float = DEFAULT_OP_TIMEOUT_S,
        replication_listen: tuple[str, int] | None = None,
        replication_advertise: str | None = None,
        leases: bool = False,
    ) -> None:
        if not portal_groups:
            raise ValueError("a volume manager needs at least one portal group")
        tags = [g.portal_group_tag for g in portal_groups]
        if len(set(tags)) != len(tags):
            raise ValueError(f"portal group tags must be distinct, got {tags}")
        volume_iqn(iqn_prefix, "probe", uuidlib.UUID(int=0))  # refuses a bad prefix now
        self.data_dir = data_dir
        self.iqn_prefix = iqn_prefix
        self._groups = tuple(portal_groups)
        self._workers = workers
        self._op_timeout_s = op_timeout_s
        self._store: VolumeStore | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock_fd = -1
        self._exported: dict[str, _Exported] = {}
        self._busy: set[str] = set()
        self._ops: set[_Op] = set()
        self._stopping = False
        self._rechecks: set[asyncio.TimerHandle] = set()
        #: Run by a master: every primary acknowledges writes only under a lease.
        self.leases = leases
        self._init_replication(replication_listen, replication_advertise)

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Lock the data directory, open every volume in it and export them all.

        Raises VolumeBusyError when another server owns the directory. A volume that fails to
        open for another reason is logged and left out; the others are served. After a failed
        start, :meth:`close` releases everything and a new manager may start.
        """
        self._stopping = False
        self._executor = ThreadPoolExecutor(
            max_workers=self._workers, thread_name_prefix="volume-manager"
        )
        self._store = await self._offload(None, "open the data directory", self._open_store)
        for name in sorted(await self._offload(None, "list volumes", self.store.names)):
            try:
                exp = await self._offload(None, f"open volume {name!r}", self._open_sync, name)
            except VolumeBusyError:
                raise
            except BlockyardError:
                log.exception("not serving volume %s", name)
                continue
            self._exported[name] = exp
            self._export(exp)
        await self._start_replication()
        log.info("serving %d volumes from %s", len(self._exported), self.data_dir)

    def _open_store(self) -> VolumeStore:
        os.makedirs(self.data_dir, exist_ok=True)
        path = os.path.join(self.data_dir, SERVE_LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise VolumeBusyError(
                f"data directory {self.data_dir} is in use by another blockyard serve "
                f"(pid {owner}); stop it or pass another --data-dir"
            ) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        return VolumeStore(self.data_dir)

    async def close(self, timeout_s: float = 30.0) -> None:
        """Refuse new operations, wait (bounded) for running ones, then unexport, flush and
        close every volume. Data acknowledged before is durable when this returns without
        error. Safe to call twice and after a failed :meth:`start`."""
        self._stopping = True
        for handle in self._rechecks:
            handle.cancel()
        self._rechecks.clear()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._ops and loop.time() < deadline:
            await asyncio.sleep(_SESSION_POLL_S)
        if self._ops:
            log.warning("%d volume operations still running at shutdown", len(self._ops))
        await self._stop_replication()
        exported, self._exported = self._exported, {}
        for exp in exported.values():
            self._unexport(exp)
        executor = self._executor
        if executor is not None and exported:
            futs = [loop.run_in_executor(executor, exp.volume.close) for exp in exported.values()]
            done, not_done = await asyncio.wait(futs, timeout=max(0.1, deadline - loop.time()))
            for fut in done:
                if fut.exception() is not None:
                    log.error("closing a volume failed: %s", fut.exception())
            if not_done:
                log.error("%d volumes did not flush and close in time", len(not_done))
        self._executor = None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        self._store = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    @property
    def store(self) -> VolumeStore:
        if self._store is None:
            raise ServerStoppingError("the volume server is not running; start it and retry")
        return self._store

    # ---- machinery ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self, *names: str) -> Iterator[_Op]:
        if self._stopping or self._store is None:
            raise ServerStoppingError(
                "the volume server is shutting down; retry against it once it is back"
            )
        for name in names:
            if name in self._busy:
                raise OperationInProgressError(
                    f"another operation on volume {name!r} is still running; retry when it "
                    "has finished"
                )
        op = _Op(names)
        self._busy.update(names)
        self._ops.add(op)
        try:
            yield op
        finally:
            self._release_when_done(op)

    def _release_when_done(self, op: _Op) -> None:
        pending = [f for f in op.pending if not f.done()]
        if not pending:
            self._busy.difference_update(op.names)
            self._ops.discard(op)
            return
        log.warning("volume %s stays busy until its abandoned engine call ends", op.names[0])

        def done(_fut: asyncio.Future[Any]) -> None:
            if all(f.done() for f in pending):
                self._busy.difference_update(op.names)
                self._ops.discard(op)

        for fut in pending:
            fut.add_done_callback(done)

    async def _offload(self, op: _Op | None, what: str, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` in the pool, waiting at most the operation timeout."""
        if self._executor is None:
            raise ServerStoppingError("the volume server is shutting down; retry once it is back")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.run_in_executor(self._executor, functools.partial(fn, *args))
        if op is not None:
            op.pending.add(fut)
        waiter = asyncio.shield(fut)
        timer = asyncio.timeout(self._op_timeout_s)
        try:
            async with timer:
                return await waiter
        except TimeoutError as exc:
            if not timer.expired():
                raise  # the engine's own bounded wait ran out: its error says which
            raise BlockyardTimeoutError(
                f"{what} did not finish within {self._op_timeout_s:.0f} s; the storage under "
                f"{self.data_dir} may be slow or hung. The operation goes on in the background: "
                "retry later"
            ) from exc
        finally:
            # The shield, not the call, is cancelled when the timer or the caller gave up.
            if waiter.cancelled():
                fut.add_done_callback(_report_abandoned)

    def _require(self, name: str) -> _Exported:
        exp = self._exported.get(name)
        if exp is None:
            raise VolumeNotFoundError(
                f"no volume {name!r} on this server; list volumes with ListVolumes"
            )
        return exp

    def _open_sync(self, name: str) -> _Exported:
        """Open ``name``, load its access rules and build its logical unit. Runs in the pool.
        Access rules that cannot be read keep the volume unserved (fail closed)."""
        vol = self.store.open(name)
        try:
            return self._wrap(vol, load_auth(vol.directory, name))
        except BaseException:
            vol.close()
            raise

    def _wrap(self, vol: Volume, auth: VolumeAuth = OPEN) -> _Exported:
        lease = None
        if self.leases:
            lease = PrimaryLease(vol.name, epoch=vol.epoch)
            if vol.role is Role.PRIMARY:
                # Until its replication (and so its replica set) is running.
                lease.suspend()
        state = ROLE_ACCESS_STATE[vol.role]
        alua = StaticAlua(
            [
                TargetPortGroup(g.portal_group_tag, state, (g.portal_group_tag,), preferred=i == 0)
                for i, g in enumerate(self._groups)
            ],
            # A primary without its lease reports TRANSITIONING (it may have been deposed).
            serving=None if lease is None else lease.allows,
        )
        identity = LuIdentity(vol.uuid)
        reservations = FileReservationStore(
            os.path.join(vol.directory, RESERVATIONS_FILE), volume=vol.name
        )
        device = ReplicatedDevice(vol, lease)
        lu = LogicalUnit(device, identity, alua, reservations, lun=LUN, volume_name=vol.name)
        iqn = volume_iqn(self.iqn_prefix, vol.name, vol.uuid)
        return _Exported(vol, alua, lu, iqn, identity.naa_id().hex(), auth, device)

    def _export(self, exp: _Exported) -> None:
        """Add (or re-add) the volume's target, with its access rules, to every portal group's
        registry. New logins see the new rules at once."""
        auth = exp.auth
        for group in self._groups:
            config = TargetConfig(
                exp.iqn,
                alias=exp.volume.name,
                chap=auth.chap,
                mutual_chap=auth.mutual_chap,
                allowed_initiators=auth.allowed_initiators,
                portal_group_tag=group.portal_group_tag,
            )
            group.registry.add(ServedTarget(config, exp.lu))

    def _unexport(self, exp: _Exported) -> int:
        """Remove the target everywhere and close its sessions; returns how many."""
        dropped = 0
        for group in self._groups:
            group.registry.remove(exp.iqn)
            if group.server.serving:
                dropped += group.server.drop_sessions(exp.iqn)
        return dropped

    async def _drain_sessions(self, iqn: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SESSION_DRAIN_TIMEOUT_S
        while any(g.server.session_count(iqn) for g in self._groups):
            if loop.time() >= deadline:
                log.warning(
                    "sessions of %s did not end within %.0f s", iqn, SESSION_DRAIN_TIMEOUT_S
                )
                return
            await asyncio.sleep(_SESSION_POLL_S)

    def _portals(self, alua: StaticAlua | None) -> tuple[PortalInfo, ...]:
        return tuple(
            PortalInfo(
                g.advertised_host,
                g.port,
                g.portal_group_tag,
                AccessState.ACTIVE_OPTIMIZED
                if alua is None
                else alua.access_state(g.portal_group_tag),
            )
            for g in self._groups
        )

    def _describe_sync(self, exp: _Exported) -> VolumeDescription:
        info: VolumeInfo = self.store.info(exp.volume.name)
        return VolumeDescription(
            name=info.name,
            uuid=info.uuid,
            size_bytes=info.size_bytes,
            role=info.role,
            epoch=info.epoch,
            allocated_bytes=info.allocated_bytes,
            snapshot_count=info.snapshot_count,
            created_ns=info.created_ns,
            export=ExportInfo(self._portals(exp.alua), exp.iqn, LUN, exp.naa_id),
            access=exp.auth.info(),
        )

    async def _describe(self, op: _Op | None, exp: _Exported) -> VolumeDescription:
        return await self._offload(op, "describe a volume", self._describe_sync, exp)

    # ---- VolumeBackend --------------------------------------------------------------------

    async def create_volume(
        self,
        name: str,
        size_bytes: int,
        *,
        source: SnapshotRef | None = None,
        volume_uuid: uuidlib.UUID | None = None,
    ) -> VolumeDescription:
        check_volume_name("name", name)
        check_size("size_bytes", size_bytes, required=source is None)
        if volume_uuid is not None and source is not None:
            raise InvalidArgumentError(
                "a clone gets a new UUID: send uuid only to create a replica copy"
            )
        if source is None:
            names: tuple[str, ...] = (name,)
        else:
            check_volume_name("source.volume", source.volume)
            check_snapshot_name("source.snapshot", source.snapshot)
            if source.volume == name:
                raise InvalidArgumentError(
                    f"cannot clone volume {name!r} from its own snapshot: pick a new name"
                )
            names = (name, source.volume)
        with self._exclusive(*names) as op:
            exp = self._exported.get(name)
            if exp is None and await self._offload(op, "look up", self.store.exists, name):
                # On disk but not exported: adoption failed at start; opening says why.
                exp = await self._offload(op, f"open volume {name!r}", self._open_sync, name)
                self._exported[name] = exp
            if exp is not None:
                if size_bytes and exp.volume.size_bytes != size_bytes:
                    raise VolumeExistsError(
                        f"volume {name!r} already exists with size {exp.volume.size_bytes} "
                        f"bytes, not {size_bytes}; delete it first, pick another name, or use "
                        "ExpandVolume to grow it"
                    )
                if volume_uuid is not None and exp.volume.uuid != volume_uuid:
                    raise VolumeExistsError(
                        f"volume {name!r} already exists with UUID {exp.volume.uuid}, not "
                        f"{volume_uuid}; delete it first to make it a copy of that volume"
                    )
                self._export(exp)
                return await self._describe(op, exp)
            if source is None:
                vol = await self._offload(
                    op,
                    f"create volume {name!r}",
                    functools.partial(self.store.create, volume_uuid=volume_uuid),
                    name,
                    size_bytes,
                )
            else:
                src = self._require(source.volume)
                vol = await self._offload(
                    op,
                    f"clone into {name!r}",
                    self._clone_sync,
                    src.volume,
                    source,
                    name,
                    size_bytes,
                )
            try:
                exp = self._wrap(vol)
            except BaseException:
                vol.close()
                raise
            self._exported[name] = exp
            self._export(exp)
            log.info("created volume %s (%d bytes), exported as %s", name, vol.size_bytes, exp.iqn)
            await self._volume_opened(exp)
            return await self._describe(op, exp)

    def _clone_sync(self, src: Volume, source: SnapshotRef, name: str, size_bytes: int) -> Volume:
        snap = src.get_snapshot(source.snapshot)
        if size_bytes and size_bytes < snap.size_bytes:
            raise ShrinkRefusedError(
                f"size_bytes {size_bytes} is smaller than snapshot {source.volume}@"
                f"{source.snapshot} ({snap.size_bytes} bytes); ask for at least that much or 0"
            )
        vol = self.store.clone(src, source.snapshot, name)
        if size_bytes > vol.size_bytes:
            try:
                vol.grow(size_bytes)
            except BaseException:
                # A clone of the wrong size would turn a retry into ALREADY_EXISTS.
                vol.close()
                self.store.delete(name)
                raise
        return vol

    async def delete_volume(self, name: str) -> DeleteResult:
        check_volume_name("name", name)
        with self._exclusive(name) as op:
            exp = self._exported.pop(name, None)
            dropped = 0
            await self._volume_closing(name)
            if exp is not None:
                dropped = self._unexport(exp)
                await self._drain_sessions(exp.iqn)
                try:
                    await self._offload(op, f"close volume {name!r}", exp.volume.close)
                except BlockyardError as exc:
                    # The volume is being removed: a failed final flush loses nothing wanted.
                    log.warning("closing volume %s before delete failed: %s", name, exc)
            existed = exp is not None or await self._offload(op, "look up", self.store.exists, name)
            await self._offload(op, f"delete volume {name!r}", self.store.delete, name)
            if existed:
                log.info("deleted volume %s (%d sessions dropped)", name, dropped)
            return DeleteResult(existed, dropped)

    async def get_volume(self, name: str) -> VolumeDescription:
        check_volume_name("name", name)
        return await self._describe(None, self._require(name))

    async def list_volumes(self, page_size: int = 0, page_token: str = "") -> VolumePage:
        size = check_page_size(page_size)
        after = decode_page_token(page_token)
        names = sorted(n for n in self._exported if after is None or n > after)
        page = [self._exported[n] for n in names[:size]]
        described = await self._offload(
            None, "describe volumes", lambda: [self._describe_sync(e) for e in page]
        )
        token = encode_page_token(names[size - 1]) if len(names) > size else ""
        return VolumePage(tuple(described), token)

    async def expand_volume(self, name: str, size_bytes: int) -> VolumeDescription:
        check_volume_name("name", name)
        check_size("size_bytes", size_bytes)
        with self._exclusive(name) as op:
            exp = self._require(name)
            before = exp.volume.size_bytes
            await self._offload(op, f"grow volume {name!r}", exp.volume.grow, size_bytes)
            if exp.volume.size_bytes != before:
                exp.lu.notify_capacity_changed()
                log.info("grew volume %s from %d to %d bytes", name, before, size_bytes)
            return await self._describe(op, exp)

    async def create_snapshot(self, volume: str, name: str) -> SnapshotDescription:
        check_volume_name("volume", volume)
        check_snapshot_name("name", name)
        with self._exclusive(volume) as op:
            vol = self._require(volume).volume
            info = await self._offload(op, "snapshot", self._snapshot_sync, vol, name)
            return SnapshotDescription(
                volume, info.name, info.uuid, info.size_bytes, info.created_ns,
                info.delta_blocks * BLOCK_SIZE,
            )  # fmt: skip

    @staticmethod
    def _snapshot_sync(vol: Volume, name: str) -> SnapshotInfo:
        try:
            return vol.get_snapshot(name)
        except SnapshotNotFoundError:
            return vol.create_snapshot(name)

    async def delete_snapshot(self, volume: str, name: str) -> bool:
        check_volume_name("volume", volume)
        check_snapshot_name("name", name)
        with self._exclusive(volume) as op:
            exp = self._exported.get(volume)
            if exp is None:
                return False
            return await self._offload(op, "delete snapshot", self._delete_snapshot_sync, exp, name)

    @staticmethod
    def _delete_snapshot_sync(exp: _Exported, name: str) -> bool:
        try:
            exp.volume.delete_snapshot(name)
        except SnapshotNotFoundError:
            return False
        return True

    async def list_snapshots(self, volume: str) -> tuple[SnapshotDescription, ...]:
        check_volume_name("volume", volume)
        vol = self._require(volume).volume
        infos = await self._offload(None, "list snapshots", vol.list_snapshots)
        return tuple(
            SnapshotDescription(
                volume, i.name, i.uuid, i.size_bytes, i.created_ns, i.delta_blocks * BLOCK_SIZE
            )
            for i in infos
        )

    async def clone_volume(self, name: str, source: SnapshotRef) -> VolumeDescription:
        return await self.create_volume(name, 0, source=source)

    async def get_capacity(self) -> CapacityInfo:
        def stat() -> tuple[int, int]:
            st = os.statvfs(self.data_dir)
            return self.store.free_bytes(), st.f_blocks * st.f_frsize

        free, total = await self._offload(None, "stat the data directory", stat)
        return CapacityInfo(free, total, MAX_VOLUME_SIZE_BYTES, MIN_VOLUME_SIZE_BYTES)

    async def health(self) -> HealthInfo:
        serving = (
            not self._stopping
            and self._store is not None
            and all(g.server.serving for g in self._groups)
        )
        return HealthInfo(
            serving,
            len(self._exported),
            self._portals(None),
            __version__,
            self.replication.address,
        )

    @property
    def portal_groups(self) -> tuple[PortalGroup, ...]:
        return self._groups

    def devices(self) -> list[tuple[Volume, ReplicatedDevice]]:
        """Every volume served now with the device its LU writes through (a copy, taken on the
        event loop): for the heartbeat's reports and the leases it feeds."""
        return [(e.volume, e.device) for e in self._exported.values() if e.device is not None]

    async def offload(self, what: str, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` in the manager's pool (bounded by the operation timeout): for
        callers outside the manager whose work may touch storage."""
        return await self._offload(None, what, fn, *args)

    def served(self) -> list[tuple[Volume, LogicalUnit]]:
        """Every volume served now with its logical unit: a copy, taken on the event loop. For
        the server's periodic work that reaches all of them (space watch, metrics)."""
        return [(exp.volume, exp.lu) for exp in self._exported.values()]

    # ---- VolumeServerControl --------------------------------------------------------------

    async def set_volume_role(self, name: str, role: Role, epoch: int) -> VolumeDescription:
        """Role and epoch alone; a primary keeps its durability mode and replica set (see
        :meth:`set_replication` to change those)."""
        check_volume_name("name", name)
        check_epoch(epoch)
        with self._exclusive(name) as op:
            exp = self._require(name)
            await self._assign(op, exp, role, epoch, None)
            return await self._describe(op, exp)

    def _apply_alua(self, exp: _Exported, role: Role) -> None:
        """Every portal group takes the role's ALUA state (SPC-4 §5.15)."""
        state = ROLE_ACCESS_STATE[role]
        for group in self._groups:
            exp.alua.set_state(group.portal_group_tag, state)
        exp.lu.notify_alua_changed()

    async def set_port_state(
        self, volume: str, portal_group_tag: int, state: AccessState
    ) -> VolumeDescription:
        check_volume_name("volume", volume)
        tags = [g.portal_group_tag for g in self._groups]
        if portal_group_tag not in tags:
            raise InvalidArgumentError(
                f"portal_group_tag {portal_group_tag} is not one of this server's portal "
                f"groups {tags}; see Health for the list"
            )
        with self._exclusive(volume) as op:
            exp = self._require(volume)
            exp.alua.set_state(portal_group_tag, state)
            exp.lu.notify_alua_changed()
            log.info(
                "volume %s portal group %d is now %s", volume, portal_group_tag, state.name.lower()
            )
            return await self._describe(op, exp)
