"""The engine volume behind a replication session: :class:`EngineReplicaStore` implements
:class:`~blockyard.replication.replica_session.ReplicaStore` over
:class:`~blockyard.engine.volume.Volume` and the replica's state file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from blockyard import sabotage
from blockyard.blockdev import BytesLike
from blockyard.engine.history import History, Segment
from blockyard.engine.volume import Volume
from blockyard.replication.messages import RecordKind, ReplicaDataState, ReplRecord
from blockyard.replication.state import ReplicaState, load_replica_state, save_replica_state


class EngineReplicaStore:
    """A replica volume as a replication session sees it. Thread-safe as the volume is."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        self._received = 0  # WRITE records, for sabotage.REPLICA_DROPS_RECORDS

    def _sabotaged(self, records: Sequence[ReplRecord]) -> Sequence[ReplRecord]:
        if not sabotage.active(sabotage.REPLICA_DROPS_RECORDS):
            return records
        out = []
        for rec in records:
            if rec.kind == RecordKind.WRITE:
                self._received += 1
                if self._received % sabotage.DROP_EVERY == 0:
                    rec = replace(rec, kind=RecordKind.ZERO, data=b"")
            out.append(rec)
        return out

    @property
    def volume_uuid_bytes(self) -> bytes:
        return self.volume.uuid.bytes

    @property
    def size_bytes(self) -> int:
        return self.volume.size_bytes

    @property
    def block_count(self) -> int:
        return self.volume.size_bytes >> 12

    @property
    def epoch(self) -> int:
        return self.volume.epoch

    @property
    def last_lsn(self) -> int:
        return self.volume.last_lsn

    @property
    def durable_lsn(self) -> int:
        return self.volume.durable_lsn

    def history(self) -> tuple[Segment, ...]:
        return tuple(self.volume.history.segments)

    def data_state(self) -> ReplicaState:
        state = load_replica_state(self.volume.directory)
        if state is not None:
            return state
        # No state file: a copy that never took part in replication. With no history it was
        # never written by any primary we know of, so it must be built in full.
        if not self.volume.history.segments:
            return ReplicaState(ReplicaDataState.EMPTY)
        return ReplicaState(ReplicaDataState.CONSISTENT)

    def save_data_state(self, state: ReplicaState) -> None:
        save_replica_state(self.volume.directory, state)

    def grow(self, size_bytes: int) -> None:
        self.volume.grow(size_bytes)

    def apply_records(self, records: Sequence[ReplRecord]) -> int:
        return self.volume.apply_replicated(self._sabotaged(records))

    def try_apply_records(self, records: Sequence[ReplRecord]) -> int | None:
        return self.volume.try_apply_replicated(self._sabotaged(records))

    def apply_backfill(self, runs: Sequence[tuple[int, int, BytesLike | None]]) -> None:
        self.volume.apply_backfill(runs)

    def flush(self) -> int:
        self.volume.flush()
        return self.volume.durable_lsn

    def reset_log(self, next_lsn: int, history: History) -> None:
        self.volume.reset_log(next_lsn, history)

    def divergent_extents(self, after_lsn: int) -> list[tuple[int, int]] | None:
        return self.volume.logged_extents_after(after_lsn)
