"""The circular WAL under sustained load: wraparound, back-pressure and replay across the wrap."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from engine_helpers import MIB, read_all

from blockyard.engine import VolumeStore

SMALL_WAL_BYTES = 64 * 1024


def test_wraparound_under_sustained_writes(store: VolumeStore) -> None:
    vol = store.create("v", 8 * MIB, wal_size_bytes=SMALL_WAL_BYTES)
    rng = random.Random(1)
    model = bytearray(8 * MIB)
    written = 0
    # Mixed sizes, aligned and not, so records of every length hit the wrap point.
    while written < 24 * MIB:
        count = rng.choice([1, 7, 8, 9, 24, 64, 127, 256])
        lba = rng.randrange(vol.block_count - count + 1)
        data = rng.randbytes(count * 512)
        vol.write(lba, data)
        model[lba * 512 : (lba + count) * 512] = data
        written += len(data)
        if rng.random() < 0.02:
            u = rng.randrange(vol.block_count - 64)
            vol.unmap(u, 40)
            model[u * 512 : (u + 40) * 512] = bytes(40 * 512)
    assert vol.stats.checkpoints > 20, "the WAL cannot have wrapped without many checkpoints"
    assert vol.stats.wal_records * 512 > 10 * SMALL_WAL_BYTES
    assert read_all(vol) == model
    vol.close()
    with store.open("v") as vol:
        assert read_all(vol) == model


def test_large_writes_are_split_to_fit_a_small_wal(store: VolumeStore) -> None:
    with store.create("v", 8 * MIB, wal_size_bytes=SMALL_WAL_BYTES) as vol:
        data = random.Random(2).randbytes(8 * MIB)
        vol.write(0, data)
        assert vol.stats.wal_records >= 8 * MIB // (SMALL_WAL_BYTES // 4)
        assert read_all(vol) == data


def test_backpressure_with_many_writers(store: VolumeStore) -> None:
    vol = store.create("v", 8 * MIB, wal_size_bytes=SMALL_WAL_BYTES)
    region_blocks = vol.block_count // 8
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            rng = random.Random(100 + t)
            base = t * region_blocks
            for i in range(48):
                vol.write(base + (i % 16) * 64, bytes([t + 1]) * 64 * 512)
                if rng.random() < 0.1:
                    vol.flush()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not any(th.is_alive() for th in threads), "writers deadlocked on a full WAL"
    assert errors == []
    assert vol.stats.backpressure_waits > 0, "the WAL never filled: the test proves nothing"
    for t in range(8):
        base = t * region_blocks
        assert vol.read(base, 16 * 64) == bytes([t + 1]) * 16 * 64 * 512, f"writer {t}"
    vol.close()
    with store.open("v") as vol:
        for t in range(8):
            assert vol.read(t * region_blocks, 16 * 64) == bytes([t + 1]) * 16 * 64 * 512


_WRAP_CRASH_SCRIPT = textwrap.dedent(
    """
    import random, sys
    from blockyard.engine import VolumeStore

    vol = VolumeStore(sys.argv[1]).open("v")
    rng = random.Random(7)
    for i in range(400):
        count = rng.choice([1, 8, 16, 40])
        lba = rng.randrange(vol.block_count - count + 1)
        vol.write(lba, rng.randbytes(count * 512))
    vol.flush()
    sys.stdout.write(f"{vol.stats.checkpoints} {vol.last_lsn - vol.checkpoint_lsn + 1}\\n")
    sys.stdout.flush()
    import os
    os._exit(0)
    """
)


def test_replay_after_crash_with_wrapped_wal(tmp_path: Path) -> None:
    root = str(tmp_path / "data")
    VolumeStore(root).create("v", 4 * MIB, wal_size_bytes=SMALL_WAL_BYTES).close()
    proc = subprocess.run(
        [sys.executable, "-c", _WRAP_CRASH_SCRIPT, root],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    checkpoints, unapplied = map(int, proc.stdout.split())
    assert checkpoints > 0, "the WAL did not wrap before the crash"
    assert unapplied > 0, "nothing was left to replay: the test proves nothing"

    # Recompute what the child wrote, with the same seed.
    rng = random.Random(7)
    model = bytearray(4 * MIB)
    for _ in range(400):
        count = rng.choice([1, 8, 16, 40])
        lba = rng.randrange(4 * MIB // 512 - count + 1)
        model[lba * 512 : (lba + count) * 512] = rng.randbytes(count * 512)
    store = VolumeStore(root)
    with store.open("v") as vol:
        assert read_all(vol) == model
        vol.write(0, b"\x01" * 4096)
    with store.open("v") as vol:
        assert vol.read(0, 8) == b"\x01" * 4096
        assert vol.read(8, vol.block_count - 8) == model[4096:]
