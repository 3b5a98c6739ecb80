"""The missed-write bitmap: marks, clears, runs, persistence, torn pages and growth."""

from __future__ import annotations

import uuid

import crc32c
from hypothesis import given
from hypothesis import strategies as st

from blockyard.engine.missed_bitmap import (
    MAX_BITMAP_BYTES,
    UNKNOWN_FLOOR,
    MissedBitmap,
    bitmap_file_name,
    grain_for,
)
from blockyard.testing.faultfs import FaultFS

U = uuid.UUID(int=7)


def make(fs: FaultFS, blocks: int = 10_000, rid: str = "10.0.0.2:7500") -> MissedBitmap:
    fs.mkdir("/v")
    return MissedBitmap.open(
        fs, "/v", volume="v", volume_uuid=U, replica_id=rid, block_count=blocks
    )


def test_runs_follow_marks_and_clears() -> None:
    bm = make(FaultFS())
    bm.activate(41)
    bm.mark(5, 3)
    bm.mark(100, 1)
    bm.mark(9990, 50)  # clipped to the volume
    assert list(bm.runs()) == [(5, 3), (100, 1), (9990, 10)]
    assert bm.set_blocks == 14
    bm.clear(6, 1)
    assert list(bm.runs()) == [(5, 1), (7, 1), (100, 1), (9990, 10)]
    assert list(bm.runs(50)) == [(100, 1), (9990, 10)]
    bm.deactivate()
    assert list(bm.runs()) == [] and not bm.active and bm.set_blocks == 0


def test_persisted_bits_survive_reopen_and_a_torn_page_reads_as_ones() -> None:
    fs = FaultFS()
    bm = make(fs, blocks=100_000)
    bm.activate(9)
    bm.mark(40_000, 2)
    bm.persist()
    bm.close()
    bm = make(fs, blocks=100_000)
    assert bm.active and bm.base_lsn == 9
    assert list(bm.runs()) == [(40_000, 2)]
    # Damage one page (as a torn write would): everything it covers must be resent.
    path = bm.path
    bm.close()
    f = fs.open(path)
    f.pwrite(b"\x01", 36864 + 4096 + 10)
    bm = make(fs, blocks=100_000)
    # Page 1 covers blocks 32768..65535 (and the marked 40,000): all of it is set now.
    assert list(bm.runs()) == [(32768, 32768)]


@given(st.lists(st.tuples(st.integers(0, 5000), st.integers(1, 300)), max_size=30))
def test_runs_cover_exactly_the_marked_blocks(marks: list[tuple[int, int]]) -> None:
    bm = make(FaultFS(), blocks=5000)
    want: set[int] = set()
    for block, count in marks:
        bm.mark(block, count)
        want.update(range(block, min(block + count, 5000)))
    got: set[int] = set()
    for block, count in bm.runs():
        got.update(range(block, block + count))
    assert got == want
    assert bm.set_blocks == len(want)


def test_grain_keeps_large_volumes_within_the_bound() -> None:
    assert grain_for(1 << 28) == 1  # 1 TiB of 4 KiB blocks: 32 MiB of bits
    assert grain_for(1 << 32) == 16  # 16 TiB
    assert ((1 << 32) // grain_for(1 << 32)) // 8 <= MAX_BITMAP_BYTES


def test_growth_keeps_marks() -> None:
    fs = FaultFS()
    bm = make(fs, blocks=1000)
    bm.activate(0)
    bm.mark(999, 1)
    bm.resize(50_000)
    bm.mark(49_999, 1)
    bm.persist()
    bm.close()
    bm = make(fs, blocks=50_000)
    assert list(bm.runs()) == [(999, 1), (49_999, 1)]


def test_file_name_is_safe_and_distinct() -> None:
    a = bitmap_file_name("10.0.0.2:7500")
    b = bitmap_file_name("10.0.0.2_7500")
    assert "/" not in bitmap_file_name("../../etc/passwd")
    assert a != b


def test_the_floor_is_unknown_until_set_and_survives_reopen() -> None:
    """A bitmap created without a floor knows nothing (a crash before its owner sets the real
    one makes that replica rebuild in full); a set floor is persisted with the header."""
    fs = FaultFS()
    bm = make(fs)
    assert bm.created and bm.floor_lsn == UNKNOWN_FLOOR
    bm.set_floor(4321)
    bm.persist()
    bm.close()
    bm = make(fs)
    assert not bm.created and bm.floor_lsn == 4321
    bm.close()


def test_a_file_from_before_the_floor_reads_floor_zero() -> None:
    fs = FaultFS()
    bm = make(fs)
    bm.set_floor(99)
    bm.persist()
    path = bm.path
    bm.close()
    # Zero the floor's bytes and re-seal the header, as a file of the first format is.
    f = fs.open(path)
    header = bytearray(f.pread(512, 0))
    header[256:264] = bytes(8)
    header[508:512] = crc32c.crc32c(bytes(header[:508])).to_bytes(4, "little")
    f.pwrite(bytes(header), 0)
    f.close()
    bm = make(fs)
    assert bm.floor_lsn == 0
    bm.close()
