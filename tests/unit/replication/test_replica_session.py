"""The replica's session core (``ReplicaSession``) on a real engine volume (FaultFS): the Hello
(epoch adopted and persisted, size checked), the Plan (resync state persisted before any block,
diverged blocks reported, log reset), live records winning over older backfill, durability of
what it reports (Ack, Progress, end of resync, also across a power loss), and its history after
streaming across a primary's crash."""

from __future__ import annotations

import itertools
import uuid

import pytest
from repl_model_support import (
    BLOCK,
    MIB,
    RID,
    ROOT,
    SIZE,
    WAL,
    FaultReplicaStore,
    Link,
    Recorder,
    block_image,
    create_replica,
    make_pair,
    new_fs,
    power_cycled,
    read_all,
    store_on,
    write,
)

from blockyard.engine import Role, Volume
from blockyard.engine.limits import RETENTION_MAX_S
from blockyard.engine.superblock import WAL_OFFSET
from blockyard.engine.wal import HEADER_BYTES
from blockyard.errors import StaleEpochError
from blockyard.replication.errors import ErrorCode, LocalProtocolError
from blockyard.replication.messages import (
    NO_RECORD,
    Ack,
    BlockRun,
    BlockRunFlags,
    Blocks,
    Extent,
    Hello,
    HistorySegment,
    NeedBlocks,
    Plan,
    PlanKind,
    Progress,
    RecordId,
    RecordKind,
    Records,
    ReplicaDataState,
    ReplRecord,
    ResyncDone,
)
from blockyard.replication.replica_session import ReplicaSession
from blockyard.replication.wire import OPEN_LSN
from blockyard.testing.faultfs import FaultFS

VOL = uuid.UUID(int=0xBEEF)
GEN = 4242


def replica(fs: FaultFS | None = None, *, epoch: int = 1) -> tuple[FaultFS, FaultReplicaStore]:
    fs = fs or new_fs()
    vol = create_replica(fs, "v", SIZE, VOL, wal_bytes=WAL, epoch=epoch)
    return fs, FaultReplicaStore(vol, fs)


def hello(*, epoch: int = 1, size: int = SIZE, last: int = 0) -> Hello:
    return Hello(
        protocol_version=1,
        volume_uuid=VOL,
        volume_name="v",
        size_bytes=size,
        primary_id="p:1",
        head=RecordId(last, epoch, GEN),
        durable_lsn=last,
        history=(HistorySegment(epoch, GEN, 1, OPEN_LSN),),
    )


