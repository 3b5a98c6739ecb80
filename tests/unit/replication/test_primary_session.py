"""The primary's session core (``PrimarySession``) against real engine volumes on a FaultFS, with
a real replica session at the other end of simulated connections (frames encoded, decoded and
fenced by ``ReplicationConnection`` on both sides): the catch-up plan it picks and what it sends
for each — WAL catch-up, full rebuild (holes as holes), delta resync after the WAL was released
(by the byte bound, the time bound, and across a primary restart), divergence — and resuming a
resync after a cut."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from repl_model_support import (
    BLOCK,
    RID,
    SIZE,
    FaultReplicaStore,
    Pair,
    block_image,
    data_blocks,
    hole_blocks,
    make_pair,
    record_lsns,
    write,
)

from blockyard.engine import Role, Volume
from blockyard.engine.limits import RETENTION_MAX_S
from blockyard.replication import primary_session
from blockyard.replication.errors import LocalProtocolError
from blockyard.replication.messages import (
    Blocks,
    NeedBlocks,
    PlanKind,
    Progress,
    Records,
    ReplicaDataState,
)
from blockyard.replication.plan import PlanChoice


@pytest.fixture
def pair() -> Iterator[Pair]:
    yield make_pair()


# ---- full rebuild ---------------------------------------------------------------------------


def test_an_empty_replica_is_rebuilt_in_full_with_holes_sent_as_holes(pair: Pair) -> None:
    written = [0, 1, 2, 77, 200, 255]
    for i, b in enumerate(written):
        write(pair.primary, b, i + 1)
    pair.primary.write(3 * 8, bytes(BLOCK))  # written, but zeros: a hole too
    pair.primary.checkpoint()
    lk = pair.sync()
    session = lk.attempt.p_session  # type: ignore[union-attr]
    plan = pair.plan()
    assert plan.kind is PlanKind.FULL and plan.start_lsn == pair.primary.last_lsn + 1
    assert session.decision is not None and session.decision.choice is PlanChoice.FULL
    blocks = pair.to_replica(Blocks)
    assert sorted(data_blocks(blocks)) == written
    assert sorted(data_blocks(blocks) + hole_blocks(blocks)) == list(range(SIZE // BLOCK))
    assert session.resync_bytes == len(written) * BLOCK, "data bytes only, no hole bytes"
    assert pair.same_bytes()
    assert pair.owner.names() == ["behind", "up", "acked", "acked", "caught_up"]
    assert pair.store.data_state().data_state is ReplicaDataState.CONSISTENT
    bitmap = pair.primary.replica_bitmap(RID)
    assert bitmap.set_blocks == 0 and not bitmap.active
    # The replica now continues the primary's numbering and history.
    assert pair.replica.last_lsn == pair.primary.last_lsn
    assert pair.replica.history.last is not None
    assert pair.replica.history.last.key() == (pair.primary.epoch, pair.primary.generation)


def test_live_writes_during_a_rebuild_reach_the_replica(pair: Pair) -> None:
    for b in range(0, 40, 3):
        write(pair.primary, b, b + 1)
    lk = pair.connect()
    lk.deliver_to_replica()
    lk.deliver_to_primary()  # the plan is decided; the resync is on
    assert lk.up
    lk.pump()  # the one resync chunk, read now
    write(pair.primary, 3, 500)  # block 3 after its backfill was read
    write(pair.primary, 4, 501)  # a block that was a hole when read
    lk.run()
    assert pair.same_bytes()
    assert pair.replica.read(3 * 8, 8) == block_image(500, 3)


# ---- catch-up -------------------------------------------------------------------------------


def test_a_replica_that_missed_a_few_writes_catches_up_from_the_wal(pair: Pair) -> None:
    write(pair.primary, 1, 1)
    pair.sync()
    pair.lk.cut()
    before = pair.replica.last_lsn
    lsns = [write(pair.primary, b, 10 + b) for b in (1, 2, 3)]
    lsns.append(pair.primary.unmap(2 * 8, 8))
    pair.primary.checkpoint()  # applied to the data region, still held for the replica
    assert pair.primary.oldest_available_lsn() <= before + 1
    pair.sync()
    plan = pair.plan()
    assert (plan.kind, plan.start_lsn, plan.resync_id) == (PlanKind.CATCH_UP, before + 1, 0)
    assert record_lsns(pair.to_replica(Records)) == lsns
    assert pair.to_replica(Blocks) == []
    assert "behind" not in pair.owner.names()
    assert pair.owner.names()[-1] == "caught_up"
    assert pair.same_bytes()
    assert pair.replica.read(2 * 8, 8) == bytes(BLOCK)


def test_a_reconnect_resends_what_the_replica_may_not_hold_and_duplicates_are_harmless(
    pair: Pair,
) -> None:
    pair.sync()
    lk = pair.lk
    lsns = [write(pair.primary, b, b + 1) for b in range(5)]
    lk.pump()
    lk.deliver_to_replica()  # applied, never acknowledged
    assert pair.replica.last_lsn == lsns[-1]
    lk.cut()
    pair.sync()
    assert pair.plan().kind is PlanKind.CATCH_UP
    assert pair.plan().start_lsn == lsns[-1] + 1
    assert pair.same_bytes()


def test_caught_up_is_reported_once_the_replica_is_durable_up_to_the_live_stream(
    pair: Pair,
) -> None:
    write(pair.primary, 9, 9)
    pair.sync()
    pair.lk.cut()
    write(pair.primary, 0, 1)
    lk = pair.connect()
    lk.deliver_to_replica()
    lk.deliver_to_primary()
    assert lk.pump(), "the missed record"
    assert not lk.pump(), "nothing more: the live stream is reached"
    lk.deliver_to_replica()
    assert "caught_up" not in pair.owner.names()
    assert lk.replica_flush(unsolicited=True)
    lk.deliver_to_primary()
    assert pair.owner.names().count("caught_up") == 1
    write(pair.primary, 0, 2)
    lk.run()
    lk.replica_flush(unsolicited=True)
    lk.deliver_to_primary()
    assert pair.owner.names().count("caught_up") == 1, "reported once per connection"


def test_an_acknowledgement_short_of_the_live_stream_does_not_make_the_replica_in_sync(
    pair: Pair,
) -> None:
    write(pair.primary, 9, 9)
    pair.sync()
    pair.lk.cut()
    lsns = [write(pair.primary, b, b + 20) for b in range(5)]
    lk = pair.connect()
    lk.deliver_to_replica()
    lk.deliver_to_primary()
    lk.pump()
    assert not lk.pump()  # the live stream is reached at the newest LSN
    # The Plan only (the records are still in flight); then the replica reports what it has.
    lk.deliver_to_replica(len(lk.attempt.to_replica[0]))  # type: ignore[union-attr]
    assert pair.replica.last_lsn == lsns[0] - 1
    lk.attempt.flush_due = True  # type: ignore[union-attr]  # a keepalive-time flush
    assert lk.replica_flush()
    lk.deliver_to_primary()
    assert ("acked", (lsns[0] - 1, 0)) in pair.owner.events
    assert "caught_up" not in pair.owner.names()
    lk.run()
    assert pair.owner.names().count("caught_up") == 1


# ---- delta resync -----------------------------------------------------------------------------


def fill_past_the_byte_bound(vol: Volume, blocks: list[int], tag: int) -> None:
    """Writes well over half the WAL while the replica is away: the retention bound releases
    them into the replica's bitmap."""
    for i in range(3):
        for b in blocks:
            write(vol, b, tag + i)
        vol.checkpoint()


