"""Regression: a flushed write was lost when the disk filled.

On a 64 MiB tmpfs, 1 MiB writes with a flush every 4 writes ran until the initiator got SPACE
ALLOCATION FAILED. The last 2 to 204 4 KiB blocks of one write that had been acknowledged *and
flushed* then read back as zeros, live and after a restart (12 of 12 runs). The flusher applied
the write to the data region with a ``pwritev`` that wrote 1,040,384 of 1,048,576 bytes before
the disk was full; the short count was ignored, the checkpoint advanced, and the WAL space that
held the only copy of the tail was released.

Now every write goes through ``fileio.write_fully`` and a checkpoint that fails part-way does
not advance: the WAL keeps the records, reads stay right, and applying resumes once space
returns. These tests fill real small filesystems (tmpfs and a loop-mounted ext4 image), free
space, restart (cleanly, and after SIGKILL) and check every flushed write byte for byte.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockyard.engine import VolumeStore
from blockyard.engine.volume import Volume
from blockyard.errors import NoSpaceError

WRITE_BYTES = 1 << 20
SECTORS_PER_WRITE = WRITE_BYTES // 512
VOLUME_BYTES = 256 << 20
WAL_BYTES = 4 << 20
FILLER_BYTES = 8 << 20
FLUSH_EVERY = 4
#: Bound on how long the flusher may take to catch up once space is back.
CATCH_UP_TIMEOUT_S = 30.0


def payload(i: int) -> bytes:
    """Write ``i``'s bytes: every 4 KiB block names the write and the block within it."""
    return b"".join(struct.pack("<QQ", i, b) * 256 for b in range(WRITE_BYTES // 4096))


def make_filler(root: Path) -> Path:
    filler = root / "filler"
    with open(filler, "wb") as f:
        f.write(os.urandom(FILLER_BYTES))
        f.flush()
        os.fsync(f.fileno())
    return filler


def fill(vol: Volume) -> tuple[int, int]:
    """Write until the disk is full. Returns (writes acknowledged, writes covered by a
    completed flush)."""
    written = flushed = 0
    while written < VOLUME_BYTES // WRITE_BYTES:
        try:
            vol.write(written * SECTORS_PER_WRITE, payload(written))
        except NoSpaceError:
            return written, flushed
        written += 1
        if written % FLUSH_EVERY == 0:
            try:
                vol.flush()
            except NoSpaceError:
                return written, flushed
            flushed = written
    pytest.fail("the filesystem never filled up: the test's sizes are wrong")


def check(vol: Volume, upto: int) -> None:
    for i in range(upto):
        got = vol.read(i * SECTORS_PER_WRITE, SECTORS_PER_WRITE)
        want = payload(i)
        if got != want:
            bad = [
                b
                for b in range(256)
                if got[b * 4096 : (b + 1) * 4096] != want[b * 4096 : (b + 1) * 4096]
            ]
            pytest.fail(f"write {i} lost {len(bad)} of its 256 blocks, first {bad[:4]}")


def wait_caught_up(vol: Volume) -> None:
    """Space is back: the flusher must apply everything the WAL held, within a bound."""
    deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
    while vol.checkpoint_lsn <= vol.last_lsn:
        assert time.monotonic() < deadline, "the flusher did not catch up after space returned"
        time.sleep(0.05)


def test_disk_full_keeps_flushed_writes(small_fs: Path) -> None:
    filler = make_filler(small_fs)
    store = VolumeStore(str(small_fs / "data"))
    vol = store.create("v", VOLUME_BYTES, wal_size_bytes=WAL_BYTES)
    try:
        written, flushed = fill(vol)
        assert flushed >= 2 * FLUSH_EVERY, (written, flushed)
        # While the disk is full the WAL holds what could not be applied: reads stay right.
        check(vol, written)
        filler.unlink()
        wait_caught_up(vol)
        check(vol, written)
        # The volume takes writes again.
        vol.write(written * SECTORS_PER_WRITE, payload(written))
        vol.flush()
        written += 1
    finally:
        vol.close()
    vol = store.open("v")
    try:
        check(vol, written)
    finally:
        vol.close()


_CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
from test_bug_disk_full_flushed_write import fill
from blockyard.engine import VolumeStore
store = VolumeStore({data!r})
vol = store.create("v", {size}, wal_size_bytes={wal})
written, flushed = fill(vol)
print(written, flushed, flush=True)
time.sleep(600)
"""


def test_disk_full_then_sigkill_keeps_flushed_writes(small_fs: Path) -> None:
    """The process holding the volume dies while the disk is full; the next open (once space
    is back) recovers every flushed write from the WAL."""
    filler = make_filler(small_fs)
    data = small_fs / "data"
    code = _CHILD.format(
        tests=str(Path(__file__).parent), data=str(data), size=VOLUME_BYTES, wal=WAL_BYTES
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        proc.send_signal(signal.SIGKILL)
        _out, err = proc.communicate(timeout=30)
    assert line, f"the writer died before the disk filled: {err}"
    written, flushed = (int(x) for x in line.split())
    assert flushed >= 2 * FLUSH_EVERY, (written, flushed)
    store = VolumeStore(str(data))
    with contextlib.suppress(NoSpaceError):
        # Still full: recovery cannot apply the WAL. It must say so, not report corruption.
        store.open("v").close()
    filler.unlink()
    vol = store.open("v")
    try:
        check(vol, flushed)
    finally:
        vol.close()
