"""The catch-up choice (``plan.choose_plan``): every branch with hand-built histories, and
generated histories checked against a per-LSN oracle of what the two copies share."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockyard.engine.history import OPEN_LSN, History, Segment
from blockyard.replication.messages import RecordId, ReplicaDataState, ReplicaHello
from blockyard.replication.plan import (
    PlanChoice,
    PlanDecision,
    PrimaryFacts,
    choose_plan,
    segments_from_wire,
    segments_to_wire,
)

VOLUME = uuid.UUID(int=0x9147)
A = (1, 11)  # (epoch, generation) of the first primary incarnation
B = (1, 12)  # the same epoch after a restart of the primary
C = (2, 21)  # the next primary after a failover
X = (1, 99)  # an incarnation the primary never heard of


def seg(key: tuple[int, int], first: int, last: int = OPEN_LSN) -> Segment:
    return Segment(key[0], key[1], first, last)


def facts(
    history: tuple[Segment, ...],
    last_lsn: int,
    *,
    oldest: int | None = None,
    acked: int = 0,
    dirty: bool = False,
    floor: int = 0,
) -> PrimaryFacts:
    return PrimaryFacts(
        history=history,
        last_lsn=last_lsn,
        oldest_available_lsn=last_lsn + 1 if oldest is None else oldest,
        acked_lsn=acked,
        bitmap_dirty=dirty,
        bitmap_floor_lsn=floor,
    )


def hello(
    history: tuple[Segment, ...],
    last_lsn: int,
    *,
    state: ReplicaDataState = ReplicaDataState.CONSISTENT,
) -> ReplicaHello:
    last = next(
        (
            RecordId(last_lsn, s.epoch, s.generation)
            for s in reversed(history)
            if s.first_lsn <= last_lsn <= s.last_lsn
        ),
        RecordId(last_lsn, 0, 0),
    )
    return ReplicaHello(
        volume_uuid=VOLUME,
        state=state,
        size_bytes=1 << 20,
        last=last,
        durable_lsn=last_lsn,
        history=segments_to_wire(history),
        resync_id=7 if state is ReplicaDataState.RESYNCING else 0,
        resync_cursor=0,
    )


PRIMARY = (seg(A, 1, 100), seg(B, 103, 150), seg(C, 151))


def test_segments_round_trip_through_the_wire_form() -> None:
    assert segments_from_wire(segments_to_wire(PRIMARY)) == PRIMARY


@pytest.mark.parametrize("state", [ReplicaDataState.EMPTY, ReplicaDataState.CONSISTENT])
def test_a_replica_with_no_records_is_rebuilt_in_full(state: ReplicaDataState) -> None:
    d = choose_plan(facts(PRIMARY, 160, oldest=1), hello((), 0, state=state))
    assert d == PlanDecision(PlanChoice.FULL, 161, True, None, d.reason)
    assert "no data" in d.reason


def test_an_empty_state_wins_over_records_the_replica_reports() -> None:
    """EMPTY (no replica state, no history) means never written by a primary we know."""
    d = choose_plan(
        facts(PRIMARY, 160, oldest=1), hello((seg(A, 1),), 50, state=ReplicaDataState.EMPTY)
    )
    assert d.choice is PlanChoice.FULL and d.start_lsn == 161 and d.reset_log


def test_a_fresh_primary_starts_a_full_rebuild_at_lsn_one() -> None:
    d = choose_plan(facts((), 0), hello((), 0, state=ReplicaDataState.EMPTY))
    assert (d.choice, d.start_lsn, d.reset_log) == (PlanChoice.FULL, 1, True)


def test_no_shared_history_means_a_full_rebuild() -> None:
    d = choose_plan(facts(PRIMARY, 160, oldest=1), hello((seg(X, 1),), 40))
    assert (d.choice, d.start_lsn, d.reset_log, d.diverged_after) == (
        PlanChoice.FULL,
        161,
        True,
        None,
    )
    assert "no known history" in d.reason


def test_a_replica_that_lost_acknowledged_data_is_rebuilt_in_full() -> None:
    """It acknowledged LSN 120 durable, but now holds only up to 90 of our history."""
    d = choose_plan(facts(PRIMARY, 160, oldest=1, acked=120), hello((seg(A, 1),), 90))
    assert d.choice is PlanChoice.FULL and d.start_lsn == 161
    assert "lost acknowledged data" in d.reason
    # Holding exactly what it acknowledged is fine.
    d = choose_plan(facts(PRIMARY, 160, oldest=1, acked=90), hello((seg(A, 1),), 90))
    assert d.choice is PlanChoice.CATCH_UP


def test_a_replica_behind_the_bitmaps_floor_is_rebuilt_in_full() -> None:
    """RF3: a replica lagged behind the old primary, which kept its misses in a bitmap that
    died with it. The promoted copy released those records as a replica, and its own bitmap
    for the laggard starts at its promotion (floor 150): it cannot tell what the laggard
    missed, so no delta can be trusted."""
    replica = (seg(A, 1, 100), seg(B, 103))
    d = choose_plan(facts(PRIMARY, 160, oldest=155, floor=150), hello(replica, 120))
    assert d.choice is PlanChoice.FULL and d.start_lsn == 161
    assert "known nowhere" in d.reason
    # At the floor itself: everything after it is in the WAL or the bitmap.
    d = choose_plan(facts(PRIMARY, 160, oldest=155, floor=150), hello(PRIMARY, 150))
    assert (d.choice, d.start_lsn, d.reset_log) == (PlanChoice.DELTA, 155, True)
    d = choose_plan(facts(PRIMARY, 160, oldest=151, floor=150), hello(PRIMARY, 150))
    assert (d.choice, d.start_lsn) == (PlanChoice.CATCH_UP, 151)


def test_catch_up_from_the_wal() -> None:
    replica = (seg(A, 1, 100), seg(B, 103))
    d = choose_plan(facts(PRIMARY, 160, oldest=120, acked=110), hello(replica, 119))
    assert d == PlanDecision(PlanChoice.CATCH_UP, 120, False, None, d.reason)
    # A replica with everything: nothing to send but future records.
    d = choose_plan(facts(PRIMARY, 160), hello((*replica[:1], seg(B, 103, 150), seg(C, 151)), 160))
    assert (d.choice, d.start_lsn, d.reset_log) == (PlanChoice.CATCH_UP, 161, False)


def test_divergence_means_a_delta_that_reports_the_diverged_records() -> None:
    """The replica got LSNs 101..102 of A that the primary lost in a crash (it went on with B at
    103): they are not in the primary's history."""
    replica = (seg(A, 1),)
    d = choose_plan(facts(PRIMARY, 160, oldest=90), hello(replica, 102))
    assert d == PlanDecision(PlanChoice.DELTA, 101, True, 100, d.reason)
    assert "diverged" in d.reason


