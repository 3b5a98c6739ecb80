"""The replica's touched-block bitmap sets whole bytes for long runs (a range unmap may cover
the whole volume) and agrees with setting bit by bit."""

from __future__ import annotations

import random

from blockyard.replication.replica_session import _set_bits


def _slow(bits: bytearray, first: int, end: int) -> None:
    for b in range(first, end):
        bits[b >> 3] |= 1 << (b & 7)


def test_set_bits_matches_bit_by_bit() -> None:
    rng = random.Random(7)
    for _ in range(500):
        size = rng.randrange(1, 40)
        a = bytearray(rng.randbytes(size)) if rng.random() < 0.5 else bytearray(size)
        b = bytearray(a)
        first = rng.randrange(0, size * 8)
        end = rng.randrange(first, size * 8 + 1)
        _set_bits(a, first, end)
        _slow(b, first, end)
        assert a == b, (size, first, end)


def test_set_bits_covers_a_large_volume_quickly() -> None:
    bits = bytearray(1 << 25)  # 2^28 blocks: a 1 TiB volume
    _set_bits(bits, 3, (1 << 28) - 5)
    assert bits[0] == 0xF8 and bits[1] == 0xFF and bits[-2] == 0xFF and bits[-1] == 0x07
