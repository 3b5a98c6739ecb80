"""The master's gRPC service (``blockyard.v1.Master``) over a :class:`MasterStore`.

Thin around :class:`~blockyard.master.core.MasterCore`: every change is written to the store
first and handed to the core after (store first, then assign). Operations on one volume are
serialised by the core's per-name in-flight lock (a second one gets ABORTED). Errors are
translated by *type* into status codes in :func:`status_of` (the proto header lists them);
messages say what went wrong and how to fix it. Only the leader answers; a follower answers
FAILED_PRECONDITION naming the leader in the message and in the ``blockyard-leader`` trailing
metadata.

Every wait is bounded: store calls by the store's own timeout, volume server calls by the
client's deadlines, MarkOutOfSync's wait for a busy volume by :data:`MARK_WAIT_S`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import replace
from typing import Any, Final, Protocol, TypeVar

import grpc

from blockyard import errors
from blockyard.engine.epoch import Role
from blockyard.master import model
from blockyard.master.core import MasterCore
from blockyard.master.intents import Intent, ProbeLsns, PutServer, PutVolume, RemoveVolume, Reply
from blockyard.master.model import (
    CopyRecord,
    CopyState,
    ServerState,
    VolumeRecord,
    VolumeStatus,
)
from blockyard.master.placement import place, rank
from blockyard.master.probe_calls import received_lsns
from blockyard.master.proto import master_pb2 as mpb
from blockyard.master.proto import master_pb2_grpc as mpb_grpc
from blockyard.master.store import KIND_SERVERS, KIND_VOLUMES, MasterStore
from blockyard.replication.commit import DurabilityMode
from blockyard.replication.report import ReplicationInfo
from blockyard.server import convert
from blockyard.server.status import status_for
from blockyard.server.validation import check_volume_name

log = logging.getLogger("blockyard.master.service")

LEADER_METADATA_KEY: Final = "blockyard-leader"
#: How long MarkOutOfSync waits for another write of the same volume to finish (a primary's
#: flush is waiting on it; the store's own timeout is 5 s).
MARK_WAIT_S: Final = 10.0
_MARK_POLL_S: Final = 0.005
#: ListVolumes page size when the request names none, and the most it returns.
DEFAULT_PAGE: Final = 100
MAX_PAGE: Final = 1000
#: Background store writes (heartbeat and tick intents) in flight at once.
MAX_INTENT_TASKS: Final = 256
#: Durability mode of a volume created without one.
DEFAULT_MODE: Final = DurabilityMode.SYNC_ALL
#: Modes that may be created (or left) with fewer copies than asked for: best_effort promises
#: durability on the primary only, so a missing replica weakens nothing it promised.
DEGRADABLE_MODES: Final = frozenset({DurabilityMode.BEST_EFFORT})

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]


class CopyClient(Protocol):
    """What the master asks of a volume server (a subset of VolumeServerClient)."""

    async def create_volume(
        self, name: str, size_bytes: int, *, volume_uuid: uuidlib.UUID | None = None
    ) -> object: ...
    async def delete_volume(self, name: str) -> object: ...
    async def expand_volume(self, name: str, size_bytes: int) -> object: ...
    async def get_replication(self, name: str) -> ReplicationInfo: ...
    async def set_replication(self, name: str, *, role: Role, epoch: int) -> ReplicationInfo: ...
    async def close(self) -> None: ...


ClientFactory = Callable[[str], CopyClient]


def status_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, errors.NotLeaderError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, errors.StoreConflictError):
        return grpc.StatusCode.ABORTED
    if isinstance(exc, errors.StoreUnavailableError):
        return grpc.StatusCode.UNAVAILABLE
    return status_for(exc)


class MasterService(mpb_grpc.MasterServicer):
    def __init__(
        self,
        core: MasterCore,
        store: MasterStore,
        client_for: ClientFactory,
        *,
        address: str,
        store_kind: str,
        clock_ns: Callable[[], int] = time.monotonic_ns,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.core = core
        self.store = store
        self.client_for = client_for
        self.address = address
        self.store_kind = store_kind
        self.clock_ns = clock_ns
        self.wall_ns = wall_ns
        self._tasks: set[asyncio.Task[None]] = set()
        #: Called after each promotion reached the store (metrics).
        self.on_failover: Callable[[], None] = lambda: None

    # ---- plumbing ----------------------------------------------------------------------

    def _check_leader(self) -> None:
        if self.store.is_leader:
            return
        leader = self.store.leader()
        where = leader.address if leader is not None else ""
        raise errors.NotLeaderError(
            f"this master ({self.core.config.master_id}) is not the leader; "
            + (f"ask the leader at {where}" if where else "no leader is known yet; retry"),
            leader_address=where or None,
        )

    async def _rpc(self, context: Context, what: str, fn: Coroutine[Any, Any, T]) -> T:
        start = time.monotonic()
        try:
            try:
                self._check_leader()
            except errors.NotLeaderError:
                fn.close()  # never started: close it, or it is reported as never awaited
                raise
            result = await fn
        except errors.BlockyardError as exc:
            code = status_of(exc)
            if isinstance(exc, errors.NotLeaderError) and exc.leader_address:
                context.set_trailing_metadata(((LEADER_METADATA_KEY, exc.leader_address),))
            log.info("%s: %s (%.3f s): %s", what, code.name, time.monotonic() - start, exc)
            await context.abort(code, str(exc))
        else:
            log.info("%s: OK (%.3f s)", what, time.monotonic() - start)
            return result
        raise AssertionError("unreachable: abort raises")

    async def _put_volume(self, rec: VolumeRecord, expect_version: int) -> int:
        version = await self.store.put(
            KIND_VOLUMES, rec.name, model.encode_volume(rec), expect_version=expect_version
        )
        self.core.applied_volume(rec, version)
        return version

    def _version(self, name: str) -> int:
        return self.core.registry.volume_versions.get(name, 0)

    async def run_intents(self, intents: list[Intent]) -> None:
        """Write each intent to the store, then hand the result to the core."""
        for intent in intents:
            if isinstance(intent, ProbeLsns):
                self._spawn_probe(intent)
                continue
            version: int | None = None
            try:
                if isinstance(intent, PutVolume):
                    version = await self.store.put(
                        KIND_VOLUMES,
                        intent.record.name,
                        model.encode_volume(intent.record),
                        expect_version=intent.expect_version,
                    )
                elif isinstance(intent, PutServer):
                    version = await self.store.put(
                        KIND_SERVERS,
                        intent.record.server_id,
                        model.encode_server(intent.record),
                        expect_version=intent.expect_version,
                    )
                else:
                    assert isinstance(intent, RemoveVolume)
                    await self.store.delete(
                        KIND_VOLUMES, intent.name, expect_version=intent.expect_version
                    )
                    version = 0
            except errors.BlockyardError as exc:
                log.warning("store write for %s failed: %s", type(intent).__name__, exc)
            finally:
                self.core.finished(intent, version)
            if (
                version is not None
                and isinstance(intent, PutVolume)
                and intent.reason == "failover"
            ):
                self.on_failover()

    def _spawn_probe(self, intent: ProbeLsns) -> None:
        """Ask the replicas off the tick loop (other volumes' failovers must not wait on it)."""
        if len(self._tasks) >= MAX_INTENT_TASKS:
            self.core.finished(intent, None)
            return

        async def run() -> None:
            answers: dict[str, int] = {}
            try:
                api = {s: r.addresses.api for s, r in self.core.registry.servers.items()}
                answers = await received_lsns(intent, api, self.client_for)
            finally:
                self.core.probed(intent, answers, self.clock_ns())

        task = asyncio.create_task(run(), name=f"probe {intent.volume}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn(self, intents: list[Intent]) -> None:
        if not intents:
            return
        if len(self._tasks) >= MAX_INTENT_TASKS:
            # Drop them: the core released nothing yet, so release now; the state that caused
            # them is reported again by the next heartbeat or tick.
            for i in intents:
                self.core.finished(i, None)
            return
        task = asyncio.create_task(self.run_intents(intents))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def tick_loop(self, interval_s: float) -> None:
        """Run the core's timers until cancelled (only while leading)."""
        while True:
            await asyncio.sleep(interval_s)
            if self.store.is_leader:
                await self.run_intents(self.core.tick(self.clock_ns()))

    async def drain(self, timeout_s: float) -> None:
        """Wait (bounded) for background store writes to finish."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    # ---- heartbeats --------------------------------------------------------------------

    async def Heartbeat(
        self,
        request_iterator: AsyncIterator[mpb.ServerHeartbeat],
        context: Context,
    ) -> AsyncIterator[mpb.MasterReply]:
        stream = self.core.open_stream()
        server_id: str | None = None
        try:
            async for msg in request_iterator:
                try:
                    self._check_leader()
                    hb = heartbeat_from_pb(msg)
                    reply, intents = self.core.on_heartbeat(
                        stream, hb, self.clock_ns(), wall_ns=self.wall_ns()
                    )
                except errors.BlockyardError as exc:
                    if isinstance(exc, errors.NotLeaderError) and exc.leader_address:
                        context.set_trailing_metadata(((LEADER_METADATA_KEY, exc.leader_address),))
                    await context.abort(status_of(exc), str(exc))
                server_id = hb.server_id
                self._spawn(intents)
                yield reply_to_pb(reply)
        finally:
            self.core.close_stream(stream, server_id)

    # ---- volumes -----------------------------------------------------------------------

    async def CreateVolume(
        self, request: mpb.MasterCreateVolumeRequest, context: Context
    ) -> mpb.VolumeInfo:
        return await self._rpc(context, f"CreateVolume {request.name}", self._create(request))

    async def _create(self, req: mpb.MasterCreateVolumeRequest) -> mpb.VolumeInfo:
        name = check_volume_name("name", req.name)
        if req.size_bytes <= 0:
            raise errors.InvalidSizeError("size_bytes must be positive: give the size in bytes")
        mode = DEFAULT_MODE if req.mode == 0 else convert.mode_from_pb(req.mode)
        if req.replica_count > model.MAX_COPIES:
            raise errors.InvalidArgumentError(
                f"replica_count {req.replica_count} is more than {model.MAX_COPIES}"
            )
        self.core.begin(name)
        try:
            rec = self.core.registry.volumes.get(name)
            if rec is not None:
                self._check_same(rec, req, mode)
                if rec.status is not VolumeStatus.PENDING:
                    # A retried create: the record stands; make sure every copy has its
                    # assignment again (a copy lost since is re-created by its server).
                    self.core.applied_volume(rec, self._version(name))
                    return self._info(rec)
            else:
                now = self.clock_ns()
                count = req.replica_count or self.core.default_replica_count(now)
                chosen = _place(self.core, now, req.size_bytes, count, set(req.zones))
                if not chosen:
                    raise errors.NoSpaceError(
                        f"no volume server can take volume {name!r} ({req.size_bytes} bytes): "
                        "none is alive with that much free space"
                        + (f" in zones {sorted(req.zones)}" if req.zones else "")
                        + "; start or free up a server, or ask for a smaller volume"
                    )
                copies = [CopyRecord(chosen[0], Role.PRIMARY, CopyState.PENDING)]
                copies += [CopyRecord(s, Role.REPLICA, CopyState.PENDING) for s in chosen[1:]]
                rec = VolumeRecord(
                    name=name,
                    uuid=str(uuidlib.uuid4()),
                    size_bytes=req.size_bytes,
                    replica_count=count,
                    mode=mode,
                    epoch=1,
                    status=VolumeStatus.PENDING,
                    primary=chosen[0],
                    copies=tuple(copies),
                    created_ns=self.wall_ns(),
                    parameters=dict(req.parameters),
                )
                await self._put_volume(rec, 0)
            rec = await self._create_copies(rec, set(req.zones))
            return self._info(rec)
        finally:
            self.core.end(name)

    def _check_same(
        self, rec: VolumeRecord, req: mpb.MasterCreateVolumeRequest, mode: DurabilityMode
    ) -> None:
        if rec.status is VolumeStatus.DELETING:
            raise errors.OperationInProgressError(
                f"volume {rec.name!r} is being deleted; retry the create once it is gone"
            )
        differs = []
        if rec.size_bytes != req.size_bytes:
            differs.append(f"size {rec.size_bytes} bytes")
        if req.replica_count and rec.replica_count != req.replica_count:
            differs.append(f"{rec.replica_count} replicas")
        if req.mode and rec.mode is not mode:
            differs.append(f"durability {rec.mode.value}")
        if differs:
            raise errors.VolumeExistsError(
                f"volume {rec.name!r} exists with {', '.join(differs)}; pick another name or "
                "ask for the same parameters"
            )

    async def _create_copies(self, rec: VolumeRecord, zones: set[str]) -> VolumeRecord:
        """Create every pending copy (retrying the next candidate when a server refuses),
        then make the record active (or refuse and clean up)."""
        refused: set[str] = set()
        created: list[str] = []
        idx = 0
        while idx < len(rec.copies):
            copy = rec.copies[idx]
            try:
                await self._create_on(copy.server_id, rec)
                created.append(copy.server_id)
                idx += 1
                continue
            except errors.BlockyardError as exc:
                log.warning(
                    "volume %s: server %s refused its copy: %s", rec.name, copy.server_id, exc
                )
                refused.add(copy.server_id)
            now = self.clock_ns()
            others = [c.server_id for c in rec.copies if c.server_id != copy.server_id]
            zone_of = {s: r.zone for s, r in self.core.registry.servers.items()}
            best = rank(
                self.core.candidates(now),
                rec.size_bytes,
                exclude={*others, *refused},
                taken_zones=[zone_of.get(s, "") for s in others],
                zones=zones,
            )
            copies = list(rec.copies)
            if best:
                copies[idx] = replace(copy, server_id=best[0])
            else:
                del copies[idx]
            if not copies or copies[0].role is not Role.PRIMARY:
                await self._abandon(rec, created)
                raise errors.NoSpaceError(
                    f"no volume server would take the primary copy of {rec.name!r} (refused "
                    f"by {', '.join(sorted(refused))}); check those servers' logs and space"
                )
            new = replace(rec, copies=tuple(copies), primary=copies[0].server_id)
            await self._put_volume(new, self._version(rec.name))
            rec = new
        if len(rec.copies) < rec.replica_count and rec.mode not in DEGRADABLE_MODES:
            await self._abandon(rec, created)
            raise errors.NoSpaceError(
                f"volume {rec.name!r} needs {rec.replica_count} copies on different servers "
                f"but only {len(rec.copies)} could be placed, and durability {rec.mode.value} "
                "does not allow fewer; add volume servers, ask for fewer replicas, or use "
                "best_effort"
            )
        primary = rec.copies[0]
        copies = [replace(primary, state=CopyState.IN_SYNC), *rec.copies[1:]]
        active = replace(rec, copies=tuple(copies), status=VolumeStatus.ACTIVE)
        active = replace(active, status=active.settled_status())
        await self._put_volume(active, self._version(rec.name))
        return active

    async def _create_on(self, server_id: str, rec: VolumeRecord) -> None:
        srv = self.core.registry.servers.get(server_id)
        if srv is None or not srv.addresses.api:
            raise errors.ServerUnavailableError(f"server {server_id} has no management address")
        client = self.client_for(srv.addresses.api)
        try:
            await client.create_volume(rec.name, rec.size_bytes, volume_uuid=uuidlib.UUID(rec.uuid))
        finally:
            await client.close()

    async def _delete_on(self, server_id: str, name: str) -> bool:
        srv = self.core.registry.servers.get(server_id)
        if srv is None or not srv.addresses.api:
            return False
        client = self.client_for(srv.addresses.api)
        try:
            await client.delete_volume(name)
        except errors.BlockyardError as exc:
            log.warning("volume %s: delete on server %s failed: %s", name, server_id, exc)
            return False
        finally:
            await client.close()
        return True

    async def _abandon(self, rec: VolumeRecord, created: list[str]) -> None:
        for sid in created:
            await self._delete_on(sid, rec.name)
        await self.store.delete(KIND_VOLUMES, rec.name, expect_version=self._version(rec.name))
        self.core.applied_removal(rec.name)

    async def DeleteVolume(
        self, request: mpb.MasterDeleteVolumeRequest, context: Context
    ) -> mpb.MasterDeleteVolumeResponse:
        return await self._rpc(context, f"DeleteVolume {request.name}", self._delete(request))

    async def _delete(self, req: mpb.MasterDeleteVolumeRequest) -> mpb.MasterDeleteVolumeResponse:
        name = check_volume_name("name", req.name)
        self.core.begin(name)
        try:
            rec = self.core.registry.volumes.get(name)
            if rec is None:
                return mpb.MasterDeleteVolumeResponse(existed=False)
            if rec.status is not VolumeStatus.DELETING:
                rec = replace(rec, status=VolumeStatus.DELETING)
                await self._put_volume(rec, self._version(name))
            left = [c for c in rec.copies if not await self._delete_on(c.server_id, name)]
            if left:
                # Servers that could not be reached delete their copy when they are back
                # (a delete assignment); the record goes when the last copy has.
                # A deleted primary leaves the record without one: the record is only the list
                # of copies still to delete, and must not name a copy it no longer holds.
                primary = rec.primary if any(c.server_id == rec.primary for c in left) else ""
                await self._put_volume(
                    replace(rec, copies=tuple(left), primary=primary), self._version(name)
                )
            else:
                await self.store.delete(KIND_VOLUMES, name, expect_version=self._version(name))
                self.core.applied_removal(name)
            return mpb.MasterDeleteVolumeResponse(existed=True)
        finally:
            self.core.end(name)

    async def GetVolume(
        self, request: mpb.MasterGetVolumeRequest, context: Context
    ) -> mpb.VolumeInfo:
        return await self._rpc(context, f"GetVolume {request.name}", self._get(request.name))

    async def _get(self, name: str) -> mpb.VolumeInfo:
        rec = self.core.registry.volumes.get(name)
        if rec is None:
            raise errors.VolumeNotFoundError(f"no volume {name!r}; list them with volume list")
        return self._info(rec)

    async def ListVolumes(
        self, request: mpb.MasterListVolumesRequest, context: Context
    ) -> mpb.MasterListVolumesResponse:
        return await self._rpc(context, "ListVolumes", self._list(request))

    async def _list(self, req: mpb.MasterListVolumesRequest) -> mpb.MasterListVolumesResponse:
        size = min(req.max_entries or DEFAULT_PAGE, MAX_PAGE)
        names = sorted(n for n in self.core.registry.volumes if n > req.starting_token)
        page = names[:size]
        return mpb.MasterListVolumesResponse(
            volumes=[self._info(self.core.registry.volumes[n]) for n in page],
            next_token=page[-1] if len(names) > size else "",
        )

    async def ExpandVolume(
        self, request: mpb.MasterExpandVolumeRequest, context: Context
    ) -> mpb.VolumeInfo:
        return await self._rpc(context, f"ExpandVolume {request.name}", self._expand(request))

    async def _expand(self, req: mpb.MasterExpandVolumeRequest) -> mpb.VolumeInfo:
        name = check_volume_name("name", req.name)
        self.core.begin(name)
        try:
            rec = self.core.registry.volumes.get(name)
            if rec is None or rec.status is VolumeStatus.DELETING:
                raise errors.VolumeNotFoundError(f"no volume {name!r}")
            if req.size_bytes < rec.size_bytes:
                raise errors.ShrinkRefusedError(
                    f"volume {name!r} is {rec.size_bytes} bytes; volumes only grow"
                )
            if req.size_bytes == rec.size_bytes:
                return self._info(rec)
            for c in rec.copies:
                srv = self.core.registry.servers.get(c.server_id)
                if srv is None:
                    raise errors.ServerUnavailableError(f"server {c.server_id} is unknown")
                client = self.client_for(srv.addresses.api)
                try:
                    await client.expand_volume(name, req.size_bytes)
                finally:
                    await client.close()
            new = replace(rec, size_bytes=req.size_bytes)
            await self._put_volume(new, self._version(name))
            return self._info(new)
        finally:
            self.core.end(name)

    # ---- servers -----------------------------------------------------------------------

    async def ListServers(
        self, request: mpb.ListServersRequest, context: Context
    ) -> mpb.ListServersResponse:
        return await self._rpc(context, "ListServers", self._servers())

    async def _servers(self) -> mpb.ListServersResponse:
        return mpb.ListServersResponse(
            servers=[self._server_info(s) for s in sorted(self.core.registry.servers)]
        )

    def _server_info(self, sid: str) -> mpb.ServerInfo:
        now = self.clock_ns()
        rec = self.core.registry.servers[sid]
        live = self.core.registry.live.get(sid)
        names = self.core.registry.volumes_on(sid)
        primaries = sum(1 for n in names if self.core.registry.volumes[n].primary == sid)
        state = self.core.server_state(sid, now).value
        draining = rec.state is ServerState.DRAINING
        if draining and not names:
            state = "drained"
        return mpb.ServerInfo(
            server_id=sid,
            addresses=_addresses_pb(rec.addresses),
            zone=rec.zone,
            state=state,
            drain_remaining=len(names) if draining else 0,
            capacity_bytes=rec.capacity_bytes if live is None else live.capacity_bytes,
            free_bytes=rec.free_bytes if live is None else live.free_bytes,
            allocated_bytes=rec.allocated_bytes if live is None else live.allocated_bytes,
            primary_count=primaries,
            replica_count=len(names) - primaries,
            last_heartbeat_ms_ago=self.core.silent_ns(sid, now) // 1_000_000 if live else 0,
        )

    async def DrainServer(
        self, request: mpb.DrainServerRequest, context: Context
    ) -> mpb.ServerInfo:
        return await self._rpc(context, f"DrainServer {request.server_id}", self._drain(request))

    async def _drain(self, req: mpb.DrainServerRequest) -> mpb.ServerInfo:
        """Mark the server draining (persisted): placement skips it, its primaries hand over
        (their lease lapses, then an in-sync replica is promoted) and its replicas get a new
        copy elsewhere before theirs is dropped. Progress: ``drain_remaining``."""
        sid = req.server_id
        rec = self.core.registry.servers.get(sid)
        if rec is None:
            raise errors.NotFoundError(f"no server {sid!r}; list them with ListServers")
        if rec.state is not ServerState.DRAINING:
            new = replace(rec, state=ServerState.DRAINING)
            version = await self.store.put(
                KIND_SERVERS,
                sid,
                model.encode_server(new),
                expect_version=self.core.registry.server_versions.get(sid, 0),
            )
            self.core.applied_server(new, version)
        return self._server_info(sid)

    async def ForgetServer(
        self, request: mpb.ForgetServerRequest, context: Context
    ) -> mpb.ForgetServerResponse:
        return await self._rpc(context, f"ForgetServer {request.server_id}", self._forget(request))

    async def _forget(self, req: mpb.ForgetServerRequest) -> mpb.ForgetServerResponse:
        sid = req.server_id
        if sid not in self.core.registry.servers:
            return mpb.ForgetServerResponse(existed=False)
        state = self.core.server_state(sid, self.clock_ns())
        if state is ServerState.ALIVE:
            raise errors.VolumeBusyError(
                f"server {sid} is alive (heartbeating); stop it before forgetting it"
            )
        await self.store.delete(
            KIND_SERVERS, sid, expect_version=self.core.registry.server_versions.get(sid)
        )
        self.core.applied_server_removal(sid)
        return mpb.ForgetServerResponse(existed=True)

    # ---- the degrade decision ----------------------------------------------------------

    async def MarkOutOfSync(
        self, request: mpb.MarkOutOfSyncRequest, context: Context
    ) -> mpb.MarkOutOfSyncResponse:
        what = f"MarkOutOfSync {request.volume} {request.replica_address}"
        return await self._rpc(context, what, self._mark(request))

    async def _mark(self, req: mpb.MarkOutOfSyncRequest) -> mpb.MarkOutOfSyncResponse:
        name = req.volume
        try:
            async with asyncio.timeout(MARK_WAIT_S):
                while self.core.busy(name):
                    await asyncio.sleep(_MARK_POLL_S)
        except TimeoutError:
            raise errors.OperationInProgressError(
                f"volume {name!r} stayed busy for {MARK_WAIT_S:.0f} s; retry the mark"
            ) from None
        self.core.begin(name)
        try:
            new = self.core.mark_out_of_sync(
                name,
                req.epoch,
                req.server_id,
                req.replica_address,
                self.clock_ns(),
                sent_mono_ns=req.sent_mono_ns,
            )
            if new is not None:
                await self._put_volume(new, self._version(name))
            return mpb.MarkOutOfSyncResponse()
        finally:
            self.core.end(name)

    async def GetLeader(self, request: mpb.GetLeaderRequest, context: Context) -> mpb.LeaderInfo:
        leader = self.store.leader()
        return mpb.LeaderInfo(
            leader_id=leader.master_id if leader else "",
            leader_address=leader.address if leader else "",
            master_id=self.core.config.master_id,
            is_leader=self.store.is_leader,
            store=self.store_kind,
            promotions_allowed=self.core.promotions_allowed(self.clock_ns()),
            lease_ttl_ms=self.core.config.lease.ttl_ms,
        )

    # ---- views -------------------------------------------------------------------------

    def _info(self, rec: VolumeRecord) -> mpb.VolumeInfo:
        copies = []
        iqn = ""
        now = self.clock_ns()
        ordered = sorted(rec.copies, key=lambda c: c.server_id != rec.primary)
        for c in ordered:
            srv = self.core.registry.servers.get(c.server_id)
            report = None
            live = self.core.registry.live.get(c.server_id)
            if live is not None:
                report = live.reports.get(rec.name)
            if report is not None and report.iqn and (not iqn or c.server_id == rec.primary):
                iqn = report.iqn  # every copy exports the same name; the primary's first
            state = c.state.value
            if self.core.server_state(c.server_id, now) is ServerState.DEAD:
                state = "dead"
            info = mpb.CopyInfo(
                server_id=c.server_id,
                role=convert.ROLE_TO_PB[c.role],
                state=state,
                durable_lsn=report.durable_lsn if report is not None else c.durable_lsn,
                zone=srv.zone if srv else "",
            )
            if srv is not None:
                info.addresses.CopyFrom(_addresses_pb(srv.addresses))
            copies.append(info)
        return mpb.VolumeInfo(
            name=rec.name,
            uuid=rec.uuid,
            size_bytes=rec.size_bytes,
            replica_count=rec.replica_count,
            mode=convert.MODE_TO_PB[rec.mode],
            epoch=rec.epoch,
            status=rec.status.value,
            primary_server_id=rec.primary,
            copies=copies,
            created_ns=rec.created_ns,
            iqn=iqn,
            parameters=dict(rec.parameters),
        )


def _place(core: MasterCore, now: int, size: int, count: int, zones: set[str]) -> list[str]:
    return place(core.candidates(now), size, count, zones=zones)


def _addresses_pb(a: model.ServerAddresses) -> mpb.ServerAddresses:
    return mpb.ServerAddresses(
        iscsi_portals=list(a.iscsi_portals), api=a.api, replication=a.replication
    )


# ---- protobuf conversion ---------------------------------------------------------------------


def heartbeat_from_pb(msg: mpb.ServerHeartbeat) -> model.Heartbeat:
    if len(msg.volumes) > 65536:
        raise errors.InvalidArgumentError("a heartbeat reports more than 65536 volumes")
    vols = [
        model.VolumeReport(
            name=v.name,
            uuid=v.uuid,
            role=convert.ROLE_FROM_PB.get(v.role, Role.NONE),
            epoch=v.epoch,
            size_bytes=v.size_bytes,
            last_lsn=v.last_lsn,
            durable_lsn=v.durable_lsn,
            allocated_bytes=v.allocated_bytes,
            iqn=v.iqn,
            replicas=tuple(
                model.ReplicaReport(
                    r.address,
                    r.in_sync,
                    r.connected,
                    r.phase,
                    r.acked_lsn,
                    r.resync_total_bytes,
                    r.resync_done_bytes,
                )
                for r in v.replicas
            ),
            failed=v.failed,
            deleted=v.deleted,
        )
        for v in msg.volumes
    ]
    a = msg.addresses
    return model.Heartbeat(
        server_id=msg.server_id,
        full=msg.full,
        addresses=model.ServerAddresses(tuple(a.iscsi_portals), a.api, a.replication),
        zone=msg.zone,
        capacity_bytes=msg.capacity_bytes,
        free_bytes=msg.free_bytes,
        allocated_bytes=msg.allocated_bytes,
        volumes=tuple(vols),
        sent_mono_ns=msg.sent_mono_ns,
        seq=msg.seq,
        stopping=msg.stopping,
    )


def reply_to_pb(reply: Reply) -> mpb.MasterReply:
    return mpb.MasterReply(
        seq=reply.seq,
        sent_mono_ns=reply.sent_mono_ns,
        leases=[mpb.Lease(volume=g.volume, epoch=g.epoch, ttl_ms=g.ttl_ms) for g in reply.leases],
        assignments=[
            mpb.Assignment(
                volume=a.volume,
                uuid=a.uuid,
                size_bytes=a.size_bytes,
                role=convert.ROLE_TO_PB[a.role],
                epoch=a.epoch,
                replicas=list(a.replicas),
                mode=convert.MODE_TO_PB[a.mode],
                create=a.create,
                deleted=a.deleted,
            )
            for a in reply.assignments
        ],
        send_full=reply.send_full,
        heartbeat_interval_ms=reply.heartbeat_interval_ms,
        master_id=reply.master_id,
    )