def full_plan(start: int, resync_id: int = 9) -> Plan:
    return Plan(PlanKind.FULL, start, resync_id, SIZE // BLOCK, 0, OPEN_LSN)


def rec(lsn: int, block: int, tag: int, *, epoch: int = 1) -> ReplRecord:
    return ReplRecord(lsn, epoch, GEN, RecordKind.WRITE, block, 1, block_image(tag, block))


def blocks(resync_id: int, cursor: int, *runs: tuple[int, list[int] | None]) -> Blocks:
    """Runs as (first block, tags per block or None for a hole of one block)."""
    out = []
    for first, tags in runs:
        if tags is None:
            out.append(BlockRun(first, 1, BlockRunFlags.HOLE))
        else:
            data = b"".join(block_image(t, first + i) for i, t in enumerate(tags))
            out.append(BlockRun(first, len(tags), BlockRunFlags.DATA, data))
    return Blocks(resync_id, cursor, 0, tuple(out))


def block(vol: Volume, b: int) -> bytes:
    return vol.read(b * 8, 8)


# ---- handshake ------------------------------------------------------------------------------


def test_a_primary_at_the_replicas_epoch_is_answered() -> None:
    _, store = replica(epoch=2)
    reply = ReplicaSession(store).hello(hello(epoch=2))
    assert reply.last == NO_RECORD and reply.volume_uuid == VOL
    assert reply.state in (ReplicaDataState.EMPTY, ReplicaDataState.CONSISTENT)


def test_a_primary_claiming_a_newer_epoch_than_assigned_is_refused() -> None:
    """Epochs are assigned to the replica before the primary: a Hello from a newer epoch
    than the replica was told is not trusted, and adopts nothing."""
    fs, store = replica(epoch=1)
    with pytest.raises(LocalProtocolError) as info:
        ReplicaSession(store).hello(hello(epoch=3))
    assert info.value.code is ErrorCode.UNEXPECTED
    assert store.epoch == 1
    assert store_on(power_cycled(fs)).open("v").epoch == 1


def test_a_primary_smaller_than_the_replica_is_refused_and_a_larger_one_grows_it() -> None:
    _, store = replica()
    with pytest.raises(LocalProtocolError) as info:
        ReplicaSession(store).hello(hello(size=SIZE // 2))
    assert info.value.code is ErrorCode.SIZE_MISMATCH
    assert store.size_bytes == SIZE
    reply = ReplicaSession(store).hello(hello(size=2 * SIZE))
    assert store.size_bytes == reply.size_bytes == 2 * SIZE


def test_a_plan_before_the_hello_is_refused() -> None:
    _, store = replica()
    with pytest.raises(LocalProtocolError) as info:
        ReplicaSession(store).plan(full_plan(1))
    assert info.value.code is ErrorCode.UNEXPECTED


# ---- resync ---------------------------------------------------------------------------------


def test_a_resync_is_persisted_before_any_block_and_ends_only_once_durable() -> None:
    fs, store = replica()
    s = ReplicaSession(store)
    s.hello(hello())
    assert s.plan(full_plan(1, resync_id=77)) == []
    state = store.data_state()
    assert (state.data_state, state.resync_id) == (ReplicaDataState.RESYNCING, 77)
    s.blocks(blocks(77, 2, (0, [1]), (1, None)))
    s.records(Records((rec(1, 5, 2),)))
    s.resync_done(ResyncDone(77, 1))
    assert store.data_state().data_state is ReplicaDataState.RESYNCING, "not durable yet"
    result = s.flush(0)
    assert result.durable_lsn == 1
    assert Progress(77, 2) in result.messages
    assert result.messages[-1] == Ack(0, 1, 1)
    assert store.data_state().data_state is ReplicaDataState.CONSISTENT
    # Durable: what the replica reported survives a power loss.
    again = store_on(power_cycled(fs)).open("v")
    assert block(again, 0) == block_image(1, 0)
    assert block(again, 5) == block_image(2, 5)


def test_the_end_of_a_resync_waits_for_its_final_lsn() -> None:
    _, store = replica()
    s = ReplicaSession(store)
    s.hello(hello())
    s.plan(full_plan(1))
    s.resync_done(ResyncDone(9, 2))  # the primary's last LSN when it finished: 2
    s.records(Records((rec(1, 0, 1),)))
    s.flush(0)
    assert store.data_state().data_state is ReplicaDataState.RESYNCING
    s.records(Records((rec(2, 0, 2),)))
    s.flush(0)
    assert store.data_state().data_state is ReplicaDataState.CONSISTENT


def test_resync_blocks_reported_durable_survive_a_power_loss() -> None:
    """Progress tells the primary to clear those blocks from the bitmap for good: they must
    be on stable storage when it is sent, even when no record came with them."""
    fs, store = replica()
    s = ReplicaSession(store)
    s.hello(hello())
    s.plan(full_plan(1, resync_id=5))
    s.blocks(blocks(5, 3, (0, [10, 11, 12])))
    result = s.flush(0)
    assert Progress(5, 3) in result.messages
    again = store_on(power_cycled(fs)).open("v")
    assert [block(again, b) for b in range(3)] == [
        block_image(t, b) for b, t in enumerate((10, 11, 12))
    ]


def test_a_live_record_wins_over_older_backfill_of_its_block() -> None:
    _, store = replica()
    s = ReplicaSession(store)
    s.hello(hello())
    s.plan(full_plan(1))
    s.records(Records((rec(1, 4, 40),)))  # live write to block 4
    # Backfill read before that write: blocks 3..5, block 4 holding its older image.
    s.blocks(blocks(9, 6, (3, [30, 31, 32])))
    vol = store.volume
    assert block(vol, 4) == block_image(40, 4), "the live record wins"
    assert block(vol, 3) == block_image(30, 3) and block(vol, 5) == block_image(32, 5)
    # Also once the record was checkpointed out of the WAL, and for holes.
    vol.checkpoint()
    s.records(Records((ReplRecord(2, 1, GEN, RecordKind.ZERO, 6, 1),)))
    vol.checkpoint()
    s.blocks(blocks(9, 8, (4, [99]), (6, [98])))
    assert block(vol, 4) == block_image(40, 4)
    assert block(vol, 6) == bytes(BLOCK)


def test_backfill_after_the_resync_ended_is_not_filtered_any_more() -> None:
    """The touched set is the resync's; after the end it is dropped (a new resync starts a
    new one)."""
    _, store = replica()
    s = ReplicaSession(store)
    s.hello(hello())
    s.plan(full_plan(1))
    s.records(Records((rec(1, 2, 1),)))
    s.resync_done(ResyncDone(9, 1))
    s.flush(0)
    with pytest.raises(LocalProtocolError):
        s.blocks(blocks(9, 3, (2, [5])))
    assert block(store.volume, 2) == block_image(1, 2)


def test_blocks_outside_a_resync_are_refused() -> None:
    _, store = replica()
    s = ReplicaSession(store)
    s.hello(hello())
    s.plan(Plan(PlanKind.CATCH_UP, 1, 0, 0, 0, OPEN_LSN))
    with pytest.raises(LocalProtocolError) as info:
        s.blocks(blocks(9, 1, (0, [1])))
    assert info.value.code is ErrorCode.UNEXPECTED


# ---- divergence and log resets ------------------------------------------------------------


def test_diverged_records_are_reported_as_blocks_to_resend() -> None:
    _, store = replica()
    s = ReplicaSession(store)
    s.hello(hello())
    s.plan(Plan(PlanKind.CATCH_UP, 1, 0, 0, 0, OPEN_LSN))
    s.records(Records(tuple(rec(i, b, i) for i, b in ((1, 0), (2, 7), (3, 8), (4, 20)))))
    s.flush(0)
    s2 = ReplicaSession(store)
    s2.hello(hello(last=2))
    out = s2.plan(Plan(PlanKind.DELTA, 3, 11, 0, 0, 2))
    assert out == [NeedBlocks(True, (Extent(8, 1), Extent(20, 1)))]
    assert store.last_lsn == 2, "the log continues where the primary's stream starts"
    assert store.data_state().data_state is ReplicaDataState.RESYNCING


def test_diverged_records_no_longer_in_the_wal_mean_every_block() -> None:
    _, store = replica()
    s = ReplicaSession(store)
    s.hello(hello())
    s.plan(Plan(PlanKind.CATCH_UP, 1, 0, 0, 0, OPEN_LSN))
    for i in range(1, 40):  # several times the WAL: the early ones are gone from it
        s.records(Records((rec(i, i % 10, i),)))
    s.flush(0)
    s2 = ReplicaSession(store)
    s2.hello(hello(last=2))
    out = s2.plan(Plan(PlanKind.DELTA, 3, 11, 0, 0, 2))
    assert out == [NeedBlocks(True, (Extent(0, SIZE // BLOCK),))]


def test_a_reset_log_is_not_replayed_after_a_restart() -> None:
    fs, store = replica()
    s = ReplicaSession(store)
    s.hello(hello())
    s.plan(Plan(PlanKind.CATCH_UP, 1, 0, 0, 0, OPEN_LSN))
    s.records(Records(tuple(rec(i, i, i) for i in range(1, 6))))
    s.flush(0)
    s2 = ReplicaSession(store)
    s2.hello(hello(last=3))
    s2.plan(Plan(PlanKind.DELTA, 4, 12, 0, 0, 3))
    s2.records(Records((rec(4, 9, 44),)))
    s2.flush(0)
    vol = store_on(power_cycled(fs)).open("v")
    assert vol.last_lsn == 4
    assert block(vol, 9) == block_image(44, 9)
    # Record 5 of the old log (block 5) was applied before the reset: the resync's job to
    # replace it, not the log's to replay or drop it.
    assert block(vol, 4) == block_image(4, 4)


def test_a_record_from_a_newer_epoch_is_refused() -> None:
    _, store = replica()
    s = ReplicaSession(store)
    s.hello(hello(epoch=1))
    s.plan(Plan(PlanKind.CATCH_UP, 1, 0, 0, 0, OPEN_LSN))
    with pytest.raises(StaleEpochError):
        s.records(Records((rec(1, 0, 1, epoch=2),)))
    assert store.last_lsn == 0
    assert store.epoch_violations == []


def test_a_barrier_is_answered_with_its_id_and_what_is_durable() -> None:
    _, store = replica()
    s = ReplicaSession(store)
    s.hello(hello())
    s.plan(Plan(PlanKind.CATCH_UP, 1, 0, 0, 0, OPEN_LSN))
    s.records(Records((rec(1, 0, 1), rec(2, 1, 2))))
    result = s.flush(17)
    assert result.durable_lsn == 2
    assert result.messages == (Ack(17, 2, 2),)
    assert store.durable_lsn == 2


# ---- over the wire --------------------------------------------------------------------------


def test_a_stale_primary_is_refused_at_the_hello() -> None:
    pair = make_pair()
    pair.replica.set_epoch(3)  # the replica heard of a newer primary
    lk = pair.connect()
    lk.deliver_to_replica()
    assert not lk.connected
    ((side, exc),) = lk.errors
    assert side == "replica"
    assert getattr(exc, "code", None) is ErrorCode.STALE_EPOCH, exc
    assert pair.replica.epoch == 3


def tear_last_record(fs: FaultFS, vol: Volume) -> FaultFS:
    """A power loss in which the newest record's header reached the disk but its payload did
    not: recovery stops before it, and numbers the next incarnation past it."""
    pos = vol._log[-1][8]
    path = f"{ROOT}/v/volume.blk"
    image = bytearray(fs.durable_image()[path])
    image[WAL_OFFSET + pos + HEADER_BYTES + 100] ^= 0xFF
    out = power_cycled(fs)
    out.restore(path, bytes(image))
    return out


def test_a_replica_that_streamed_across_a_primary_crash_catches_up_afterwards() -> None:
    """The primary lost a torn record and went on past its LSN in a new generation. The
    replica (which never got the torn record) followed; next time it connects it shares the
    primary's history in full: a WAL catch-up, not a divergence."""
    pair = make_pair()
    write(pair.primary, 0, 1)
    pair.sync()
    write(pair.primary, 1, 2)  # never shipped; torn by the crash
    pair.primary.flush()
    pair.lk.cut()
    torn_lsn = pair.primary.last_lsn
    pair.fs_p = tear_last_record(pair.fs_p, pair.primary)
    pair.primary = store_on(pair.fs_p).open("v")
    pair.primary.track_replica(RID)
    segs = pair.primary.history.segments
    assert segs[-2].last_lsn == torn_lsn - 1, "the torn record is not in the history"
    assert block(pair.primary, 1) == bytes(BLOCK)
    lsn = write(pair.primary, 2, 3)
    assert lsn > torn_lsn, "numbered past the torn record"
    pair.sync()
    assert pair.plan().kind is PlanKind.CATCH_UP
    assert pair.replica.last_lsn == lsn
    write(pair.primary, 3, 4)
    pair.lk.cut()
    pair.sync()
    plan = pair.plan()
    assert (plan.kind, plan.diverged_after_lsn) == (PlanKind.CATCH_UP, OPEN_LSN), plan
    assert read_all(pair.primary) == read_all(pair.replica)


def test_records_resent_after_a_reconnect_are_applied_once() -> None:
    pair = make_pair()
    write(pair.primary, 0, 1)
    pair.sync()
    lk = pair.lk
    lsns = [write(pair.primary, b, 10 + b) for b in range(3)]
    lk.pump()
    lk.deliver_to_replica()
    # The same LSN again (as a resend carries it), with other bytes: skipped, not applied.
    s = lk.attempt.r_session  # type: ignore[union-attr]
    held = pair.replica.last_lsn
    assert s.records(Records((rec(lsns[0], 0, 99),))) == held
    assert block(pair.replica, 0) == block_image(10, 0)


def test_a_replica_that_lost_records_of_several_segments_in_a_power_loss_recovers() -> None:
    """A replica learns a history segment durably before its records are durable. After a
    power loss took records of two segments (the primary had restarted in between), it must
    still catch up, keep a valid history, and open again."""
    pair = make_pair()
    for b in range(3):
        write(pair.primary, b, b + 1)
    pair.sync()
    pair.restart_primary(power_loss=False)  # segment B from LSN 4
    write(pair.primary, 3, 4)
    write(pair.primary, 4, 5)
    pair.restart_primary(power_loss=False)  # segment C from LSN 6
    write(pair.primary, 5, 6)
    lk = pair.connect()
    lk.deliver_to_replica()
    lk.deliver_to_primary()
    lk.pump()
    lk.deliver_to_replica()  # applied (4, 5, 6: two new segments), never flushed
    assert pair.replica.last_lsn == 6 and pair.replica.durable_lsn == 3
    pair.restart_replica(power_loss=True)
    assert pair.replica.last_lsn == 3
    pair.sync()
    assert read_all(pair.primary) == read_all(pair.replica)
    firsts = [s.first_lsn for s in pair.replica.history.segments]
    assert firsts == sorted(set(firsts)), pair.replica.history
    pair.restart_replica(power_loss=False)  # opens again
    assert pair.replica.last_lsn == pair.primary.last_lsn


def valid_history(vol: Volume) -> bool:
    segs = vol.history.segments
    return all(a.key() != b.key() and a.last_lsn < b.first_lsn for a, b in itertools.pairwise(segs))


def test_a_delta_that_starts_inside_an_older_segment_keeps_the_history_valid() -> None:
    """A delta resync whose stream starts at a record of the primary's older segment (the WAL
    still holds its tail, the primary has since moved to a new epoch): the replica takes the
    primary's history at the reset and must not end up with the same segment twice, or it can
    never answer a Hello again."""
    pair = make_pair()
    now = [1000.0]
    pair.primary._clock = lambda: now[0]
    write(pair.primary, 0, 1)
    pair.sync()
    pair.lk.cut()
    write(pair.primary, 1, 2)
    pair.primary.checkpoint()
    now[0] += RETENTION_MAX_S + 1
    pair.primary.unmap(0, 8)  # newer than the time bound: still held
    pair.primary.checkpoint()
    oldest = pair.primary.oldest_available_lsn()
    assert pair.replica.last_lsn + 1 < oldest <= pair.primary.last_lsn
    pair.replica.set_role(Role.REPLICA, epoch=2)  # SetReplication: replica first,
    pair.primary.set_role(Role.PRIMARY, epoch=2)  # then the primary
    pair.sync()
    assert pair.plan().kind is PlanKind.DELTA and pair.plan().start_lsn == oldest
    assert valid_history(pair.replica), pair.replica.history
    write(pair.primary, 2, 3)
    pair.lk.cut()
    pair.sync()  # a later connection still works
    assert read_all(pair.primary) == read_all(pair.replica)


def test_a_full_rebuild_always_takes_the_primarys_history() -> None:
    """A full rebuild whose stream happens to start right after the replica's last LSN must
    still replace the replica's history with the primary's: otherwise the rebuilt copy keeps
    claiming records of a history the primary does not have, and every later connection is
    another full rebuild."""
    pair = make_pair()
    pair.primary.unmap(0, 8)  # LSN 1, never flushed
    pair.sync()
    assert pair.replica.last_lsn == 1
    pair.restart_primary(power_loss=True)  # LSN 1 is lost; the next incarnation reuses it
    write(pair.primary, 0, 7)
    assert pair.primary.last_lsn == 1
    pair.sync()
    assert pair.plan().kind is PlanKind.FULL and pair.plan().start_lsn == 2
    assert read_all(pair.primary) == read_all(pair.replica)
    assert pair.replica.history.last is not None
    assert pair.replica.history.last.key() == (pair.primary.epoch, pair.primary.generation)
    pair.lk.cut()
    pair.sync()
    assert pair.plan().kind is PlanKind.CATCH_UP, "nothing changed since the rebuild"


def test_a_diverged_replica_takes_the_primarys_history_even_when_the_stream_follows_on() -> None:
    """The replica holds LSN 4 of a segment the primary lost in a power loss; the primary's
    LSN 4 (its next incarnation) was released from its WAL, so the delta's stream starts at
    5, right after the replica's last LSN. The replica must still drop its diverged history:
    otherwise it keeps claiming the lost record, and every later connection diverges again
    (and, once it acknowledged past 3, is rebuilt in full)."""
    pair = make_pair()
    now = [1000.0]
    for b in range(3):
        write(pair.primary, b + 10, b + 1)
    pair.primary.flush()
    pair.sync()
    pair.restart_primary(power_loss=False)
    pair.primary._clock = lambda: now[0]
    write(pair.primary, 0, 4)  # LSN 4: shipped, durable on the replica, never flushed here
    pair.sync()
    assert pair.replica.durable_lsn == 4
    pair.restart_primary(power_loss=True)
    pair.primary._clock = lambda: now[0]
    assert write(pair.primary, 1, 5) == 4  # the new incarnation's LSN 4
    pair.primary.checkpoint()
    now[0] += RETENTION_MAX_S + 1
    pair.primary.checkpoint()  # released into the replica's bitmap
    write(pair.primary, 2, 6)
    assert pair.primary.oldest_available_lsn() == 5
    pair.sync()
    plan = pair.plan()
    assert (plan.kind, plan.start_lsn, plan.diverged_after_lsn) == (PlanKind.DELTA, 5, 3)
    assert read_all(pair.primary) == read_all(pair.replica)
    p4 = pair.primary.history.segment_for(4)
    r4 = pair.replica.history.segment_for(4)
    assert p4 is not None and r4 is not None and r4.key() == p4.key(), pair.replica.history
    pair.lk.cut()
    pair.sync()
    assert pair.plan().kind is PlanKind.CATCH_UP


def test_a_large_unmap_reads_as_zeros_on_the_replica() -> None:
    """Unmaps of more than WAL_UNMAP_MAX_BLOCKS blocks are range records: the primary punches
    the data region when it logs one. The replica must apply it too — at once (a promoted
    replica must read zeros, LBPRZ), and for good once its checkpoint passes the record."""
    pair = make_pair(size=2 * MIB)
    for b in (5, 300, 399, 450):
        write(pair.primary, b, b)
    pair.sync()
    pair.primary.unmap(0, 400 * 8)  # blocks 0..399: a range record
    pair.sync()
    assert read_all(pair.primary) == read_all(pair.replica)
    for i in range(6):
        write(pair.primary, 450 + i, i + 1)
    pair.sync()
    pair.replica.checkpoint()
    pair.restart_replica(power_loss=False)
    assert read_all(pair.primary) == read_all(pair.replica)
    assert block(pair.replica, 300) == bytes(BLOCK)


def test_a_laggard_behind_a_promoted_copy_is_rebuilt_in_full() -> None:
    """RF3: replica L is disconnected while the primary P writes; P keeps L's misses in its
    bitmap, then dies. The in-sync replica Y is promoted. Y applied (and released) those
    records as a replica, marking nothing: its new bitmap for L cannot say what L missed, so
    L must be rebuilt in full, not handed an empty delta and called in sync."""
    pair = make_pair()  # P -> Y
    fs_l = new_fs()
    laggard = create_replica(fs_l, "v", SIZE, pair.primary.uuid, wal_bytes=WAL)
    l_store = FaultReplicaStore(laggard, fs_l)
    l_id = "replica-2:7500"
    pair.primary.track_replica(l_id)
    to_l = Link(l_id, lambda: pair.primary, lambda: l_store, Recorder())
    for b in range(4):
        write(pair.primary, b, b + 1)
    pair.sync()
    to_l.connect()
    to_l.run()
    assert to_l.errors == [] and read_all(laggard) == read_all(pair.primary)
    to_l.cut()
    for b in range(40):  # L misses these; Y gets them
        write(pair.primary, b, b + 100)
    pair.sync()
    pair.replica.checkpoint()  # applied and released on Y, marked nowhere
    pair.lk.cut()  # P dies
    promoted = pair.replica
    promoted.set_role(Role.PRIMARY, epoch=2)
    promoted.track_replica(l_id)
    laggard.set_role(Role.REPLICA, epoch=2)  # the master's new assignment
    write(promoted, 50, 7)
    to_l = Link(l_id, lambda: promoted, lambda: l_store, Recorder())
    to_l.connect()
    to_l.run()
    assert to_l.errors == [], to_l.errors
    assert read_all(laggard) == read_all(promoted)
