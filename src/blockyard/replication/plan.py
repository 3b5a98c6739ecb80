"""The catch-up choice: what a returning replica gets, cheapest first (pure; no I/O).

When a replica connects, the primary compares what the replica holds with what it can still
send, and picks:

1. **Catch-up** — the replica's records are a prefix of the primary's history and every record
   after its last one is still in the primary's WAL: stream them from there. Nothing else.
2. **Delta resync** — the replica's missed-write bitmap has bits, or the WAL no longer holds the
   records right after the replica's last one (their blocks are in the bitmap then), or the
   replica holds records the primary's history does not have (it diverged; it reports the
   blocks those records touched and they join the bitmap): send the current image of every
   block in the bitmap while streaming new records.
3. **Full rebuild** — the replica is empty, shares no known history with the primary, lost
   data it had acknowledged, or agrees with the primary only below its bitmap's floor (the
   primary did not track the replica when the records after that were released: it was
   promoted from replica, and the replica lagged behind the old primary): every block is
   marked and resynced (holes travel as holes, so a sparse volume rebuilds in time
   proportional to its data).

Why a delta is sound: every record after the LSN a replica acknowledged as durable, and after
the bitmap's floor, is either still in the primary's WAL or marked in the replica's bitmap
(records are released only after acknowledgement, or with marking). A replica whose records
agree with the primary's history only below what it acknowledged has lost acknowledged data (a
replaced disk, a restored image); nothing but a full rebuild repairs that.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from blockyard.engine.history import Segment, common_prefix_end
from blockyard.replication.messages import HistorySegment, ReplicaDataState, ReplicaHello


class PlanChoice(enum.Enum):
    CATCH_UP = "catch_up"
    DELTA = "delta"
    FULL = "full"


@dataclass(frozen=True, slots=True)
class PrimaryFacts:
    """What the primary knows when a replica connects."""

    history: tuple[Segment, ...]
    #: The primary's newest LSN.
    last_lsn: int
    #: The oldest LSN still in the primary's WAL (``last_lsn + 1`` when none is).
    oldest_available_lsn: int
    #: The highest LSN this replica acknowledged durable (0: unknown, e.g. since a restart of
    #: the primary). Every record after it is in the primary's WAL or in the bitmap.
    acked_lsn: int
    #: Whether the replica's bitmap has bits (a resync is owed).
    bitmap_dirty: bool
    #: The bitmap knows nothing of records at or below this LSN (see
    #: :mod:`blockyard.engine.missed_bitmap`).
    bitmap_floor_lsn: int = 0


@dataclass(frozen=True, slots=True)
class PlanDecision:
    choice: PlanChoice
    #: The first record LSN the primary streams.
    start_lsn: int
    #: The replica must drop its log and continue at ``start_lsn`` (its newest records are not
    #: followed by ``start_lsn``).
    reset_log: bool
    #: The replica's records after this LSN are not in the primary's history; it must report
    #: the blocks they touched. None: nothing diverged.
    diverged_after: int | None
    #: Why, for the log line and the management API.
    reason: str


def segments_from_wire(history: Sequence[HistorySegment]) -> tuple[Segment, ...]:
    return tuple(Segment(s.epoch, s.generation, s.first_lsn, s.last_lsn) for s in history)


def segments_to_wire(history: Sequence[Segment]) -> tuple[HistorySegment, ...]:
    return tuple(HistorySegment(s.epoch, s.generation, s.first_lsn, s.last_lsn) for s in history)


def choose_plan(primary: PrimaryFacts, replica: ReplicaHello) -> PlanDecision:
    """Decide how ``replica`` catches up (see the module docstring)."""
    fresh_start = max(primary.last_lsn + 1, 1)

    def full(reason: str) -> PlanDecision:
        return PlanDecision(PlanChoice.FULL, fresh_start, True, None, reason)

    if replica.state is ReplicaDataState.EMPTY or replica.last.lsn <= 0:
        return full("the replica holds no data yet")
    common = common_prefix_end(
        primary.history,
        primary.last_lsn,
        segments_from_wire(replica.history),
        replica.last.lsn,
    )
    if common is None:
        return full("the replica shares no known history with the primary")
    if common < primary.acked_lsn:
        return full(
            f"the replica agrees with the primary only up to LSN {common} but had "
            f"acknowledged up to {primary.acked_lsn}: it lost acknowledged data"
        )
    if common < primary.bitmap_floor_lsn:
        upto = min(primary.bitmap_floor_lsn, primary.last_lsn)
        return full(
            f"the replica agrees with the primary only up to LSN {common}, and which of the "
            f"writes up to LSN {upto} it missed is known nowhere (this primary did not track "
            "it then)"
        )
    diverged_after = common if common < replica.last.lsn else None
    if common + 1 >= primary.oldest_available_lsn:
        start, reset = common + 1, diverged_after is not None
    else:
        # The records right after the replica's are gone from the WAL; their blocks are in
        # the bitmap (common >= acked), so stream from what is still held.
        start, reset = max(primary.oldest_available_lsn, 1), True
    resync = (
        primary.bitmap_dirty
        or reset
        or diverged_after is not None
        or replica.state is ReplicaDataState.RESYNCING
    )
    if not resync:
        return PlanDecision(
            PlanChoice.CATCH_UP, start, False, None, f"WAL catch-up from LSN {start}"
        )
    if diverged_after is not None:
        reason = f"the replica's records after LSN {diverged_after} diverged"
    elif replica.state is ReplicaDataState.RESYNCING:
        reason = "a resync was interrupted"
    elif reset:
        reason = f"the WAL no longer holds the records after LSN {common}"
    else:
        reason = "the replica missed writes while it was out of sync"
    return PlanDecision(PlanChoice.DELTA, start, reset, diverged_after, reason)
