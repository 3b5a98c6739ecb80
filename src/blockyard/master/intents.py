"""What :class:`~blockyard.master.core.MasterCore` hands back: intents (store writes the
service performs before the core adopts them, and the replicas' LSNs it asks for before a
quorum failover) and heartbeat replies. Plain frozen data."""

from __future__ import annotations

from dataclasses import dataclass

from blockyard.master.assignments import Assignment
from blockyard.master.model import ServerRecord, VolumeRecord


@dataclass(frozen=True, slots=True)
class PutVolume:
    record: VolumeRecord
    #: The store version the write must find (0: the key must not exist).
    expect_version: int
    reason: str


@dataclass(frozen=True, slots=True)
class RemoveVolume:
    name: str
    expect_version: int


@dataclass(frozen=True, slots=True)
class PutServer:
    record: ServerRecord
    expect_version: int


@dataclass(frozen=True, slots=True)
class ProbeLsns:
    """Not a store write: ask these servers' copies of ``volume`` (replicas at ``epoch``) for
    the last LSN they received, and hand the answers to the core (see
    :mod:`blockyard.master.probe`)."""

    volume: str
    epoch: int
    server_ids: tuple[str, ...]


Intent = PutVolume | RemoveVolume | PutServer | ProbeLsns


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    volume: str
    epoch: int
    ttl_ms: int


@dataclass(frozen=True, slots=True)
class Reply:
    seq: int
    sent_mono_ns: int
    leases: tuple[LeaseGrant, ...] = ()
    assignments: tuple[Assignment, ...] = ()
    send_full: bool = False
    heartbeat_interval_ms: int = 0
    master_id: str = ""
