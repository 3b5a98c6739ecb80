"""The failover rules of :class:`~blockyard.master.core.MasterCore` (a mixin: the same state,
kept in a module of its own): when a volume's primary is promoted away, when a copy on a server
gone too long is replaced, and how copies leave a draining server. No I/O and no clock."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from blockyard.engine.epoch import Role
from blockyard.master import failover
from blockyard.master.intents import Intent, ProbeLsns, PutVolume
from blockyard.master.model import (
    MAX_COPIES,
    CopyRecord,
    CopyState,
    ServerState,
    VolumeRecord,
    VolumeReport,
)
from blockyard.master.placement import Candidate, rank
from blockyard.replication.commit import DurabilityMode

if TYPE_CHECKING:
    from blockyard.master.core import MasterConfig
    from blockyard.master.leases import LeaseTable
    from blockyard.master.probe import QuorumProbes
    from blockyard.master.registry import Registry

log = logging.getLogger("blockyard.master")


class FailoverRules:
    """Mixed into MasterCore, which owns the state declared here."""

    config: MasterConfig
    registry: Registry
    leases: LeaseTable
    deferred: failover.DeferredPromotions
    probes: QuorumProbes
    _busy: set[str]
    _promoting: set[str]
    _fencing: dict[str, int]
    _stuck_logged: set[tuple[str, int]]

    def silent_ns(self, server_id: str, now_ns: int) -> int:
        raise NotImplementedError

    def candidates(self, now_ns: int) -> list[Candidate]:
        raise NotImplementedError

    def _report(self, server_id: str, name: str) -> VolumeReport | None:
        raise NotImplementedError

    def _heard(self, server_id: str, now_ns: int) -> bool:
        live = self.registry.live.get(server_id)
        return (
            live is not None
            and live.connected
            and not live.stopping
            and now_ns - live.last_heartbeat_ns <= self.config.suspect_after_ns
        )

    def _draining(self, server_id: str) -> bool:
        rec = self.registry.servers.get(server_id)
        return rec is not None and rec.state is ServerState.DRAINING

    def _lsns(self, rec: VolumeRecord) -> dict[str, int]:
        return {
            c.server_id: report.durable_lsn
            for c in rec.copies
            if (report := self._report(c.server_id, rec.name)) is not None
        }

    def _successor(self, rec: VolumeRecord, now_ns: int, *, drain: bool) -> CopyRecord | None:
        """The copy to promote: on a heard server that is not draining; for a failure (not a
        drain) a heard draining server will do when no other is left."""
        lsns = self._lsns(rec)
        heard = {c.server_id for c in rec.copies if self._heard(c.server_id, now_ns)}
        staying = {s for s in heard if not self._draining(s)}
        choice = failover.choose_new_primary(
            rec, staying, lambda c: lsns.get(c.server_id, c.durable_lsn)
        )
        if choice is None and not drain:
            choice = failover.choose_new_primary(
                rec, heard, lambda c: lsns.get(c.server_id, c.durable_lsn)
            )
        return choice

    def _handing_over(self, rec: VolumeRecord, now_ns: int) -> bool:
        """The primary's server is draining and an in-sync copy elsewhere can take over."""
        return self._draining(rec.primary) and self._successor(rec, now_ns, drain=True) is not None

    def _primary_heard(self, rec: VolumeRecord, now_ns: int) -> bool:
        live = self.registry.live.get(rec.primary)
        if not self._heard(rec.primary, now_ns) or live is None:
            return False
        if self._handing_over(rec, now_ns):
            return False
        report = live.reports.get(rec.name)
        return report is not None and report.uuid == rec.uuid and not report.failed

    def _fenced(self, rec: VolumeRecord) -> int | None:
        """The epoch a quorum probe moved the volume's replicas to while its record is still
        below it (a failover under way: its own memory, or the copies' reports after a master
        restart); None otherwise."""
        epoch = self._fencing.get(rec.name, 0)
        for c in rec.copies:
            live = self.registry.live.get(c.server_id)
            report = None if live is None else live.reports.get(rec.name)
            if report is not None and report.uuid == rec.uuid:
                epoch = max(epoch, report.epoch)
        if epoch > rec.epoch:
            return epoch
        self._fencing.pop(rec.name, None)
        return None

    def _failover(self, rec: VolumeRecord, now_ns: int) -> Intent | None:
        if not rec.primary:
            return None
        fenced = self._fenced(rec)
        if self._primary_heard(rec, now_ns):
            self.deferred.cancel(rec.name)
            if fenced is None:
                return None
            # A probe moved its replicas past it: the primary keeps its volume (it holds every
            # write it acknowledged) at an epoch above theirs, so they take its stream again.
            self._busy.add(rec.name)
            log.warning("volume %s: primary %s is back after its replicas were fenced at epoch "
                        "%d; it keeps the volume at epoch %d", rec.name, rec.primary, fenced,
                        fenced + 1)  # fmt: skip
            new = replace(rec, epoch=fenced + 1)
            return PutVolume(new, self.registry.volume_versions[rec.name], "refence")
        self.deferred.defer(rec.name, rec.epoch, now_ns)
        if not self.leases.may_promote(rec.name, rec.epoch, now_ns):
            return None
        lsns = self._lsns(rec)
        if rec.mode is DurabilityMode.SYNC_QUORUM:
            plan = self.probes.plan(rec, lambda s: self._heard(s, now_ns), now_ns)
            if isinstance(plan, ProbeLsns):
                # The probe fences the replicas it asks (they move to the next epoch and refuse
                # the old primary), so what they answer cannot grow behind the master's back.
                self._fencing[rec.name] = rec.epoch + 1
                self._busy.add(rec.name)
                log.info("volume %s: asking replicas %s what they received before promoting",
                         rec.name, ", ".join(plan.server_ids))  # fmt: skip
                return plan
            received = plan or {}
            choice = failover.choose_new_primary(rec, received, lambda c: received[c.server_id])
        else:
            choice = self._successor(rec, now_ns, drain=False)
        if choice is None:
            if (rec.name, rec.epoch) not in self._stuck_logged:
                self._stuck_logged.add((rec.name, rec.epoch))
                why = (
                    "too few in-sync replicas answered what they received to be sure the "
                    "choice holds every acknowledged write"
                    if rec.mode is DurabilityMode.SYNC_QUORUM
                    else "no in-sync copy is on a live server"
                )
                log.warning(
                    "volume %s: primary %s is gone and %s; it waits for its primary (or an "
                    "in-sync replica's server) to return",
                    rec.name,
                    rec.primary,
                    why,
                )
            return None
        new = failover.promote(rec, choice.server_id, lsns, above=fenced)
        new = replace(new, copies=ordered_like(new, rec))
        self.deferred.cancel(rec.name)
        self._busy.add(rec.name)
        self._promoting.add(rec.name)
        log.warning(
            "volume %s: primary %s lost its lease; promoting %s (durable LSN %d) at epoch %d",
            rec.name,
            rec.primary,
            choice.server_id,
            lsns.get(choice.server_id, choice.durable_lsn),
            new.epoch,
        )
        return PutVolume(new, self.registry.volume_versions[rec.name], "failover")

    def _replace(self, rec: VolumeRecord, now_ns: int) -> Intent | None:
        for c in rec.copies:
            if c.server_id == rec.primary:
                continue
            if self.silent_ns(c.server_id, now_ns) < self.config.replace_after_ns:
                continue
            others = [o.server_id for o in rec.copies if o.server_id != c.server_id]
            zones = [self.registry.servers[s].zone for s in others if s in self.registry.servers]
            best = rank(
                self.candidates(now_ns),
                rec.size_bytes,
                exclude=set(rec.server_ids),
                taken_zones=zones,
            )
            if not best:
                continue
            new = failover.replace_copy(rec, c.server_id, best[0])
            self._busy.add(rec.name)
            log.warning(
                "volume %s: server %s silent for %.0f s; its copy moves to %s",
                rec.name,
                c.server_id,
                self.silent_ns(c.server_id, now_ns) / 1e9,
                best[0],
            )
            return PutVolume(new, self.registry.volume_versions[rec.name], "replacement")
        return None

    def _drain(self, rec: VolumeRecord, now_ns: int) -> Intent | None:
        """Move replicas off draining servers: add a copy elsewhere first, drop the draining
        one once every other copy is in sync (redundancy never drops below what it was). A
        primary on a draining server is handed over first (see :meth:`_handing_over`)."""
        leaving = [
            c for c in rec.copies if c.server_id != rec.primary and self._draining(c.server_id)
        ]
        if not leaving or self._draining(rec.primary):
            return None
        keep = [c for c in rec.copies if not self._draining(c.server_id)]
        if len(keep) < rec.replica_count:
            if len(rec.copies) >= MAX_COPIES:
                return None
            zones = [
                self.registry.servers[c.server_id].zone
                for c in keep
                if c.server_id in self.registry.servers
            ]
            best = rank(
                self.candidates(now_ns),
                rec.size_bytes,
                exclude=set(rec.server_ids),
                taken_zones=zones,
            )
            if not best:
                return None
            new = rec.with_copy(CopyRecord(best[0], Role.REPLICA, CopyState.PENDING))
            reason = f"drain: new copy on {best[0]}"
        elif all(c.state is CopyState.IN_SYNC for c in keep):
            new = rec.without_copy(leaving[0].server_id)
            reason = f"drain: copy on {leaving[0].server_id} moved"
        else:
            return None
        new = replace(new, copies=ordered_like(new, rec))
        new = replace(new, status=new.settled_status())
        self._busy.add(rec.name)
        log.info("volume %s: %s", rec.name, reason)
        return PutVolume(new, self.registry.volume_versions[rec.name], reason)


def ordered_like(new: VolumeRecord, old: VolumeRecord) -> tuple[CopyRecord, ...]:
    """``new``'s copies in ``old``'s order (new copies last), so records do not reshuffle."""
    pos = {s: i for i, s in enumerate(old.server_ids)}
    return tuple(sorted(new.copies, key=lambda c: pos.get(c.server_id, len(pos))))