def test_delta_resync_after_the_wal_was_released_past_the_byte_bound(pair: Pair) -> None:
    write(pair.primary, 100, 1)
    pair.sync()
    pair.lk.cut()
    missed = list(range(10, 22))
    fill_past_the_byte_bound(pair.primary, missed, 50)
    bitmap = pair.primary.replica_bitmap(RID)
    marked = {b for first, n in bitmap.runs() for b in range(first, first + n)}
    assert marked and marked <= set(missed), "released records are in the bitmap"
    oldest = pair.primary.oldest_available_lsn()
    assert oldest > pair.replica.last_lsn + 1
    pair.sync()
    plan = pair.plan()
    assert plan.kind is PlanKind.DELTA
    assert (plan.start_lsn, plan.total_blocks) == (oldest, len(marked))
    assert set(data_blocks(pair.to_replica(Blocks))) == marked, "exactly the missed blocks"
    assert record_lsns(pair.to_replica(Records))[0] == oldest
    assert pair.same_bytes()
    assert bitmap.set_blocks == 0 and not bitmap.active
    assert pair.store.data_state().data_state is ReplicaDataState.CONSISTENT


def test_delta_resync_after_the_time_bound(pair: Pair) -> None:
    now = [1000.0]
    pair.primary._clock = lambda: now[0]
    write(pair.primary, 9, 9)
    pair.sync()
    pair.lk.cut()
    write(pair.primary, 7, 1)
    write(pair.primary, 8, 2)
    pair.primary.checkpoint()
    assert pair.primary.replica_bitmap(RID).set_blocks == 0, "within both bounds: kept"
    now[0] += RETENTION_MAX_S + 1
    pair.primary.checkpoint()
    assert sorted(
        b for first, n in pair.primary.replica_bitmap(RID).runs() for b in range(first, first + n)
    ) == [7, 8]
    pair.sync()
    assert pair.plan().kind is PlanKind.DELTA
    assert sorted(data_blocks(pair.to_replica(Blocks))) == [7, 8]
    assert pair.same_bytes()


