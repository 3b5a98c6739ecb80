"""Helpers shared by the engine tests."""

from __future__ import annotations

import random
import time

from blockyard.engine import Volume

MIB = 1 << 20
BLOCK = 4096
SECTOR = 512
SECTORS_PER_BLOCK = BLOCK // SECTOR

#: How long a test waits for the background flusher before calling the engine stuck.
CHECKPOINT_WAIT_S = 15.0


def wait_checkpointed(vol: Volume, timeout_s: float = CHECKPOINT_WAIT_S) -> None:
    """Wait until the background flusher has applied every WAL record to the data region.

    Copy-on-write happens when records are applied, not when they are logged, so snapshot
    accounting is only observable after this.
    """
    deadline = time.monotonic() + timeout_s
    while vol.checkpoint_lsn <= vol.last_lsn:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"flusher did not checkpoint within {timeout_s} s "
                f"(checkpoint_lsn {vol.checkpoint_lsn}, last_lsn {vol.last_lsn})"
            )
        time.sleep(0.02)


def block_of(tag: int, n_blocks: int = 1) -> bytes:
    """``n_blocks`` 4 KiB blocks whose every byte says which write they came from."""
    return bytes([tag & 0xFF or 1]) * (BLOCK * n_blocks)


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def read_all(vol: Volume) -> bytes:
    step = 8 * MIB // SECTOR
    count = vol.block_count
    return b"".join(vol.read(lba, min(step, count - lba)) for lba in range(0, count, step))
