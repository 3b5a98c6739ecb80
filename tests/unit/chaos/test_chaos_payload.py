"""Self-describing chaos sector payloads: round trips, zeros, and every kind of damage."""

from __future__ import annotations

import struct

import crc32c
import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockyard.chaos.payload import (
    FLAG_SAME,
    MAGIC,
    SECTOR_BYTES,
    ZERO_SECTOR,
    CorruptSector,
    Stamp,
    parse,
    sector,
    sectors,
)

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)


def _flip(data: bytes, bit: int) -> bytes:
    raw = bytearray(data)
    raw[bit // 8] ^= 1 << (bit % 8)
    return bytes(raw)


# ---- round trips ----------------------------------------------------------------------------


def test_sector_is_one_logical_block_and_starts_with_the_magic() -> None:
    data = sector(3, 17, 42)
    assert len(data) == SECTOR_BYTES == 512
    assert data[:4] == MAGIC == b"BYCH"
    assert data != ZERO_SECTOR


def test_normal_sector_round_trips() -> None:
    assert parse(sector(3, 17, 42)) == Stamp(volume=3, lba=17, write_id=42, same=False)


def test_write_same_sector_round_trips_with_its_flag() -> None:
    data = sector(3, 17, 42, same=True)
    assert parse(data) == Stamp(volume=3, lba=17, write_id=42, same=True)
    flags = struct.unpack_from("<I", data, 24)[0]
    assert flags == FLAG_SAME
    # the flag is part of the stamp, not an ignored header bit
    assert data != sector(3, 17, 42)
    assert parse(sector(3, 17, 42)).same is False  # type: ignore[union-attr]


def test_parse_accepts_a_memoryview_slice() -> None:
    buf = sectors(1, 100, 3, 9)
    view = memoryview(buf)[SECTOR_BYTES : 2 * SECTOR_BYTES]
    assert parse(view) == Stamp(1, 101, 9, False)


@given(volume=U32, lba=U64, write_id=U64, same=st.booleans())
def test_any_stamp_round_trips(volume: int, lba: int, write_id: int, same: bool) -> None:
    data = sector(volume, lba, write_id, same=same)
    assert len(data) == SECTOR_BYTES
    assert parse(data) == Stamp(volume, lba, write_id, same)


def test_sector_is_deterministic_and_distinct_per_field() -> None:
    base = sector(1, 2, 3)
    assert sector(1, 2, 3) == base
    assert (
        len({base, sector(9, 2, 3), sector(1, 9, 3), sector(1, 2, 9), sector(1, 2, 3, same=True)})
        == 5
    )


# ---- zeros ----------------------------------------------------------------------------------


def test_all_zero_sector_parses_to_none() -> None:
    assert parse(ZERO_SECTOR) is None
    assert parse(bytes(SECTOR_BYTES)) is None
    assert parse(memoryview(bytearray(SECTOR_BYTES))) is None


def test_nearly_zero_sector_is_corrupt_not_zeros() -> None:
    with pytest.raises(CorruptSector):
        parse(_flip(ZERO_SECTOR, 4095))
    with pytest.raises(CorruptSector):
        parse(_flip(ZERO_SECTOR, 0))


# ---- damage ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bit",
    [0, 31, 32, 95, 100, 159, 200, 223, 224, 255, 256, 300, 1000, 2048, 4000, 4095],
)
def test_flipped_bit_at_fixed_places_is_corrupt(bit: int) -> None:
    # magic, volume, lba, write id, flags, crc and fill each get hit
    with pytest.raises(CorruptSector):
        parse(_flip(sector(5, 1234, 777), bit))


@given(
    volume=U32,
    lba=U64,
    write_id=U64,
    same=st.booleans(),
    bit=st.integers(0, SECTOR_BYTES * 8 - 1),
)
def test_flipped_bit_anywhere_is_corrupt(
    volume: int, lba: int, write_id: int, same: bool, bit: int
) -> None:
    with pytest.raises(CorruptSector):
        parse(_flip(sector(volume, lba, write_id, same=same), bit))


def test_every_single_bit_flip_of_one_sector_is_corrupt() -> None:
    good = sector(2, 40, 41)
    for bit in range(SECTOR_BYTES * 8):
        with pytest.raises(CorruptSector):
            parse(_flip(good, bit))


