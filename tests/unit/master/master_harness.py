"""A MasterCore driven by a fake clock, with an in-test "store" that applies intents."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace

from blockyard.engine.epoch import Role
from blockyard.master.core import (
    Intent,
    MasterConfig,
    MasterCore,
    ProbeLsns,
    PutServer,
    PutVolume,
    RemoveVolume,
    Reply,
)
from blockyard.master.leases import LeasePolicy
from blockyard.master.model import (
    CopyRecord,
    CopyState,
    Heartbeat,
    ReplicaReport,
    ServerAddresses,
    ServerRecord,
    VolumeRecord,
    VolumeReport,
    VolumeStatus,
)
from blockyard.replication.commit import DurabilityMode

MS = 1_000_000
S = 1_000_000_000
TTL_NS = 2 * S
MARGIN_NS = S // 2
INTERVAL_NS = 500 * MS
VOLUME_UUID = str(uuid.UUID(int=42))


def addresses(sid: str) -> ServerAddresses:
    n = int(sid.removeprefix("s"))
    return ServerAddresses((f"10.0.0.{n}:3260",), f"10.0.0.{n}:9500", f"10.0.0.{n}:9600")


def server_record(sid: str, zone: str = "", free_bytes: int = 100 << 30) -> ServerRecord:
    return ServerRecord(sid, addresses(sid), zone, 100 << 30, free_bytes, 0)


def volume_record(
    name: str = "vol",
    primary: str = "s1",
    replicas: tuple[str, ...] = ("s2",),
    epoch: int = 1,
    replica_state: CopyState = CopyState.IN_SYNC,
) -> VolumeRecord:
    copies = [CopyRecord(primary, Role.PRIMARY, CopyState.IN_SYNC)]
    copies += [CopyRecord(r, Role.REPLICA, replica_state) for r in replicas]
    rec = VolumeRecord(
        name=name,
        uuid=VOLUME_UUID,
        size_bytes=1 << 30,
        replica_count=len(copies),
        mode=DurabilityMode.SYNC_ALL,
        epoch=epoch,
        status=VolumeStatus.ACTIVE,
        primary=primary,
        copies=tuple(copies),
    )
    return replace(rec, status=rec.settled_status())


@dataclass
class Harness:
    """``now`` is the fake monotonic clock; ``store`` holds what was persisted."""

    core: MasterCore
    now: int = 0
    streams: dict[str, int] = field(default_factory=dict)
    persisted: list[Intent] = field(default_factory=list)
    #: Intents handed out but not yet finished (when ``auto_persist`` is off).
    held: list[Intent] = field(default_factory=list)
    auto_persist: bool = True
    seq: int = 0
    #: What each server's copy answers a probe (the last LSN it received); a server missing
    #: here does not answer. Probes are answered at once unless ``auto_persist`` is off.
    received: dict[str, int] = field(default_factory=dict)
    probes: list[ProbeLsns] = field(default_factory=list)

    @classmethod
    def make(
        cls,
        servers: tuple[str, ...] = ("s1", "s2"),
        volumes: tuple[VolumeRecord, ...] = (),
        *,
        start_ns: int = 0,
        zones: dict[str, str] | None = None,
        replace_after_ns: int = 600 * S,
    ) -> Harness:
        config = MasterConfig(
            master_id="m1",
            lease=LeasePolicy(TTL_NS, MARGIN_NS),
            heartbeat_interval_ns=INTERVAL_NS,
            replace_after_ns=replace_after_ns,
        )
        core = MasterCore(config, start_ns)
        zones = zones or {}
        core.load(
            [(server_record(s, zones.get(s, "")), 1) for s in servers],
            [(v, 1) for v in volumes],
        )
        return cls(core, now=start_ns)

    def advance(self, ns: int) -> None:
        self.now += ns

    def _handle(self, intents: list[Intent]) -> list[Intent]:
        for i in intents:
            if isinstance(i, ProbeLsns):
                self.probes.append(i)
        if not self.auto_persist:
            self.held.extend(intents)
            return intents
        for i in intents:
            self.finish(i)
        return intents

    def finish(self, intent: Intent, ok: bool = True) -> None:
        if intent in self.held:
            self.held.remove(intent)
        if isinstance(intent, ProbeLsns):
            answers = {s: self.received[s] for s in intent.server_ids if s in self.received}
            self.core.probed(intent, answers if ok else {}, self.now)
            return
        if not ok:
            self.core.finished(intent, None)
            return
        self.persisted.append(intent)
        if isinstance(intent, PutVolume):
            version = self.core.registry.volume_versions.get(intent.record.name, 0) + 1
        elif isinstance(intent, PutServer):
            version = self.core.registry.server_versions.get(intent.record.server_id, 0) + 1
        else:
            assert isinstance(intent, RemoveVolume)
            version = 0
        self.core.finished(intent, version)

    def heartbeat(
        self,
        sid: str,
        volumes: tuple[VolumeReport, ...] = (),
        *,
        full: bool = False,
        stopping: bool = False,
        sent_mono_ns: int | None = None,
    ) -> tuple[Reply, list[Intent]]:
        if full or sid not in self.streams:
            self.streams[sid] = self.core.open_stream()
            full = True
        self.seq += 1
        hb = Heartbeat(
            server_id=sid,
            full=full,
            addresses=addresses(sid),
            capacity_bytes=100 << 30,
            free_bytes=100 << 30,
            volumes=volumes,
            sent_mono_ns=self.now if sent_mono_ns is None else sent_mono_ns,
            seq=self.seq,
            stopping=stopping,
        )
        reply, intents = self.core.on_heartbeat(self.streams[sid], hb, self.now)
        return reply, self._handle(intents)

    def disconnect(self, sid: str) -> None:
        self.core.close_stream(self.streams.pop(sid), sid)

    def tick(self) -> list[Intent]:
        return self._handle(self.core.tick(self.now))

    def volume(self, name: str = "vol") -> VolumeRecord:
        return self.core.registry.volumes[name]


def primary_report(
    rec: VolumeRecord,
    *,
    replicas_in_sync: bool = True,
    durable_lsn: int = 100,
    phase: str = "in_sync",
    epoch: int | None = None,
) -> VolumeReport:
    reps = tuple(
        ReplicaReport(addresses(c.server_id).replication, replicas_in_sync, True, phase)
        for c in rec.copies
        if c.server_id != rec.primary
    )
    return VolumeReport(
        rec.name,
        rec.uuid,
        Role.PRIMARY,
        rec.epoch if epoch is None else epoch,
        durable_lsn=durable_lsn,
        replicas=reps,
    )


def replica_report(
    rec: VolumeRecord,
    *,
    durable_lsn: int = 100,
    role: Role = Role.REPLICA,
    epoch: int | None = None,
) -> VolumeReport:
    return VolumeReport(
        rec.name, rec.uuid, role, rec.epoch if epoch is None else epoch, durable_lsn=durable_lsn
    )