def test_delta_resync_after_a_primary_restart_in_between(pair: Pair) -> None:
    write(pair.primary, 9, 9)
    pair.sync()
    pair.lk.cut()
    missed = list(range(30, 40))
    fill_past_the_byte_bound(pair.primary, missed, 70)
    write(pair.primary, 41, 99)  # still in the WAL, not yet flushed
    pair.primary.flush()
    pair.restart_primary(power_loss=True)
    pair.sync()
    assert pair.plan().kind is PlanKind.DELTA
    assert set(data_blocks(pair.to_replica(Blocks))) <= {*missed, 41}
    assert pair.same_bytes()


# ---- divergence --------------------------------------------------------------------------------


def test_records_the_primary_lost_in_a_power_loss_are_replaced_on_the_replica(pair: Pair) -> None:
    for b in range(4):
        write(pair.primary, b, b + 1)
    pair.primary.flush()
    pair.sync()
    durable = pair.primary.last_lsn
    # Shipped and applied on the replica, never flushed on the primary: lost there.
    write(pair.primary, 1, 91)
    write(pair.primary, 9, 92)
    pair.lk.pump()
    pair.lk.deliver_to_replica()
    pair.lk.replica_flush(unsolicited=True)
    assert pair.replica.durable_lsn == durable + 2
    pair.restart_primary(power_loss=True)
    assert pair.primary.last_lsn == durable
    assert pair.primary.read(8, 8) == block_image(2, 1)
    write(pair.primary, 20, 93)  # the new incarnation goes on
    pair.sync()
    plan = pair.plan()
    assert plan.kind is PlanKind.DELTA and plan.diverged_after_lsn == durable
    (need,) = pair.to_primary(NeedBlocks)
    assert need.final
    assert sorted((e.block, e.block_count) for e in need.extents) == [(1, 1), (9, 1)]
    assert pair.same_bytes()
    assert pair.replica.read(9 * 8, 8) == bytes(BLOCK)


