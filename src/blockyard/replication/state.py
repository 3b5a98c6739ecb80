"""Durable replication state kept beside each volume (small JSON files, replaced atomically).

- ``replication.json`` on a **primary**: the durability mode, the replica set (each replica's
  address) and, per replica, whether it is in sync. The in-sync flag is the record the commit
  rule depends on: a replica is dropped from the copies a flush waits for only after its
  ``in_sync`` is durably false here, and counts again only after it is durably true. (The
  master issue moves this decision to the master's store; the file stays the server's view.)
- ``replica.json`` on a **replica**: whether its data is consistent (a prefix of the primary's
  history) or mid-resync (must never be promoted or trusted until the resync finishes).

Both are bounded and validated on load; a damaged file is reported, never guessed around.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Final

from blockyard.errors import CorruptionError, InvalidArgumentError
from blockyard.fileutil import atomic_write
from blockyard.replication.commit import DurabilityMode
from blockyard.replication.messages import ReplicaDataState

PRIMARY_STATE_FILE: Final = "replication.json"
REPLICA_STATE_FILE: Final = "replica.json"
#: Copies of a volume: the primary plus at most two replicas (RF 1..3).
MAX_REPLICAS: Final = 2
MAX_ADDRESS_CHARS: Final = 255
_MAX_FILE_BYTES: Final = 64 << 10


@dataclass(frozen=True, slots=True)
class ReplicaEntry:
    """One replica of a primary volume. ``address`` is the replica server's
    ``--replication-listen`` address, which is also the replica's id."""

    address: str
    in_sync: bool = False


@dataclass(frozen=True, slots=True)
class PrimaryState:
    mode: DurabilityMode = DurabilityMode.SYNC_ALL
    replicas: tuple[ReplicaEntry, ...] = ()
    #: Bandwidth limit for resync traffic per replica, bytes/s; 0 = unlimited.
    resync_limit_bps: int = 0

    def replica(self, address: str) -> ReplicaEntry | None:
        return next((r for r in self.replicas if r.address == address), None)

    def with_in_sync(self, address: str, in_sync: bool) -> PrimaryState:
        return replace(
            self,
            replicas=tuple(
                replace(r, in_sync=in_sync) if r.address == address else r for r in self.replicas
            ),
        )


@dataclass(frozen=True, slots=True)
class ReplicaState:
    data_state: ReplicaDataState = ReplicaDataState.CONSISTENT
    #: The resync the data is in the middle of (0 when consistent).
    resync_id: int = 0
    #: The primary LSN the replica must reach durably before a finished resync counts.
    resync_final_lsn: int = 0


def check_replica_address(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if (
        not sep
        or not host
        or not port.isdigit()
        or not 0 < int(port) <= 0xFFFF
        or len(address) > MAX_ADDRESS_CHARS
    ):
        raise InvalidArgumentError(
            f"replica address {address!r} must be HOST:PORT, the replica server's "
            "--replication-listen address"
        )
    return address


def _corrupt(path: str, what: str) -> CorruptionError:
    return CorruptionError(
        f"replication state {what}; fix or delete the file and assign the replica set again",
        volume=os.path.basename(os.path.dirname(path)),
        path=path,
        offset=0,
    )


class _Invalid(Exception):
    pass


def _require(condition: bool) -> None:
    if not condition:
        raise _Invalid


def _read_json(path: str) -> object | None:
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(raw) > _MAX_FILE_BYTES:
        raise _corrupt(path, f"is larger than {_MAX_FILE_BYTES} bytes")
    try:
        doc: object = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _corrupt(path, "is not JSON") from None
    return doc


def load_primary_state(directory: str) -> PrimaryState | None:
    """The primary state of the volume in ``directory``, or None when it has none."""
    path = os.path.join(directory, PRIMARY_STATE_FILE)
    doc = _read_json(path)
    if doc is None:
        return None
    try:
        _require(isinstance(doc, dict) and doc.get("version") == 1)
        assert isinstance(doc, dict)
        mode = DurabilityMode(doc["mode"])
        limit = int(doc.get("resync_limit_bps", 0))
        items = doc["replicas"]
        _require(isinstance(items, list) and len(items) <= MAX_REPLICAS and limit >= 0)
        replicas = []
        for i in items:
            _require(isinstance(i, dict) and isinstance(i.get("in_sync"), bool))
            replicas.append(ReplicaEntry(check_replica_address(str(i["address"])), i["in_sync"]))
    except (_Invalid, KeyError, TypeError, ValueError, InvalidArgumentError):
        raise _corrupt(path, "has invalid content") from None
    return PrimaryState(mode, tuple(replicas), limit)


def save_primary_state(directory: str, state: PrimaryState) -> None:
    """Durable on return (temp file, fsync, rename, directory fsync)."""
    doc = {
        "version": 1,
        "mode": state.mode.value,
        "resync_limit_bps": state.resync_limit_bps,
        "replicas": [{"address": r.address, "in_sync": r.in_sync} for r in state.replicas],
    }
    atomic_write(os.path.join(directory, PRIMARY_STATE_FILE), json.dumps(doc).encode())


def remove_primary_state(directory: str) -> None:
    try:
        os.unlink(os.path.join(directory, PRIMARY_STATE_FILE))
    except FileNotFoundError:
        return


def load_replica_state(directory: str) -> ReplicaState | None:
    path = os.path.join(directory, REPLICA_STATE_FILE)
    doc = _read_json(path)
    if doc is None:
        return None
    try:
        _require(isinstance(doc, dict) and doc.get("version") == 1)
        assert isinstance(doc, dict)
        state = ReplicaDataState[str(doc["data_state"]).upper()]
        resync_id = int(doc.get("resync_id", 0))
        final = int(doc.get("resync_final_lsn", 0))
        _require(0 <= resync_id < 1 << 64 and 0 <= final < 1 << 64)
    except (_Invalid, KeyError, TypeError, ValueError):
        raise _corrupt(path, "has invalid content") from None
    return ReplicaState(state, resync_id, final)


def save_replica_state(directory: str, state: ReplicaState) -> None:
    doc = {
        "version": 1,
        "data_state": state.data_state.name.lower(),
        "resync_id": state.resync_id,
        "resync_final_lsn": state.resync_final_lsn,
    }
    atomic_write(os.path.join(directory, REPLICA_STATE_FILE), json.dumps(doc).encode())