def test_a_deposed_primary_diverges_after_the_point_its_successor_took_over() -> None:
    """The old primary (A) wrote up to 130; its successor (C) took over after 120."""
    primary = (seg(A, 1, 120), seg(C, 121))
    d = choose_plan(facts(primary, 140, oldest=100), hello((seg(A, 1),), 130))
    assert (d.choice, d.start_lsn, d.reset_log, d.diverged_after) == (
        PlanChoice.DELTA,
        121,
        True,
        120,
    )


def test_divergence_with_the_wal_released_streams_from_what_is_held() -> None:
    d = choose_plan(facts(PRIMARY, 160, oldest=140), hello((seg(A, 1),), 102))
    assert (d.choice, d.start_lsn, d.reset_log, d.diverged_after) == (
        PlanChoice.DELTA,
        140,
        True,
        100,
    )


def test_a_wal_gap_means_a_delta_that_resets_the_log() -> None:
    replica = (seg(A, 1, 100), seg(B, 103))
    d = choose_plan(facts(PRIMARY, 160, oldest=131), hello(replica, 120))
    assert d == PlanDecision(PlanChoice.DELTA, 131, True, None, d.reason)
    assert "no longer holds" in d.reason
    # Nothing held at all: the stream starts after the primary's last record.
    d = choose_plan(facts(PRIMARY, 160), hello(replica, 120))
    assert (d.choice, d.start_lsn, d.reset_log) == (PlanChoice.DELTA, 161, True)


def test_a_dirty_bitmap_means_a_delta_without_a_reset() -> None:
    replica = (seg(A, 1, 100), seg(B, 103))
    d = choose_plan(facts(PRIMARY, 160, oldest=100, dirty=True), hello(replica, 120))
    assert d == PlanDecision(PlanChoice.DELTA, 121, False, None, d.reason)
    assert "missed writes" in d.reason


def test_an_interrupted_resync_goes_on_as_a_delta() -> None:
    replica = (seg(A, 1, 100), seg(B, 103))
    d = choose_plan(
        facts(PRIMARY, 160, oldest=100),
        hello(replica, 120, state=ReplicaDataState.RESYNCING),
    )
    assert d == PlanDecision(PlanChoice.DELTA, 121, False, None, d.reason)
    assert "interrupted" in d.reason


# ---- generated histories ------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    primary: tuple[Segment, ...]
    primary_last: int
    #: Per-LSN identity on each side (None: the copy holds no record at that LSN).
    primary_ids: dict[int, tuple[int, int]]
    replica: tuple[Segment, ...]
    replica_last: int
    replica_ids: dict[int, tuple[int, int]]