def test_a_deposed_primary_rejoins_as_a_replica_of_its_successor() -> None:
    """A (epoch 1) ships to B; B is promoted at epoch 2 while A still wrote records B never got;
    A comes back as B's replica: its extra records diverge and are replaced."""
    old = make_pair()
    for b in range(3):
        write(old.primary, b, b + 1)
    old.sync()
    old.lk.cut()
    write(old.primary, 1, 81)  # A's writes that B never got
    write(old.primary, 50, 82)
    old.primary.flush()
    a, b_vol = old.primary, old.replica
    # Failover: B is promoted at epoch 2 and writes; A is told it is a replica at epoch 2.
    b_vol.set_role(Role.PRIMARY, epoch=2)
    write(b_vol, 2, 83)
    write(b_vol, 60, 84)
    a.untrack_replica(RID)
    a.set_role(Role.REPLICA, epoch=2)
    new = Pair(old.fs_r, old.fs_p, b_vol, a, FaultReplicaStore(a, old.fs_p))
    new.sync()
    plan = new.plan()
    assert plan.kind is PlanKind.DELTA
    assert plan.diverged_after_lsn == old.replica.history.segments[-2].last_lsn
    assert new.same_bytes()
    assert a.read(50 * 8, 8) == bytes(BLOCK), "A's own write after the failover is undone"
    assert a.history.last is not None and a.history.last.epoch == 2


# ---- resumable resync -------------------------------------------------------------------------


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(primary_session, "RESYNC_CHUNK_BLOCKS", 16)
    return 16


def start_rebuild(pair: Pair, chunks: int) -> int:
    """Connect, and apply and make durable ``chunks`` resync chunks. Returns the cursor."""
    lk = pair.connect()
    lk.deliver_to_replica()
    lk.deliver_to_primary()
    assert lk.up
    for _ in range(chunks):
        lk.pump()
    lk.deliver_to_replica()
    assert lk.replica_flush()
    lk.deliver_to_primary()
    (progress,) = pair.to_primary(Progress)
    return progress.cursor


def test_a_resync_cut_midway_resumes_with_the_remaining_blocks_only(
    pair: Pair, small_chunks: int
) -> None:
    for b in range(0, 256, 5):
        write(pair.primary, b, b + 1)
    cursor = start_rebuild(pair, 4)
    assert cursor == 4 * small_chunks
    session = pair.lk.attempt.p_session  # type: ignore[union-attr]
    assert session.resync_done_blocks == cursor
    bitmap = pair.primary.replica_bitmap(RID)
    assert bitmap.set_blocks == 256 - cursor, "progress clears bits durably"
    pair.lk.cut()
    assert pair.store.data_state().data_state is ReplicaDataState.RESYNCING
    pair.sync()
    plan = pair.plan()
    assert plan.kind is PlanKind.DELTA and plan.total_blocks == 256 - cursor
    sent = data_blocks(pair.to_replica(Blocks)) + hole_blocks(pair.to_replica(Blocks))
    assert min(sent) == cursor, "nothing below the durable progress mark is sent again"
    assert pair.same_bytes()
    assert pair.store.data_state().data_state is ReplicaDataState.CONSISTENT


def test_a_block_marked_again_before_its_chunk_was_confirmed_is_counted_once(
    pair: Pair, small_chunks: int
) -> None:
    """The resync report reaches its total: a block of the pass that a live write marks again
    before the replica confirmed its chunk is sent by a second pass, and counted once in the
    total (it was counted twice, leaving done short of the total once in sync)."""
    now = [1000.0]
    pair.primary._clock = lambda: now[0]
    for b in range(0, 256, 5):
        write(pair.primary, b, b + 1)
    cursor = start_rebuild(pair, 2)
    assert cursor == 2 * small_chunks
    session = pair.lk.attempt.p_session  # type: ignore[union-attr]
    total = session.resync_total_blocks
    write(pair.primary, 200, 999)  # in the pass, past the cursor: shipped live, unacknowledged
    pair.lk.pump()
    pair.primary.checkpoint()
    now[0] += RETENTION_MAX_S + 1
    pair.primary.checkpoint()  # released into the bitmap by the time bound: marked again
    pair.lk.run()
    assert pair.lk.connected and not pair.lk.errors, pair.lk.errors
    assert "caught_up" in pair.owner.names()
    assert session.resync_done_blocks == session.resync_total_blocks
    assert session.resync_total_blocks in (total, total + 1)  # block 200 once, at most
    assert pair.same_bytes()


