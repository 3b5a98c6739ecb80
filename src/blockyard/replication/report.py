"""What the management API reports about replication (plain data, shared by the volume
server, its gRPC client and the CLI)."""

from __future__ import annotations

from dataclasses import dataclass

from blockyard.engine.epoch import Role
from blockyard.replication.commit import DurabilityMode
from blockyard.replication.messages import ReplicaDataState


@dataclass(frozen=True, slots=True)
class ReplicaReport:
    """One replica's replication state for the management API."""

    address: str
    state: str
    in_sync: bool
    connected: bool
    phase: str
    plan: str
    plan_reason: str
    acked_lsn: int
    lag_lsns: int
    resync_total_blocks: int
    resync_done_blocks: int
    resync_bytes: int
    resync_eta_s: float
    last_error: str


@dataclass(frozen=True, slots=True)
class ReplicationInfo:
    """A volume's replication as the management API reports it."""

    name: str
    role: Role
    epoch: int
    mode: DurabilityMode | None
    last_lsn: int
    durable_lsn: int
    #: On a replica: whether its data is consistent, empty or mid-resync.
    data_state: ReplicaDataState | None
    #: On a replica: whether a primary is connected now.
    primary_connected: bool
    replicas: tuple[ReplicaReport, ...]
    resync_limit_bps: int = 0

    def replica(self, address: str) -> ReplicaReport | None:
        return next((r for r in self.replicas if r.address == address), None)
