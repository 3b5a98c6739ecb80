"""The chaos consistency checker's core: legal histories hold, broken ones are caught by the
right check (1 = acknowledged durable write lost, 2 = torn/invented/misplaced data, 3 = a block
going back in time between two quiet reads)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockyard.chaos.model import (
    INITIAL,
    VIOLATIONS_KEPT,
    OpKind,
    VolumeModel,
)
from blockyard.chaos.payload import SECTOR_BYTES, ZERO_SECTOR, sector, sectors

VOL = 7
SIZE = 64


def _model(size: int = SIZE) -> VolumeModel:
    return VolumeModel(VOL, size)


def _write(
    m: VolumeModel, lba: int, count: int = 1, *, kind: OpKind = OpKind.WRITE, ok: bool = True
) -> int:
    wid = m.issue(kind, lba, count, writer=0)
    m.complete(wid, ok=ok)
    return wid


def _flush(m: VolumeModel, *, ok: bool = True) -> None:
    m.flush_end(m.flush_begin(), ok=ok)


def _read(m: VolumeModel, lba: int, data: bytes, at_s: float = 0.0) -> int:
    assert len(data) % SECTOR_BYTES == 0
    return m.read_end(m.read_begin(lba, len(data) // SECTOR_BYTES), data, at_s)


def _zeros(count: int = 1) -> bytes:
    return ZERO_SECTOR * count


def _same(lba: int, count: int, wid: int, volume: int = VOL) -> bytes:
    return sector(volume, lba, wid, same=True) * count


def _checks(m: VolumeModel) -> list[int]:
    return [v.check for v in m.violations]


def _clean(m: VolumeModel) -> None:
    assert m.violations == []
    assert m.counters.by_check == {}
    assert m.violation_count() == 0


# ---- legal histories ------------------------------------------------------------------------


def test_never_written_volume_reads_zeros() -> None:
    m = _model()
    assert _read(m, 0, _zeros(SIZE)) == 0
    _clean(m)
    assert m.counters.reads == 1
    assert m.counters.sectors_checked == SIZE


def test_read_of_completed_unflushed_write_holds() -> None:
    m = _model()
    wid = _write(m, 10, 4)
    assert _read(m, 10, sectors(VOL, 10, 4, wid)) == 0
    # not durable yet, so the old value (zeros) is also still legal — in a fault window
    m.fault_begin()
    assert _read(m, 10, _zeros(4)) == 0
    _clean(m)


def test_read_of_in_flight_write_may_return_old_new_or_a_mix() -> None:
    m = _model()
    old = _write(m, 0, 4)
    _flush(m)
    new = m.issue(OpKind.WRITE, 0, 4, writer=0)
    assert _read(m, 0, sectors(VOL, 0, 4, old)) == 0
    mixed = sectors(VOL, 0, 2, new) + sectors(VOL, 2, 2, old)
    m.fault_begin()  # so the step back to ``old`` below is not a check-3 question
    assert _read(m, 0, mixed) == 0
    assert _read(m, 0, sectors(VOL, 0, 4, new)) == 0
    m.complete(new, ok=True)
    _clean(m)


@pytest.mark.parametrize("landed", [False, True])
def test_after_failed_write_block_may_hold_old_or_new(landed: bool) -> None:
    m = _model()
    old = _write(m, 5, 2)
    _flush(m)
    bad = _write(m, 5, 2, ok=False)
    data = sectors(VOL, 5, 2, bad if landed else old)
    assert _read(m, 5, data) == 0
    # and a flush does not make the failed write durable: the old value stays legal
    _flush(m)
    m.fault_begin()
    assert _read(m, 5, sectors(VOL, 5, 2, old)) == 0
    assert _read(m, 5, sectors(VOL, 5, 2, bad)) == 0
    _clean(m)
    assert m.counters.writes_failed == 1
    assert m.counters.writes_ok == 1


def test_failed_write_may_have_landed_on_some_blocks_only() -> None:
    m = _model()
    old = _write(m, 0, 4)
    _flush(m)
    bad = _write(m, 0, 4, ok=False)
    torn = sectors(VOL, 0, 1, old) + sectors(VOL, 1, 2, bad) + sectors(VOL, 3, 1, old)
    assert _read(m, 0, torn) == 0
    _clean(m)


def test_crash_like_revert_in_fault_window_is_legal() -> None:
    m = _model()
    durable = _write(m, 20, 2)
    _flush(m)
    volatile = _write(m, 20, 2)
    assert _read(m, 20, sectors(VOL, 20, 2, volatile)) == 0
    m.fault_begin()
    # the primary holding the unflushed write died: the older, durable value comes back
    assert _read(m, 20, sectors(VOL, 20, 2, durable)) == 0
    m.fault_end()
    # after healing the revert is the new normal; it is not check 3 (a new fault generation)
    assert _read(m, 20, sectors(VOL, 20, 2, durable)) == 0
    assert _read(m, 20, sectors(VOL, 20, 2, durable)) == 0
    _clean(m)


def test_crash_revert_to_zeros_of_never_durable_write_is_legal() -> None:
    m = _model()
    wid = _write(m, 3)
    assert _read(m, 3, sectors(VOL, 3, 1, wid)) == 0
    m.fault_begin()
    assert _read(m, 3, _zeros()) == 0
    m.fault_end()
    assert _read(m, 3, _zeros()) == 0
    _clean(m)


@pytest.mark.parametrize("kind", [OpKind.UNMAP, OpKind.ZEROES])
def test_zeroing_op_allows_zeros_and_the_previous_value_until_flushed(kind: OpKind) -> None:
    m = _model()
    old = _write(m, 8, 4)
    _flush(m)
    zap = _write(m, 8, 4, kind=kind)
    assert _read(m, 8, _zeros(4)) == 0
    m.fault_begin()  # stepping back to ``old`` is only legal without a check-3 baseline
    assert _read(m, 8, sectors(VOL, 8, 4, old)) == 0
    _clean(m)
    m.fault_end()
    _flush(m)  # now the zeroing op is durable: ``old`` is an acknowledged-durable loss
    assert _read(m, 8, _zeros(4)) == 0
    _clean(m)
    assert _read(m, 8, sectors(VOL, 8, 4, old)) == 1
    assert _checks(m) == [1]
    assert f"write {zap} was acknowledged durable" in m.violations[0].message


def test_zeroing_op_mixed_with_old_value_blockwise_is_legal_before_flush() -> None:
    m = _model()
    old = _write(m, 0, 4)
    _flush(m)
    _write(m, 0, 4, kind=OpKind.UNMAP)
    data = _zeros(1) + sectors(VOL, 1, 1, old) + _zeros(1) + sectors(VOL, 3, 1, old)
    assert _read(m, 0, data) == 0
    _clean(m)


def test_write_same_first_lba_stamp_is_accepted_at_every_lba_of_the_range() -> None:
    m = _model()
    wid = _write(m, 30, 6, kind=OpKind.SAME)
    assert _read(m, 30, _same(30, 6, wid)) == 0
    for lba in range(30, 36):  # one block at a time, too
        assert _read(m, lba, _same(30, 1, wid)) == 0
    _clean(m)


def test_write_same_block_stamped_with_its_own_lba_is_misplaced() -> None:
    m = _model()
    wid = _write(m, 30, 6, kind=OpKind.SAME)
    # the Data-Out of WRITE SAME names the first LBA; a per-LBA stamp is not what was written
    assert _read(m, 31, sector(VOL, 31, wid, same=True)) == 1
    assert _checks(m) == [2]
    # nor is a normal (non-SAME) block of that write
    assert _read(m, 30, sectors(VOL, 30, 1, wid)) == 1
    assert _checks(m) == [2, 2]


def test_same_flag_on_a_normal_write_is_misplaced() -> None:
    m = _model()
    wid = _write(m, 0, 2)
    assert _read(m, 0, sector(VOL, 0, wid, same=True)) == 1
    assert _checks(m) == [2]


def test_fua_makes_a_write_durable_without_a_flush() -> None:
    m = _model()
    old = _write(m, 12)
    fua = _write(m, 12, kind=OpKind.FUA)
    assert m.counters.durable == 1
    assert _read(m, 12, sectors(VOL, 12, 1, fua)) == 0
    _clean(m)
    m.fault_begin()
    assert _read(m, 12, sectors(VOL, 12, 1, old)) == 1
    assert _read(m, 12, _zeros()) == 1
    assert _checks(m) == [1, 1]


def test_fua_on_other_blocks_does_not_flush_a_plain_write() -> None:
    m = _model()
    plain = _write(m, 0)
    _write(m, 1, kind=OpKind.FUA)
    m.fault_begin()
    assert _read(m, 0, _zeros()) == 0  # ``plain`` was never acknowledged durable
    assert _read(m, 0, sectors(VOL, 0, 1, plain)) == 0
    _clean(m)


def test_failed_fua_is_not_durable() -> None:
    m = _model()
    old = _write(m, 4)
    _flush(m)
    _write(m, 4, kind=OpKind.FUA, ok=False)
    m.fault_begin()
    assert _read(m, 4, sectors(VOL, 4, 1, old)) == 0
    _clean(m)
    assert m.counters.durable == 1


def test_flush_covers_only_writes_completed_before_flush_begin() -> None:
    m = _model()
    first = _write(m, 40)
    token = m.flush_begin()
    second = _write(m, 40)  # completes while the SYNCHRONIZE CACHE is outstanding
    m.flush_end(token, ok=True)
    m.fault_begin()
    # ``second`` is not durable: losing it (back to ``first``) is fine
    assert _read(m, 40, sectors(VOL, 40, 1, first)) == 0
    _clean(m)
    # but ``first`` is: losing it (back to zeros) is not
    assert _read(m, 40, _zeros()) == 1
    assert _checks(m) == [1]
    # a later flush covers ``second``
    _flush(m)
    assert _read(m, 40, sectors(VOL, 40, 1, first)) == 1
    assert _checks(m) == [1, 1]
    assert _read(m, 40, sectors(VOL, 40, 1, second)) == 0


def test_write_issued_before_flush_begin_but_completed_after_is_not_covered() -> None:
    m = _model()
    wid = m.issue(OpKind.WRITE, 2, 1, writer=0)
    token = m.flush_begin()
    m.complete(wid, ok=True)
    m.flush_end(token, ok=True)
    m.fault_begin()
    assert _read(m, 2, _zeros()) == 0
    _clean(m)


def test_concurrent_flushes_ending_out_of_order() -> None:
    m = _model()
    a = _write(m, 0)
    early = m.flush_begin()
    b = _write(m, 1)
    late = m.flush_begin()
    m.flush_end(late, ok=True)  # covers both
    m.flush_end(early, ok=True)  # nothing left to do
    m.fault_begin()
    assert _read(m, 0, _zeros()) == 1
    assert _read(m, 1, _zeros()) == 1
    assert _checks(m) == [1, 1]
    assert _read(m, 0, sectors(VOL, 0, 1, a) + sectors(VOL, 1, 1, b)) == 0
    assert m.counters.flushes_ok == 2
    assert m.counters.durable == 2


def test_flush_of_an_older_write_after_a_newer_fua_keeps_the_fua_value_durable() -> None:
    m = _model()
    older = _write(m, 9)
    fua = _write(m, 9, kind=OpKind.FUA)
    _flush(m)  # makes ``older`` durable too — but ``fua`` is newer and already durable
    assert _read(m, 9, sectors(VOL, 9, 1, fua)) == 0
    _clean(m)
    m.fault_begin()
    assert _read(m, 9, sectors(VOL, 9, 1, older)) == 1
    assert _checks(m) == [1]
    assert f"write {fua} was acknowledged durable" in m.violations[0].message


def test_quiet_read_after_newer_write_is_monotonic_not_a_violation() -> None:
    m = _model()
    a = _write(m, 0)
    assert _read(m, 0, sectors(VOL, 0, 1, a)) == 0
    b = _write(m, 0)
    assert _read(m, 0, sectors(VOL, 0, 1, b)) == 0
    assert _read(m, 0, sectors(VOL, 0, 1, b)) == 0
    _clean(m)


def test_ambiguous_zeros_set_the_oldest_possible_baseline() -> None:
    # W then UNMAP pipelined, both in flight: zeros may be the initial value (nothing landed
    # yet), so W landing afterwards is not a step back in time even though the UNMAP is newer.
    m = _model()
    w = m.issue(OpKind.WRITE, 0, 1, writer=0)
    u = m.issue(OpKind.UNMAP, 0, 1, writer=0)
    assert _read(m, 0, _zeros()) == 0
    assert _read(m, 0, sectors(VOL, 0, 1, w)) == 0
    m.complete(w, ok=True)
    m.complete(u, ok=False)
    assert _read(m, 0, sectors(VOL, 0, 1, w)) == 0
    _clean(m)
    # ...whereas once W was seen, zeros can only be the newer UNMAP: still fine
    assert _read(m, 0, _zeros()) == 0
    _clean(m)


def test_quiet_read_of_zeros_from_a_newer_unmap_is_not_back_in_time() -> None:
    m = _model()
    a = _write(m, 0)
    assert _read(m, 0, sectors(VOL, 0, 1, a)) == 0
    _write(m, 0, kind=OpKind.UNMAP)
    assert _read(m, 0, _zeros()) == 0
    _clean(m)


# ---- broken histories -----------------------------------------------------------------------


@pytest.mark.parametrize("fault", [False, True])
def test_flushed_write_lost_to_previous_value_is_check_1(fault: bool) -> None:
    m = _model()
    prev = _write(m, 16, 3)
    _flush(m)
    cur = _write(m, 16, 3)
    _flush(m)
    if fault:
        m.fault_begin()
    assert _read(m, 16, sectors(VOL, 16, 3, prev), at_s=12.5) == 1
    assert _checks(m) == [1]
    v = m.violations[0]
    assert (v.volume, v.lba, v.at_s) == (VOL, 16, 12.5)
    assert f"write {cur} was acknowledged durable" in v.message
    assert "3 block(s)" in v.message
    assert m.counters.by_check == {1: 1}


@pytest.mark.parametrize("fault", [False, True])
def test_flushed_write_lost_to_zeros_is_check_1(fault: bool) -> None:
    m = _model()
    _write(m, 16, 3)
    _flush(m)
    if fault:
        m.fault_begin()
    assert _read(m, 16, _zeros(3)) == 1
    assert _checks(m) == [1]
    assert "reads zeros" in m.violations[0].message


def test_fua_write_lost_is_check_1() -> None:
    m = _model()
    prev = _write(m, 50, 2)
    _write(m, 50, 2, kind=OpKind.FUA)
    m.fault_begin()
    assert _read(m, 50, sectors(VOL, 50, 2, prev)) == 1
    assert _checks(m) == [1]
    assert m.violations[0].lba == 50


def test_failed_flush_does_not_make_writes_durable() -> None:
    m = _model()
    wid = _write(m, 6, 2)
    _flush(m, ok=False)
    assert m.counters.flushes_failed == 1
    assert m.counters.durable == 0
    m.fault_begin()
    assert _read(m, 6, _zeros(2)) == 0  # never acknowledged durable: may vanish
    _clean(m)
    # the next good flush does cover it
    _flush(m)
    assert m.counters.durable == 1
    assert _read(m, 6, sectors(VOL, 6, 2, wid)) == 0
    assert _read(m, 6, _zeros(2)) == 1
    assert _checks(m) == [1]


def test_bad_checksum_is_check_2() -> None:
    m = _model()
    wid = _write(m, 0)
    raw = bytearray(sector(VOL, 0, wid))
    raw[300] ^= 0x10
    assert _read(m, 0, bytes(raw)) == 1
    assert _checks(m) == [2]
    assert "torn or invented" in m.violations[0].message


def test_torn_sector_spliced_from_two_writes_is_check_2() -> None:
    m = _model()
    a = _write(m, 0)
    b = _write(m, 0)
    half = SECTOR_BYTES // 2
    assert _read(m, 0, sector(VOL, 0, a)[:half] + sector(VOL, 0, b)[half:]) == 1
    assert _checks(m) == [2]


def test_payload_of_another_volume_is_check_2() -> None:
    m = _model()
    wid = _write(m, 0)
    assert _read(m, 0, sectors(VOL + 1, 0, 1, wid)) == 1
    assert _checks(m) == [2]
    assert f"volume {VOL + 1}" in m.violations[0].message


def test_payload_of_a_write_to_another_lba_is_check_2() -> None:
    m = _model()
    elsewhere = _write(m, 20)
    _write(m, 0)
    # the block of a write that never covered LBA 0
    assert _read(m, 0, sectors(VOL, 20, 1, elsewhere)) == 1
    assert _checks(m) == [2]
    assert "never went to it" in m.violations[0].message


def test_block_of_same_write_for_a_neighbouring_lba_is_check_2() -> None:
    m = _model()
    wid = _write(m, 0, 4)
    # blocks 0 and 1 swapped: each is from a write that covers its LBA, but for the wrong LBA
    data = sector(VOL, 1, wid) + sector(VOL, 0, wid) + sectors(VOL, 2, 2, wid)
    assert _read(m, 0, data) == 1
    assert _checks(m) == [2]
    assert "2 block(s)" in m.violations[0].message
    assert m.violations[0].lba == 0


def test_write_id_never_issued_is_check_2() -> None:
    m = _model()
    wid = _write(m, 0)
    assert _read(m, 0, sectors(VOL, 0, 1, wid + 1000)) == 1
    assert _checks(m) == [2]


def test_payload_naming_a_zeroing_op_is_check_2() -> None:
    m = _model()
    zap = _write(m, 0, kind=OpKind.UNMAP)
    assert _read(m, 0, sectors(VOL, 0, 1, zap)) == 1
    assert _checks(m) == [2]


def test_quiet_read_going_back_in_time_is_check_3() -> None:
    m = _model()
    a = _write(m, 0)
    b = _write(m, 0)  # neither is durable: both are in the allowed set
    assert _read(m, 0, sectors(VOL, 0, 1, b)) == 0
    assert _read(m, 0, sectors(VOL, 0, 1, a), at_s=3.0) == 1
    assert _checks(m) == [3]
    v = m.violations[0]
    assert (v.lba, v.at_s) == (0, 3.0)
    assert f"reads write {a}" in v.message
    assert f"returned write {b}" in v.message
    assert m.counters.by_check == {3: 1}


def test_quiet_read_back_to_zeros_is_check_3() -> None:
    m = _model()
    wid = _write(m, 0)
    assert _read(m, 0, sectors(VOL, 0, 1, wid)) == 0
    assert _read(m, 0, _zeros()) == 1
    assert _checks(m) == [3]


def test_quiet_read_back_to_an_older_zeroing_op_is_check_3() -> None:
    m = _model()
    _write(m, 0, kind=OpKind.ZEROES)
    wid = _write(m, 0)
    assert _read(m, 0, sectors(VOL, 0, 1, wid)) == 0
    assert _read(m, 0, _zeros()) == 1
    assert _checks(m) == [3]


def test_revert_across_a_fault_window_is_not_check_3() -> None:
    m = _model()
    a = _write(m, 0)
    b = _write(m, 0)
    assert _read(m, 0, sectors(VOL, 0, 1, b)) == 0
    m.fault_begin()
    m.fault_end()
    assert _read(m, 0, sectors(VOL, 0, 1, a)) == 0
    _clean(m)
    # …but the new generation has its own baseline: going back again is check 3
    assert _read(m, 0, _zeros()) == 1
    assert _checks(m) == [3]


def test_durable_revert_across_a_fault_window_is_check_1_only() -> None:
    m = _model()
    a = _write(m, 0)
    b = _write(m, 0)
    _flush(m)
    assert _read(m, 0, sectors(VOL, 0, 1, b)) == 0
    m.fault_begin()
    m.fault_end()
    assert _read(m, 0, sectors(VOL, 0, 1, a)) == 1
    assert _checks(m) == [1]
    assert m.counters.by_check == {1: 1}


def test_durable_revert_between_quiet_reads_is_check_1_not_3() -> None:
    m = _model()
    a = _write(m, 0)
    b = _write(m, 0)
    _flush(m)
    assert _read(m, 0, sectors(VOL, 0, 1, b)) == 0
    assert _read(m, 0, sectors(VOL, 0, 1, a)) == 1
    assert _checks(m) == [1]


def test_reads_inside_a_fault_window_set_no_baseline() -> None:
    m = _model()
    a = _write(m, 0)
    b = _write(m, 0)
    m.fault_begin()
    assert _read(m, 0, sectors(VOL, 0, 1, b)) == 0
    assert _read(m, 0, sectors(VOL, 0, 1, a)) == 0
    m.fault_end()
    # the quiet baseline starts with the first quiet read after healing
    assert _read(m, 0, sectors(VOL, 0, 1, a)) == 0
    _clean(m)
    assert _read(m, 0, sectors(VOL, 0, 1, b)) == 0
    assert _read(m, 0, sectors(VOL, 0, 1, a)) == 1
    assert _checks(m) == [3]


def test_read_spanning_a_fault_is_not_quiet() -> None:
    m = _model()
    a = _write(m, 0)
    b = _write(m, 0)
    assert _read(m, 0, sectors(VOL, 0, 1, b)) == 0
    token = m.read_begin(0, 1)  # issued quiet ...
    m.fault_begin()
    m.fault_end()  # ... returned quiet, but a fault came and went in between
    assert m.read_end(token, sectors(VOL, 0, 1, a), 0.0) == 0
    token = m.read_begin(0, 1)  # issued inside a fault, returned after healing
    m.fault_begin()
    late = m.read_begin(0, 1)
    m.fault_end()
    assert m.read_end(late, sectors(VOL, 0, 1, a), 0.0) == 0
    assert m.read_end(token, sectors(VOL, 0, 1, a), 0.0) == 0
    _clean(m)


def test_overlapping_quiet_reads_have_no_order() -> None:
    """Two reads of one block overlap: ``slow`` is issued first and served before the
    in-flight write ``b`` lands, ``fast`` is issued later, served after, and returns first.
    Neither finished before the other began, so they have no order and ``slow`` returning the
    older ``a`` is legal (a false check 3 once, when quiet reads were ordered by completion)."""
    m = _model()
    a = _write(m, 0)
    b = m.issue(OpKind.WRITE, 0, 1, writer=0)  # in flight
    slow = m.read_begin(0, 1)
    fast = m.read_begin(0, 1)
    assert m.read_end(fast, sectors(VOL, 0, 1, b), 0.0) == 0
    assert m.read_end(slow, sectors(VOL, 0, 1, a), 0.0) == 0, m.violations
    _clean(m)
    # A read issued after both completed is held to the newer one.
    late = m.read_begin(0, 1)
    assert m.read_end(late, sectors(VOL, 0, 1, a), 0.0) == 1
    assert m.violations[-1].check == 3


def test_large_read_aggregates_lost_blocks_into_one_violation() -> None:
    m = _model(4096)
    wid = _write(m, 1000, 2048)
    _flush(m)
    good = bytearray(sectors(VOL, 1000, 2048, wid))
    lost = range(700, 800)  # 100 blocks, offsets within the read
    for i in lost:
        good[i * SECTOR_BYTES : (i + 1) * SECTOR_BYTES] = ZERO_SECTOR
    assert _read(m, 1000, bytes(good), at_s=1.0) == 1
    assert len(m.violations) == 1
    v = m.violations[0]
    assert v.check == 1
    assert v.lba == 1700  # the first lost block
    assert "100 block(s)" in v.message
    assert m.counters.by_check == {1: 1}
    assert m.violation_count() == 1
    assert m.counters.sectors_checked == 2048


def test_one_read_with_several_kinds_of_damage_reports_each_check_once() -> None:
    m = _model()
    wid = _write(m, 0, 8)
    _flush(m)
    data = bytearray(sectors(VOL, 0, 8, wid))
    data[0:SECTOR_BYTES] = ZERO_SECTOR  # check 1
    data[SECTOR_BYTES : 2 * SECTOR_BYTES] = ZERO_SECTOR  # check 1
    data[5 * SECTOR_BYTES] ^= 0xFF  # check 2 (bad magic)
    data[6 * SECTOR_BYTES : 7 * SECTOR_BYTES] = sector(VOL + 1, 6, wid)  # check 2
    data[7 * SECTOR_BYTES : 8 * SECTOR_BYTES] = sector(VOL, 7, wid + 99)  # check 2
    assert _read(m, 0, bytes(data)) == 2
    assert _checks(m) == [1, 2]  # sorted by check
    assert [v.lba for v in m.violations] == [0, 5]
    assert "2 block(s)" in m.violations[0].message
    assert "3 block(s)" in m.violations[1].message
    assert m.counters.by_check == {1: 1, 2: 1}


def test_violation_details_are_capped_but_counts_go_on() -> None:
    m = _model()
    _write(m, 0, kind=OpKind.FUA)
    for _ in range(VIOLATIONS_KEPT + 5):
        assert _read(m, 0, _zeros()) == 1
    assert len(m.violations) == VIOLATIONS_KEPT
    assert m.violation_count() == VIOLATIONS_KEPT + 5
    assert m.counters.by_check == {1: VIOLATIONS_KEPT + 5}


def test_record_adds_a_blockless_finding() -> None:
    m = _model()
    m.record(4, "replicas diverge", 9.0)
    m.record(5, "something else", 10.0)
    assert [(v.check, v.lba, v.volume, v.message, v.at_s) for v in m.violations] == [
        (4, None, VOL, "replicas diverge", 9.0),
        (5, None, VOL, "something else", 10.0),
    ]
    assert m.counters.by_check == {4: 1, 5: 1}
    assert m.violation_count() == 2


# ---- bookkeeping and argument checks --------------------------------------------------------


def test_write_ids_are_increasing_from_one() -> None:
    m = _model()
    ids = [m.issue(OpKind.WRITE, 0, 1, writer=0) for _ in range(3)]
    assert ids == [1, 2, 3]
    assert INITIAL == 0
    assert INITIAL not in ids


@pytest.mark.parametrize(("lba", "count"), [(-1, 1), (0, 0), (SIZE - 1, 2), (SIZE, 1), (0, -3)])
def test_issue_outside_the_volume_raises(lba: int, count: int) -> None:
    m = _model()
    with pytest.raises(ValueError, match="outside the volume"):
        m.issue(OpKind.WRITE, lba, count, writer=0)
    assert m.counters.writes_issued == 0


def test_issue_of_the_last_block_is_allowed() -> None:
    m = _model()
    wid = _write(m, SIZE - 1)
    assert _read(m, SIZE - 1, sector(VOL, SIZE - 1, wid)) == 0


def test_read_end_with_wrong_length_raises() -> None:
    m = _model()
    token = m.read_begin(0, 2)
    with pytest.raises(ValueError, match="bytes read for 2 blocks"):
        m.read_end(token, _zeros(1), 0.0)
    assert m.counters.reads == 0


def test_counters() -> None:
    m = _model()
    _write(m, 0)
    _write(m, 1, ok=False)
    _write(m, 2, kind=OpKind.FUA)
    _write(m, 3, 2, kind=OpKind.UNMAP)
    _flush(m, ok=False)
    _flush(m)
    _read(m, 0, _zeros(5))
    c = m.counters
    assert (c.writes_issued, c.writes_ok, c.writes_failed) == (4, 3, 1)
    assert (c.flushes_ok, c.flushes_failed) == (1, 1)
    assert c.durable == 3  # the FUA, then the plain write and the unmap by the flush
    assert (c.reads, c.sectors_checked) == (1, 5)


# ---- properties -----------------------------------------------------------------------------

PROP_SIZE = 16
WRITE_KINDS = (OpKind.WRITE, OpKind.FUA)
ALL_KINDS = tuple(OpKind)


@dataclass
class _Disk:
    """A test-side disk: per block, the values it held (newest last), as (write id, bytes)."""

    size: int
    history: list[list[tuple[int, bytes]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.history = [[(INITIAL, ZERO_SECTOR)] for _ in range(self.size)]

    def land(self, lba: int, wid: int, data: bytes) -> None:
        self.history[lba].append((wid, data))

    def read(self, lba: int, count: int) -> bytes:
        return b"".join(self.history[s][-1][1] for s in range(lba, lba + count))


def _block(kind: OpKind, first: int, s: int, wid: int) -> bytes:
    if kind in (OpKind.UNMAP, OpKind.ZEROES):
        return ZERO_SECTOR
    if kind is OpKind.SAME:
        return sector(VOL, first, wid, same=True)
    return sector(VOL, s, wid)


def _ranges(draw: st.DrawFn) -> tuple[int, int]:
    lba = draw(st.integers(0, PROP_SIZE - 1))
    count = draw(st.integers(1, min(4, PROP_SIZE - lba)))
    return lba, count


@st.composite
def _ops(draw: st.DrawFn, kinds: tuple[OpKind, ...]) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for _ in range(draw(st.integers(1, 30))):
        what = draw(st.sampled_from(["write", "write", "inflight", "flush", "read", "fault"]))
        if what in ("write", "inflight"):
            lba, count = _ranges(draw)
            kind = draw(st.sampled_from(kinds))
            ok = draw(st.booleans())
            landed = draw(st.lists(st.booleans(), min_size=count, max_size=count))
            if what == "write":
                out.append(("write", kind, lba, count, ok, landed))
            else:
                rlba, rcount = _ranges(draw)
                out.append(("inflight", kind, lba, count, ok, landed, rlba, rcount))
        elif what == "flush":
            out.append(("flush", draw(st.booleans())))
        elif what == "read":
            out.append(("read", *_ranges(draw)))
        else:
            out.append(("fault", draw(st.booleans())))
    return out


class _Run:
    """Drives a VolumeModel and a _Disk together, tracking durability independently."""

    def __init__(self) -> None:
        self.m = VolumeModel(VOL, PROP_SIZE)
        self.disk = _Disk(PROP_SIZE)
        self.unflushed: list[tuple[int, int, int]] = []  # (write id, lba, count)
        self.durable = [INITIAL] * PROP_SIZE  # newest durable write id per block

    def _make_durable(self, wid: int, lba: int, count: int) -> None:
        for s in range(lba, lba + count):
            self.durable[s] = max(self.durable[s], wid)

    def _land(self, kind: OpKind, lba: int, wid: int, blocks: list[int]) -> None:
        for s in blocks:
            self.disk.land(s, wid, _block(kind, lba, s, wid))

    def _finish(self, wid: int, kind: OpKind, lba: int, count: int, ok: bool) -> None:
        self.m.complete(wid, ok=ok)
        if not ok:
            return
        if kind is OpKind.FUA:
            self._make_durable(wid, lba, count)
        else:
            self.unflushed.append((wid, lba, count))

    def apply(self, op: tuple[object, ...]) -> None:
        name = op[0]
        if name in ("write", "inflight"):
            kind, lba, count, ok, landed = op[1:6]
            assert isinstance(kind, OpKind)
            assert isinstance(lba, int)
            assert isinstance(count, int)
            assert isinstance(landed, list)
            wid = self.m.issue(kind, lba, count, writer=0)
            early = [lba + i for i in range(count) if landed[i]]
            self._land(kind, lba, wid, early)
            if name == "inflight":
                rlba, rcount = op[6], op[7]
                assert isinstance(rlba, int)
                assert isinstance(rcount, int)
                self.perfect_read(rlba, rcount)
            if ok:  # GOOD status: every block reached the medium
                self._land(kind, lba, wid, [lba + i for i in range(count) if not landed[i]])
            self._finish(wid, kind, lba, count, bool(ok))
        elif name == "flush":
            token = self.m.flush_begin()
            self.m.flush_end(token, ok=bool(op[1]))
            if op[1]:
                for wid, lba, count in self.unflushed:
                    self._make_durable(wid, lba, count)
                self.unflushed.clear()
        elif name == "read":
            lba, count = op[1], op[2]
            assert isinstance(lba, int)
            assert isinstance(count, int)
            self.perfect_read(lba, count)
        elif op[1]:
            self.m.fault_begin()
        else:
            self.m.fault_end()

    def perfect_read(self, lba: int, count: int) -> None:
        token = self.m.read_begin(lba, count)
        assert self.m.read_end(token, self.disk.read(lba, count), 0.0) == 0, self.m.violations

    def dropping_read(self, block: int, lba: int, count: int) -> None:
        """Read ``lba..lba+count`` (which covers ``block``) from a disk that lost the newest
        durable write of ``block``: that block reads back as what preceded it."""
        durable = self.durable[block]
        held = self.disk.history[block]
        at = [w for w, _ in held].index(durable)
        stale = held[at - 1][1]
        data = bytearray(self.disk.read(lba, count))
        off = (block - lba) * SECTOR_BYTES
        data[off : off + SECTOR_BYTES] = stale
        before = len(self.m.violations)
        token = self.m.read_begin(lba, count)
        assert self.m.read_end(token, bytes(data), 0.0) == 1
        new = self.m.violations[before:]
        assert [(v.check, v.lba) for v in new] == [(1, block)]
        assert "1 block(s)" in new[0].message


@given(ops=_ops(ALL_KINDS), final=st.tuples(st.integers(0, PROP_SIZE - 1)))
def test_perfect_disk_never_violates(ops: list[tuple[object, ...]], final: tuple[int]) -> None:
    run = _Run()
    for op in ops:
        run.apply(op)
    run.m.fault_end()
    run.perfect_read(0, PROP_SIZE)
    run.perfect_read(final[0], 1)
    assert run.m.violations == []
    assert run.m.violation_count() == 0


@given(
    ops=_ops(WRITE_KINDS),
    drops=st.lists(
        st.tuples(st.integers(0, 2**16), st.integers(0, 3), st.integers(0, 3)), max_size=5
    ),
    last=st.integers(0, PROP_SIZE - 1),
)
def test_disk_dropping_newest_durable_write_is_always_caught(
    ops: list[tuple[object, ...]], drops: list[tuple[int, int, int]], last: int
) -> None:
    run = _Run()
    pending = list(drops)
    expected = 0

    def try_drop() -> None:
        nonlocal expected
        if not pending:
            return
        pick, before, after = pending.pop()
        candidates = [s for s in range(PROP_SIZE) if run.durable[s] != INITIAL]
        if not candidates:
            return
        block = candidates[pick % len(candidates)]
        lba = max(0, block - before)
        end = min(PROP_SIZE, block + after + 1)
        run.dropping_read(block, lba, end - lba)
        expected += 1

    for op in ops:
        run.apply(op)
        try_drop()
    # make sure at least one durable write exists, then lose it
    run.apply(("write", OpKind.FUA, last, 1, True, [True]))
    assert run.durable[last] != INITIAL
    run.dropping_read(last, last, 1)
    expected += 1
    # the disk itself never lost anything: a good read afterwards is clean
    run.perfect_read(0, PROP_SIZE)
    assert run.m.violation_count() == expected
    assert set(run.m.counters.by_check) <= {1}
