"""MasterCore: the master's state machine, with no I/O and no clock of its own.

The service drives it, raft-style:

- ``on_heartbeat(stream, heartbeat, now_ns)`` → the reply to send (leases and every
  unconfirmed assignment of that server) and *intents*;
- ``tick(now_ns)`` → intents (promotions after a lease expired, replacements of copies on
  servers gone longer than ``replace_after``);
- every intent that changes durable state is a record to write to the store. The service
  writes it and then calls :meth:`MasterCore.finished` with the store's new version (or None
  when the write failed); only then does the core apply it and queue the assignments it implies.
  Store first, then assign: no server is ever told an epoch the store does not hold.

One operation or intent per volume at a time (:meth:`begin`/:meth:`end`, the per-name in-flight
lock); the core skips busy volumes and revisits them on a later heartbeat or tick, since it
always works from the servers' whole reported state, never from a single delta.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Final

from blockyard.engine.epoch import Role
from blockyard.errors import (
    InvalidArgumentError,
    OperationInProgressError,
    StaleEpochError,
    VolumeNotFoundError,
)
from blockyard.master import failover
from blockyard.master.assignments import Assignment, AssignmentQueue
from blockyard.master.core_failover import FailoverRules, ordered_like
from blockyard.master.intents import (
    Intent,
    LeaseGrant,
    ProbeLsns,
    PutServer,
    PutVolume,
    RemoveVolume,
    Reply,
)
from blockyard.master.leases import LeasePolicy, LeaseTable
from blockyard.master.model import (
    MAX_PENDING_MARKS,
    CopyRecord,
    CopyState,
    Heartbeat,
    ServerRecord,
    ServerState,
    VolumeRecord,
    VolumeReport,
    VolumeStatus,
    check_copy_transition,
)
from blockyard.master.placement import Candidate
from blockyard.master.probe import QuorumProbes
from blockyard.master.registry import Registry, ServerLive

log = logging.getLogger("blockyard.master")

__all__ = [
    "Intent",
    "LeaseGrant",
    "MasterConfig",
    "MasterCore",
    "ProbeLsns",
    "PutServer",
    "PutVolume",
    "RemoveVolume",
    "Reply",
]

_NS_PER_S: Final = 1_000_000_000
DEFAULT_HEARTBEAT_INTERVAL_S: Final = 0.5
DEFAULT_REPLACE_AFTER_S: Final = 600.0
#: Heartbeat intervals of silence before a server is suspect: one late heartbeat is noise.
SUSPECT_AFTER_INTERVALS: Final = 3
#: Replica phases (replication.report) in which a copy is being caught up.
_CATCHING_UP_PHASES: Final = frozenset({"catching_up", "resyncing"})
_SERVING: Final = (VolumeStatus.ACTIVE, VolumeStatus.DEGRADED)
_STREAM_IDS: Final = itertools.count(1)


@dataclass(frozen=True, slots=True)
class MasterConfig:
    master_id: str
    lease: LeasePolicy = field(default_factory=LeasePolicy)
    heartbeat_interval_ns: int = int(DEFAULT_HEARTBEAT_INTERVAL_S * _NS_PER_S)
    replace_after_ns: int = int(DEFAULT_REPLACE_AFTER_S * _NS_PER_S)

    def __post_init__(self) -> None:
        if self.heartbeat_interval_ns <= 0:
            raise InvalidArgumentError("the heartbeat interval must be positive")
        if self.heartbeat_interval_ns * 2 > self.lease.ttl_ns:
            raise InvalidArgumentError(
                f"a heartbeat interval of {self.heartbeat_interval_ns / 1e9:g} s cannot keep a "
                f"{self.lease.ttl_ns / 1e9:g} s lease alive: use an interval of at most half "
                "the lease TTL (default 500 ms for a 2 s lease)"
            )
        if self.replace_after_ns <= 0:
            raise InvalidArgumentError("--replace-after must be positive")

    @property
    def suspect_after_ns(self) -> int:
        return SUSPECT_AFTER_INTERVALS * self.heartbeat_interval_ns

    @property
    def dead_after_ns(self) -> int:
        """Silence after which a server holds no lease the master granted."""
        return max(self.suspect_after_ns, self.lease.promotion_delay_ns)

    @property
    def mark_hold_ns(self) -> int:
        """After a MarkOutOfSync, how long an in-sync report without a send time that proves
        it newer is distrusted (a heartbeat built before the mark may still be in flight)."""
        return self.suspect_after_ns + self.lease.ttl_ns


@dataclass(slots=True)
class _Mark:
    """A MarkOutOfSync the master accepted: in-sync reports from before it are ignored."""

    until_ns: int
    sent_mono_ns: int


class MasterCore(FailoverRules):
    """Not thread-safe: one event loop drives it."""

    def __init__(self, config: MasterConfig, now_ns: int) -> None:
        self.config = config
        self.registry = Registry()
        self.assignments = AssignmentQueue()
        self.leases = LeaseTable(config.lease, took_over_ns=now_ns)
        self.deferred = failover.DeferredPromotions()
        self.started_ns = now_ns
        self._busy: set[str] = set()
        self._promoting: set[str] = set()
        #: Volumes whose replicas a quorum probe fenced: name → the epoch they were moved to.
        self._fencing: dict[str, int] = {}
        self._servers_busy: set[str] = set()
        self._marks: dict[tuple[str, str], _Mark] = {}
        self._stuck_logged: set[tuple[str, int]] = set()
        self.probes = QuorumProbes()

    # ---- loading -----------------------------------------------------------------------

    def load(
        self,
        servers: Iterable[tuple[ServerRecord, int]],
        volumes: Iterable[tuple[VolumeRecord, int]],
    ) -> None:
        """Take the store's records (at start or after becoming leader). Every copy's
        assignment is queued again: confirmed at once by servers that hold it already, and
        re-sent to those that lost it (a retried create finds its copies re-assigned)."""
        for srec, sver in servers:
            self.registry.put_server(srec, sver)
        for vrec, vver in volumes:
            self.registry.put_volume(vrec, vver)
            self._queue_for(vrec, None)

    # ---- the per-name in-flight lock ---------------------------------------------------

    def busy(self, name: str) -> bool:
        return name in self._busy

    def begin(self, name: str) -> None:
        if name in self._busy:
            raise OperationInProgressError(
                f"another operation on volume {name!r} is in progress; retry in a moment"
            )
        self._busy.add(name)

    def end(self, name: str) -> None:
        self._busy.discard(name)
        self._promoting.discard(name)

    # ---- results of store writes ------------------------------------------------------

    def finished(self, intent: Intent, version: int | None) -> None:
        """The store write of ``intent`` succeeded with ``version``, or failed (None)."""
        if isinstance(intent, ProbeLsns):
            # Dropped unsent (answers go to :meth:`probed`).
            self.probes.failed(intent)
            self.end(intent.volume)
            return
        if isinstance(intent, PutServer):
            self._servers_busy.discard(intent.record.server_id)
            if version is not None:
                self.applied_server(intent.record, version)
            return
        name = intent.record.name if isinstance(intent, PutVolume) else intent.name
        try:
            if version is None:
                log.warning("volume %s: store write failed; it is retried from the next tick",
                            name)  # fmt: skip
            elif isinstance(intent, PutVolume):
                self.applied_volume(intent.record, version)
            else:
                self.applied_removal(name)
        finally:
            self.end(name)

    def probed(self, intent: ProbeLsns, answers: dict[str, int], now_ns: int) -> None:
        """The replicas of ``intent`` that answered, with the LSN each received."""
        self.probes.answered(intent, answers, now_ns)
        self.end(intent.volume)

    def applied_volume(self, rec: VolumeRecord, version: int) -> None:
        """``rec`` is in the store at ``version``: adopt it and queue what it implies."""
        old = self.registry.put_volume(rec, version)
        if old is not None and old.epoch != rec.epoch:
            self.deferred.cancel(rec.name)
            self.probes.forget(rec.name)
            log.info(
                "volume %s: epoch %d, primary %s (was epoch %d, primary %s)",
                rec.name,
                rec.epoch,
                rec.primary,
                old.epoch,
                old.primary,
            )
        self._queue_for(rec, old)

    def applied_removal(self, name: str) -> None:
        self.registry.remove_volume(name)
        self.assignments.drop_volume(name)
        self.leases.forget(name)
        self.deferred.cancel(name)
        self.probes.forget(name)
        self._marks = {k: v for k, v in self._marks.items() if k[0] != name}

    def applied_server(self, rec: ServerRecord, version: int) -> None:
        old = self.registry.servers.get(rec.server_id)
        self.registry.put_server(rec, version)
        if old is not None and old.addresses.replication != rec.addresses.replication:
            # A server back on another replication address: every primary replicating to it
            # needs the new address in its replica set.
            for name in sorted(self.registry.volumes_on(rec.server_id)):
                vol = self.registry.volumes[name]
                self._queue_for(vol, vol)

    def applied_server_removal(self, server_id: str) -> None:
        self.registry.remove_server(server_id)
        self.assignments.drop_server(server_id)

    # ---- assignments -------------------------------------------------------------------

    def assignment_for(self, rec: VolumeRecord, copy: CopyRecord) -> Assignment:
        replicas: tuple[str, ...] = ()
        if copy.role is Role.PRIMARY:
            addrs = []
            for other in rec.copies:
                srv = self.registry.servers.get(other.server_id)
                if other.server_id != copy.server_id and srv and srv.addresses.replication:
                    addrs.append(srv.addresses.replication)
            replicas = tuple(sorted(addrs))
        return Assignment(
            volume=rec.name,
            uuid=rec.uuid,
            size_bytes=rec.size_bytes,
            role=copy.role,
            epoch=rec.epoch,
            mode=rec.mode,
            replicas=replicas,
            create=copy.role is not Role.PRIMARY and copy.state is CopyState.PENDING,
        )

    def _delete_assignment(self, rec: VolumeRecord) -> Assignment:
        return Assignment(
            volume=rec.name,
            uuid=rec.uuid,
            size_bytes=rec.size_bytes,
            role=Role.NONE,
            epoch=rec.epoch,
            mode=rec.mode,
            deleted=True,
        )

    def _report(self, server_id: str, name: str) -> VolumeReport | None:
        live = self.registry.live.get(server_id)
        return None if live is None else live.reports.get(name)

    def _queue_for(self, rec: VolumeRecord, old: VolumeRecord | None) -> None:
        if rec.status is VolumeStatus.PENDING:
            return
        wanted: list[tuple[str, Assignment]] = []
        if rec.status is VolumeStatus.DELETING:
            wanted = [(c.server_id, self._delete_assignment(rec)) for c in rec.copies]
        else:
            wanted = [(c.server_id, self.assignment_for(rec, c)) for c in rec.copies]
        if old is not None:
            gone = set(old.server_ids) - set(rec.server_ids)
            wanted += [(s, self._delete_assignment(rec)) for s in sorted(gone)]
        for server_id, a in wanted:
            if a.confirmed_by(self._report(server_id, rec.name)):
                self.assignments.drop(server_id, rec.name)
            else:
                self.assignments.put(server_id, a)

    # ---- heartbeats --------------------------------------------------------------------

    def open_stream(self) -> int:
        # Ids are unique across cores: a stream opened under the previous leader's core and
        # still running under this one must never be mistaken for a newer stream.
        return next(_STREAM_IDS)

    def close_stream(self, stream: int, server_id: str | None) -> None:
        """A heartbeat stream ended. Only the server's current stream disconnects it: a late
        close of an older stream must not mark a reconnected server gone."""
        if server_id is None:
            return
        live = self.registry.live.get(server_id)
        if live is not None and live.stream == stream:
            live.connected = False

    def on_heartbeat(
        self, stream: int, hb: Heartbeat, now_ns: int, *, wall_ns: int = 0
    ) -> tuple[Reply, list[Intent]]:
        if not hb.server_id:
            raise InvalidArgumentError(
                "a heartbeat needs server_id (the id the volume server keeps in its data directory)"
            )
        sid = hb.server_id
        base = Reply(
            seq=hb.seq,
            sent_mono_ns=hb.sent_mono_ns,
            heartbeat_interval_ms=self.config.heartbeat_interval_ns // 1_000_000,
            master_id=self.config.master_id,
        )
        intents: list[Intent] = []
        live = self.registry.live.get(sid)
        if hb.full:
            live = ServerLive(stream=stream, last_heartbeat_ns=now_ns)
            live.reports = {v.name: v for v in hb.volumes if not v.deleted}
            self.registry.live[sid] = live
            intents += self._register(hb, wall_ns)
        elif live is None or live.stream != stream:
            # A delta on a stream the master holds no full state for (it restarted, or the
            # server reconnected elsewhere): ask for everything again, grant nothing.
            return replace(base, send_full=True), []
        else:
            for v in hb.volumes:
                if v.deleted:
                    live.reports.pop(v.name, None)
                else:
                    live.reports[v.name] = v
        live.last_heartbeat_ns = now_ns
        live.connected = True
        live.stopping = hb.stopping
        live.capacity_bytes = hb.capacity_bytes
        live.free_bytes = hb.free_bytes
        live.allocated_bytes = hb.allocated_bytes

        for name in sorted(set(live.reports) | self.registry.volumes_on(sid)):
            intent = self._observe(sid, live, name, hb, now_ns)
            if intent is not None:
                intents.append(intent)
        self.assignments.confirm(sid, live.reports)
        leases = () if hb.stopping else self._grant(sid, live, now_ns)
        return replace(
            base, leases=leases, assignments=tuple(self.assignments.pending(sid))
        ), intents

    def _register(self, hb: Heartbeat, wall_ns: int) -> list[Intent]:
        sid = hb.server_id
        rec = self.registry.servers.get(sid)
        if sid in self._servers_busy:
            return []
        state = (
            rec.state
            if rec is not None and rec.state is ServerState.DRAINING
            else (ServerState.ALIVE)
        )
        want = ServerRecord(
            server_id=sid,
            addresses=hb.addresses,
            zone=hb.zone,
            capacity_bytes=hb.capacity_bytes,
            free_bytes=hb.free_bytes,
            allocated_bytes=hb.allocated_bytes,
            state=state,
            registered_ns=rec.registered_ns if rec is not None else wall_ns,
        )
        if rec is not None and (rec.addresses, rec.zone, rec.capacity_bytes) == (
            want.addresses,
            want.zone,
            want.capacity_bytes,
        ):
            return []
        self._servers_busy.add(sid)
        return [PutServer(want, self.registry.server_versions.get(sid, 0))]

    def _observe(
        self, sid: str, live: ServerLive, name: str, hb: Heartbeat, now_ns: int
    ) -> Intent | None:
        """What one server's state of one volume means for the record (at most one write)."""
        rec = self.registry.volumes.get(name)
        if rec is None or name in self._busy:
            return None
        report = live.reports.get(name)
        copy = rec.copy_on(sid)
        version = self.registry.volume_versions[name]
        if rec.status is VolumeStatus.DELETING:
            if copy is not None and report is None and hb.full:
                return self._drop_deleted_copy(rec, sid, version)
            return None
        if report is None or report.uuid != rec.uuid:
            return None
        if copy is None:
            if rec.status is not VolumeStatus.PENDING and self.assignments.get(sid, name) is None:
                # A copy the record no longer lists (replaced while its server was away).
                self.assignments.put(sid, self._delete_assignment(rec))
            return None
        if rec.status is VolumeStatus.PENDING:
            return None  # its create is still running (or is resumed by a retried create)
        new = rec
        if sid == rec.primary:
            if report.role is Role.PRIMARY and report.epoch == rec.epoch and not report.failed:
                new = self._apply_primary_view(new, report, hb, now_ns)
        elif (
            copy.state is CopyState.PENDING
            and report.epoch == rec.epoch
            and report.role
            in (
                Role.REPLICA,
                Role.REBUILDING,
            )
        ):
            # The sw-block "None → Rebuilding" case: a new copy took its assignment and is
            # being filled; it is not in sync until its primary says so.
            new = new.with_copy(replace(copy, state=CopyState.REBUILDING))
        if new == rec:
            return None
        new = replace(new, copies=ordered_like(new, rec), status=new.settled_status())
        self._busy.add(name)
        return PutVolume(new, version, "copy states from heartbeat")

    def _apply_primary_view(
        self, rec: VolumeRecord, report: VolumeReport, hb: Heartbeat, now_ns: int
    ) -> VolumeRecord:
        new = rec
        own = new.copy_on(rec.primary)
        assert own is not None
        if own.state is not CopyState.IN_SYNC:
            new = new.with_copy(replace(own, state=CopyState.IN_SYNC))
        pending = set(new.pending_out_of_sync)
        for r in report.replicas:
            other = self.registry.server_for_replication(r.address)
            c = None if other is None else new.copy_on(other)
            if c is None:
                continue
            if r.address in pending:
                pending.discard(r.address)
                want = CopyState.OUT_OF_SYNC
            elif r.in_sync:
                mark = self._marks.get((rec.name, r.address))
                if mark is not None and self._mark_holds(mark, hb, now_ns):
                    continue
                want = CopyState.IN_SYNC
            elif r.phase in _CATCHING_UP_PHASES:
                want = CopyState.REBUILDING
            else:
                want = CopyState.OUT_OF_SYNC
            if want is not c.state:
                check_copy_transition(rec.name, c.server_id, c.state, want)
                new = new.with_copy(replace(c, state=want, durable_lsn=r.acked_lsn))
        if pending != set(new.pending_out_of_sync):
            new = replace(new, pending_out_of_sync=tuple(sorted(pending)))
        return new

    def _mark_holds(self, mark: _Mark, hb: Heartbeat, now_ns: int) -> bool:
        if mark.sent_mono_ns and hb.sent_mono_ns:
            return hb.sent_mono_ns <= mark.sent_mono_ns
        return now_ns < mark.until_ns

    def _drop_deleted_copy(self, rec: VolumeRecord, sid: str, version: int) -> Intent:
        self._busy.add(rec.name)
        out = rec.without_copy(sid)
        if not out.copies:
            return RemoveVolume(rec.name, version)
        if out.primary == sid:
            out = replace(out, primary="")  # a record never names a copy it no longer holds
        return PutVolume(out, version, f"copy on {sid} deleted")

    def _grant(self, sid: str, live: ServerLive, now_ns: int) -> tuple[LeaseGrant, ...]:
        """Leases for the volumes the store names ``sid`` primary of, at the store's epoch."""
        grants = []
        ttl_ms = self.config.lease.ttl_ms
        for name in sorted(self.registry.volumes_on(sid)):
            rec = self.registry.volumes[name]
            if rec.primary != sid or rec.status not in _SERVING or name in self._promoting:
                continue
            report = live.reports.get(name)
            if report is None or report.uuid != rec.uuid or report.failed:
                continue
            if self._handing_over(rec, now_ns):
                continue  # drain: the primary lets its lease lapse, then a replica takes over
            holds = report.role is Role.PRIMARY and report.epoch == rec.epoch
            pending = self.assignments.get(sid, name)
            taking = pending is not None and pending.role is Role.PRIMARY
            if not (holds or (taking and pending is not None and pending.epoch == rec.epoch)):
                continue
            if holds:
                # The primary is heard holding the volume: a deferred promotion is off.
                self.deferred.cancel(name)
            self.leases.granted(name, rec.epoch, now_ns)
            grants.append(LeaseGrant(name, rec.epoch, ttl_ms))
        return tuple(grants)

    # ---- the degrade decision ----------------------------------------------------------

    def mark_out_of_sync(
        self,
        name: str,
        epoch: int,
        server_id: str,
        replica_address: str,
        now_ns: int,
        *,
        sent_mono_ns: int = 0,
    ) -> VolumeRecord | None:
        """The record to persist before the primary may acknowledge without
        ``replica_address`` (None: the store already says so). Call between begin/end."""
        rec = self.registry.volumes.get(name)
        if rec is None or rec.status is VolumeStatus.DELETING:
            raise VolumeNotFoundError(f"no volume {name!r} on this master")
        if epoch != rec.epoch or server_id != rec.primary:
            raise StaleEpochError(
                f"volume {name!r} is at epoch {rec.epoch} with primary {rec.primary or 'none'}; "
                f"server {server_id} at epoch {epoch} is not its primary and must stop "
                "acknowledging",
                volume_epoch=rec.epoch,
                request_epoch=epoch,
            )
        fenced = self._fenced(rec)
        if fenced is not None:
            # The replicas were fenced for a failover: a mark now would leave no in-sync copy
            # to promote, and the primary must stop acknowledging anyway.
            raise StaleEpochError(
                f"volume {name!r} is failing over (its replicas are at epoch {fenced}); server "
                f"{server_id} at epoch {epoch} must stop acknowledging",
                volume_epoch=fenced,
                request_epoch=epoch,
            )
        self._marks[(name, replica_address)] = _Mark(
            now_ns + self.config.mark_hold_ns, sent_mono_ns
        )
        other = self.registry.server_for_replication(replica_address)
        copy = None if other is None else rec.copy_on(other)
        if copy is None:
            if replica_address in rec.pending_out_of_sync:
                return None
            if len(rec.pending_out_of_sync) >= MAX_PENDING_MARKS:
                raise InvalidArgumentError(
                    f"volume {name!r} already holds {MAX_PENDING_MARKS} marks for replicas it "
                    f"does not know; {replica_address} is not a copy of it (check the primary's "
                    "replica set)"
                )
            marks = (*rec.pending_out_of_sync, replica_address)
            return replace(rec, pending_out_of_sync=marks)
        if copy.state not in (CopyState.IN_SYNC, CopyState.PENDING):
            return None
        out = rec.with_copy(replace(copy, state=CopyState.OUT_OF_SYNC))
        out = replace(out, copies=ordered_like(out, rec))
        return replace(out, status=out.settled_status())

    # ---- time --------------------------------------------------------------------------

    def silent_ns(self, server_id: str, now_ns: int) -> int:
        if server_id not in self.registry.servers:
            return 1 << 62  # forgotten: gone for good
        live = self.registry.live.get(server_id)
        last = self.started_ns if live is None else live.last_heartbeat_ns
        return max(0, now_ns - last)

    def server_state(self, server_id: str, now_ns: int) -> ServerState:
        rec = self.registry.servers.get(server_id)
        if rec is not None and rec.state is ServerState.DRAINING:
            return ServerState.DRAINING
        live = self.registry.live.get(server_id)
        silent = self.silent_ns(server_id, now_ns)
        heard = live is not None and live.connected and not live.stopping
        if heard and silent <= self.config.suspect_after_ns:
            return ServerState.ALIVE
        if live is not None and silent <= self.config.dead_after_ns:
            return ServerState.SUSPECT
        return ServerState.DEAD

    def candidates(self, now_ns: int) -> list[Candidate]:
        out = []
        for sid, rec in self.registry.servers.items():
            live = self.registry.live.get(sid)
            out.append(
                Candidate(
                    server_id=sid,
                    zone=rec.zone,
                    free_bytes=rec.free_bytes if live is None else live.free_bytes,
                    provisioned_bytes=self.registry.provisioned_bytes(sid),
                    usable=self.server_state(sid, now_ns) is ServerState.ALIVE,
                )
            )
        return out

    def default_replica_count(self, now_ns: int) -> int:
        alive = sum(1 for c in self.candidates(now_ns) if c.usable)
        return 2 if alive >= 2 else 1

    def promotions_allowed(self, now_ns: int) -> bool:
        return self.leases.promotions_allowed(now_ns)

    def tick(self, now_ns: int) -> list[Intent]:
        intents: list[Intent] = []
        for rec in list(self.registry.iter_volumes()):
            if rec.name in self._busy:
                continue
            intent: Intent | None = None
            if rec.status in _SERVING:
                intent = (
                    self._failover(rec, now_ns)
                    or self._replace(rec, now_ns)
                    or self._drain(rec, now_ns)
                )
            elif rec.status is VolumeStatus.DELETING:
                gone = [c.server_id for c in rec.copies if c.server_id not in self.registry.servers]
                if gone:
                    intent = self._drop_deleted_copy(
                        rec, gone[0], self.registry.volume_versions[rec.name]
                    )
            if intent is not None:
                intents.append(intent)
        return intents