def test_sector_spliced_from_two_writes_is_corrupt() -> None:
    first = sector(1, 8, 10)
    second = sector(1, 8, 11)
    half = SECTOR_BYTES // 2
    with pytest.raises(CorruptSector):
        parse(first[:half] + second[half:])
    with pytest.raises(CorruptSector):
        parse(second[:half] + first[half:])


def test_splice_after_the_header_is_caught_by_the_fill() -> None:
    # header (and its crc) of one write, fill of another: a torn write at a 32-byte boundary
    first = sector(1, 8, 10)
    second = sector(1, 8, 11)
    with pytest.raises(CorruptSector):
        parse(first[:32] + second[32:])


def test_header_matching_its_crc_but_not_its_fill_is_corrupt() -> None:
    # A forger that recomputes the checksum still cannot pair one write's header with another
    # write's fill: the fill is derived from the header.
    raw = bytearray(sector(1, 8, 10)[:32] + sector(1, 8, 11)[32:])
    struct.pack_into("<I", raw, 28, 0)
    struct.pack_into("<I", raw, 28, crc32c.crc32c(bytes(raw)))
    with pytest.raises(CorruptSector, match="fill"):
        parse(bytes(raw))


@given(
    a=st.tuples(U32, st.integers(0, 2**40), U64),
    b=st.tuples(U32, st.integers(0, 2**40), U64),
    cut=st.integers(1, SECTOR_BYTES - 1),
)
def test_splice_at_any_point_is_corrupt_unless_it_is_one_of_the_halves(
    a: tuple[int, int, int], b: tuple[int, int, int], cut: int
) -> None:
    first, second = sector(*a), sector(*b)
    spliced = first[:cut] + second[cut:]
    if spliced in (first, second):
        # e.g. two writes that agree on every byte before ``cut``: the splice *is* one of them
        assert parse(spliced) in (parse(first), parse(second))
        return
    with pytest.raises(CorruptSector):
        parse(spliced)


def test_wrong_magic_is_corrupt() -> None:
    data = b"XXXX" + sector(1, 2, 3)[4:]
    with pytest.raises(CorruptSector, match="magic"):
        parse(data)


def test_random_garbage_is_corrupt() -> None:
    with pytest.raises(CorruptSector):
        parse(bytes(range(256)) * 2)
    with pytest.raises(CorruptSector):
        parse(b"\xff" * SECTOR_BYTES)


def test_bad_checksum_is_reported_as_such() -> None:
    raw = bytearray(sector(1, 2, 3))
    raw[28] ^= 0xFF  # the crc field itself
    with pytest.raises(CorruptSector, match="checksum"):
        parse(bytes(raw))


def test_corrupt_sector_is_a_value_error() -> None:
    assert issubclass(CorruptSector, ValueError)


# ---- sectors --------------------------------------------------------------------------------


def test_sectors_stamps_each_block_with_its_own_lba() -> None:
    data = sectors(4, 1000, 8, 55)
    assert len(data) == 8 * SECTOR_BYTES
    stamps = [parse(data[i * SECTOR_BYTES : (i + 1) * SECTOR_BYTES]) for i in range(8)]
    assert stamps == [Stamp(4, 1000 + i, 55, False) for i in range(8)]
    assert all(
        data[i * SECTOR_BYTES : (i + 1) * SECTOR_BYTES] == sector(4, 1000 + i, 55) for i in range(8)
    )


def test_sectors_blocks_are_not_interchangeable() -> None:
    data = sectors(4, 0, 2, 55)
    block0, block1 = data[:SECTOR_BYTES], data[SECTOR_BYTES:]
    assert block0 != block1
    assert parse(block0).lba == 0  # type: ignore[union-attr]
    assert parse(block1).lba == 1  # type: ignore[union-attr]


@given(
    volume=U32,
    lba=st.integers(0, 2**40),
    count=st.integers(1, 32),
    write_id=U64,
)
def test_sectors_property(volume: int, lba: int, count: int, write_id: int) -> None:
    data = sectors(volume, lba, count, write_id)
    assert len(data) == count * SECTOR_BYTES
    for i in range(count):
        stamp = parse(data[i * SECTOR_BYTES : (i + 1) * SECTOR_BYTES])
        assert stamp == Stamp(volume, lba + i, write_id, False)


def test_sectors_of_zero_blocks_is_empty() -> None:
    assert sectors(1, 0, 0, 1) == b""