@pytest.mark.parametrize("side", ["primary", "replica"])
def test_a_rebuild_resumes_after_either_side_loses_power(
    pair: Pair, small_chunks: int, side: str
) -> None:
    for b in range(0, 256, 3):
        write(pair.primary, b, b + 1)
    pair.primary.flush()
    cursor = start_rebuild(pair, 3)
    if side == "primary":
        pair.restart_primary(power_loss=True)
    else:
        pair.restart_replica(power_loss=True)
    pair.sync()
    plan = pair.plan()
    assert plan.kind is PlanKind.DELTA
    assert plan.total_blocks == 256 - cursor
    assert pair.same_bytes()
    del small_chunks


# ---- the WAL bound holds with an inline flusher -------------------------------------------------


def test_a_lagging_replica_never_makes_the_wal_overrun_without_a_background_flusher(
    pair: Pair,
) -> None:
    """``background_flusher=False`` checkpoints inline when the WAL is full; retention for a
    replica that does not acknowledge must still be bounded (its misses go to the bitmap), or
    the ring is written over records it still counts as held."""
    pair.sync()
    pair.lk.cut()
    wal = pair.primary.wal_size_bytes
    for i in range(40):  # about three WALs' worth, never acknowledged
        write(pair.primary, i % 20, i + 1)
        assert pair.primary._used <= wal, f"after write {i}: {pair.primary._used} > {wal}"
    assert pair.primary.replica_bitmap(RID).set_blocks > 0


def test_blocks_marked_again_during_a_resync_are_sent_within_the_protocol(pair: Pair) -> None:
    """A record shipped live during a delta resync ages past the retention bound before the
    replica acknowledges it: its block is marked in the bitmap again. The resync must cover it
    without sending Blocks after its ResyncDone (a protocol error that ends the session)."""
    now = [1000.0]
    pair.primary._clock = lambda: now[0]
    write(pair.primary, 0, 1)
    pair.sync()
    pair.lk.cut()
    write(pair.primary, 1, 2)
    pair.primary.checkpoint()
    now[0] += RETENTION_MAX_S + 1
    pair.primary.checkpoint()
    lk = pair.connect()
    lk.deliver_to_replica()
    lk.deliver_to_primary()
    lk.pump()  # the one resync chunk
    write(pair.primary, 5, 3)  # shipped live, not yet acknowledged...
    lk.pump()
    pair.primary.checkpoint()
    now[0] += RETENTION_MAX_S + 1
    pair.primary.checkpoint()  # ...and released into the bitmap by the time bound
    assert pair.primary.replica_bitmap(RID).set_blocks == 2
    lk.run()
    assert not [e for _side, e in lk.errors if isinstance(e, LocalProtocolError)], lk.errors
    if not lk.connected:  # ending the session to resync on the next one is fine too
        lk.errors.clear()
        pair.sync()
    assert "caught_up" in pair.owner.names()
    assert pair.same_bytes()


def test_a_primary_whose_epoch_moves_mid_handshake_does_not_ship_the_new_epochs_data(
    pair: Pair,
) -> None:
    """The primary said Hello at epoch 1, then was given epoch 2 (a replica that was not told
    yet still answers the old Hello). Whatever it sends on that connection must not put data
    written at epoch 2 on a replica at epoch 1 — resync blocks carry no epoch, so the session
    must notice its primary moved on and end — nor leave the replica claiming a history the
    primary no longer has."""
    write(pair.primary, 7, 1)
    lk = pair.connect()  # Hello at epoch 1 on its way
    pair.primary.set_role(Role.PRIMARY, epoch=2)
    write(pair.primary, 8, 2)  # written at epoch 2
    lk.run()
    assert pair.replica.epoch == 1
    assert block_of(pair.replica, 8) == bytes(BLOCK), "epoch-2 data on an epoch-1 replica"
    last = pair.replica.last_lsn
    if last and pair.store.data_state().data_state is ReplicaDataState.CONSISTENT:
        mine = pair.replica.history.segment_for(last)
        theirs = pair.primary.history.segment_for(last)
        assert mine is not None and theirs is not None, pair.replica.history
        assert mine.key() == theirs.key(), (pair.replica.history, pair.primary.history)


def block_of(vol: Volume, b: int) -> bytes:
    return vol.read(b * 8, 8)