@st.composite
def histories(draw: st.DrawFn) -> Case:
    """A primary history of 1..5 segments (crashes skip LSNs, failovers bump the epoch), and a
    replica that received a prefix of it, sometimes followed by records of the last segment it
    saw that the primary never kept (divergence)."""
    n_segments = draw(st.integers(1, 5))
    epoch = 1
    lsn = 1
    ids: dict[int, tuple[int, int]] = {}
    primary = History()
    for i in range(n_segments):
        epoch += draw(st.integers(0, 1))
        key = (epoch, 100 + i)
        primary.begin(key[0], key[1], lsn, close_at=lsn - 1)
        length = draw(st.integers(1 if i < n_segments - 1 else 0, 8))
        for _ in range(length):
            ids[lsn] = key
            lsn += 1
        if i < n_segments - 1:
            # The primary crashed: its next incarnation numbers above a few lost LSNs.
            lsn += draw(st.integers(0, 2))
    primary_last = max(ids, default=0)
    # The primary's own history closes each segment at its last record.
    segs = list(primary.segments)
    for i in range(len(segs) - 1):
        s = segs[i]
        last = max((n for n, k in ids.items() if k == s.key()), default=s.first_lsn - 1)
        segs[i] = Segment(s.epoch, s.generation, s.first_lsn, last)
    cut = draw(st.integers(1, primary_last)) if primary_last else 0
    replica_ids = {n: k for n, k in ids.items() if n <= cut}
    extra = draw(st.integers(0, 3)) if replica_ids else 0
    for _ in range(extra):
        # Records the primary lost (or a deposed primary wrote): same segment, LSNs beyond what
        # the primary has in it.
        key = replica_ids[max(replica_ids)]
        n = max(replica_ids) + 1
        if ids.get(n) == key:
            break
        replica_ids[n] = key
    if replica_ids and draw(st.integers(0, 4)) == 0:
        # A copy of some other history (another volume's primary, a restored image).
        replica_ids = {n: (1, 9999) for n in replica_ids}
    return Case(
        tuple(segs),
        primary_last,
        ids,
        replica_history(replica_ids),
        max(replica_ids, default=0),
        replica_ids,
    )


def replica_history(ids: dict[int, tuple[int, int]]) -> tuple[Segment, ...]:
    """The segments of the records a replica holds: each closed at the last record it holds
    (LSNs a primary skipped after a crash belong to no segment), the newest open."""
    segs: list[Segment] = []
    for n in sorted(ids):
        key = ids[n]
        if segs and segs[-1].key() == key:
            segs[-1] = Segment(key[0], key[1], segs[-1].first_lsn, n)
        else:
            segs.append(Segment(key[0], key[1], n, n))
    if segs:
        last = segs[-1]
        segs[-1] = Segment(last.epoch, last.generation, last.first_lsn)
    return tuple(segs)


def oracle_common(case: Case) -> int | None:
    """The highest LSN L such that every record the replica holds up to L is the primary's
    record at that LSN, and the primary holds nothing up to L the replica lacks."""
    if not case.replica_ids:
        return None
    common = None
    for n in range(1, case.replica_last + 1):
        if case.replica_ids.get(n) != case.primary_ids.get(n):
            break
        if n in case.replica_ids:
            common = n
    return common


#: Mostly consistent replicas (the cases with most branches), sometimes mid-resync or empty.
STATES = st.sampled_from(
    [ReplicaDataState.CONSISTENT] * 4 + [ReplicaDataState.RESYNCING] * 2 + [ReplicaDataState.EMPTY]
)


@given(
    case=histories(),
    oldest_back=st.integers(0, 12),
    dirty=st.booleans(),
    state=STATES,
    acked_back=st.integers(-1, 6),
)
@settings(max_examples=settings().max_examples * 8)
def test_generated_histories_get_the_cheapest_sound_plan(
    case: Case, oldest_back: int, dirty: bool, state: ReplicaDataState, acked_back: int
) -> None:
    oldest = max(1, case.primary_last + 1 - oldest_back)
    # What the replica acknowledged: usually at most what it holds; sometimes more (it lost
    # acknowledged data).
    acked = max(0, min(case.replica_last - acked_back, case.primary_last))
    d = choose_plan(
        facts(case.primary, case.primary_last, oldest=oldest, dirty=dirty, acked=acked),
        hello(case.replica, case.replica_last, state=state),
    )
    common = oracle_common(case)
    if state is ReplicaDataState.EMPTY or common is None or common < acked:
        assert d.choice is PlanChoice.FULL, (d, common)
        assert (d.start_lsn, d.reset_log, d.diverged_after) == (
            max(case.primary_last + 1, 1),
            True,
            None,
        )
        return
    resyncing = state is ReplicaDataState.RESYNCING
    diverged = common < case.replica_last
    assert d.diverged_after == (common if diverged else None), (d, common)
    if common + 1 >= oldest:
        assert d.start_lsn == common + 1
        assert d.reset_log == diverged
    else:
        assert (d.start_lsn, d.reset_log) == (oldest, True)
    resync = dirty or resyncing or diverged or common + 1 < oldest
    assert d.choice is (PlanChoice.DELTA if resync else PlanChoice.CATCH_UP), (d, common)
