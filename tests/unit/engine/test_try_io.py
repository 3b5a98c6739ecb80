"""``Volume.try_read`` / ``try_write``: the engine's calls for a caller that must not wait (the
volume server's event loop). Each answers exactly what ``read`` / ``write`` would, or None
having done nothing when it would have to wait: data not in the page cache, a checkpoint
applying underneath, a full WAL, a busy writer lock, a slow disk, a volume not taking writes.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from engine_helpers import MIB, SECTORS_PER_BLOCK, block_of

from blockyard.engine import Volume, VolumeStore
from blockyard.engine.epoch import Role
from blockyard.engine.fileio import UNINITIALIZED_BUFFER_MIN_BYTES, OsFile, read_buffer
from blockyard.engine.write_path import SLOW_APPEND_HOLD_NS, SLOW_APPEND_NS, SLOW_APPENDS_IN_A_ROW
from blockyard.errors import OutOfRangeError
from blockyard.testing.faultfs import FaultFS

ROOT = "/data"
WAL_BYTES = 64 * 1024
LOCK_WAIT_S = 10.0


def _single_threaded(fs: FaultFS | None = None) -> Volume:
    """A volume whose WAL drains only when a writer meets a full WAL (no background flusher),
    so a full WAL stays full until ``write`` is called."""
    store = VolumeStore(ROOT, fs=fs or FaultFS(), background_flusher=False)
    return store.create("v", 4 * MIB, wal_size_bytes=WAL_BYTES)


def test_try_write_logs_like_write_and_returns_its_lsn() -> None:
    vol = _single_threaded()
    lsn = vol.try_write(8 * SECTORS_PER_BLOCK, block_of(1, 2))
    assert lsn == vol.last_lsn and lsn > 0
    assert vol.read(8 * SECTORS_PER_BLOCK, 2 * SECTORS_PER_BLOCK) == block_of(1, 2)
    assert vol.write(0, block_of(2)) == lsn + 1


def test_try_write_declines_when_the_wal_lacks_room_then_works_after_a_drain() -> None:
    vol = _single_threaded()
    taken = 0
    while vol.try_write(taken * SECTORS_PER_BLOCK, block_of(taken + 1)) is not None:
        taken += 1
        assert taken < WAL_BYTES // 4096, "try_write never saw the WAL full"
    # Declined: nothing was logged, and the WAL really has no room for one more record.
    last = vol.last_lsn
    assert vol.try_write(taken * SECTORS_PER_BLOCK, block_of(99)) is None
    assert vol.last_lsn == last
    assert vol.wal_usage().used_bytes + 4096 + 512 > WAL_BYTES
    assert vol.read(taken * SECTORS_PER_BLOCK, SECTORS_PER_BLOCK) == bytes(4096)
    # write() may wait: here it checkpoints inline and logs; then try_write has room again.
    vol.write(taken * SECTORS_PER_BLOCK, block_of(99))
    assert vol.try_write((taken + 1) * SECTORS_PER_BLOCK, block_of(100)) is not None
    for i in range(taken):
        assert vol.read(i * SECTORS_PER_BLOCK, SECTORS_PER_BLOCK) == block_of(i + 1)


def test_try_write_counts_the_wrap_gap() -> None:
    vol = _single_threaded()
    # Fill, drain, and log again so the head sits near the end of the region.
    payload = block_of(7)
    lba = 0
    while vol.try_write(lba, payload) is not None:
        lba += SECTORS_PER_BLOCK
    vol.checkpoint()
    for _ in range(3):
        assert vol.try_write(lba, payload) is not None
        lba += SECTORS_PER_BLOCK
    # A record that does not fit before the end needs the tail too; try_write must never
    # call the back-pressure path (which would checkpoint here, single-threaded).
    big = block_of(8, 8)
    before = vol.stats.backpressure_waits
    while vol.try_write(lba, big) is not None:
        lba += 8 * SECTORS_PER_BLOCK
    assert vol.stats.backpressure_waits == before


def test_try_write_declines_while_another_writer_holds_the_lock() -> None:
    vol = _single_threaded()
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with vol._lock:
            held.set()
            release.wait(LOCK_WAIT_S)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(LOCK_WAIT_S)
        started = time.monotonic()
        assert vol.try_write(0, block_of(1)) is None
        assert time.monotonic() - started < 1.0  # it did not wait for the lock
    finally:
        release.set()
        holder.join(LOCK_WAIT_S)
    assert vol.try_write(0, block_of(1)) is not None


def test_try_write_takes_only_whole_aligned_blocks() -> None:
    vol = _single_threaded()
    assert vol.try_write(1, bytes(4096)) is None  # not 4 KiB aligned
    assert vol.try_write(0, bytes(512)) is None  # a partial block needs a read-modify-write
    assert vol.try_write(0, b"") is None
    assert vol.try_write(vol.block_count, block_of(1)) is None  # out of range: write() says why
    assert vol.last_lsn == 0


def test_try_write_declines_for_a_volume_that_does_not_take_writes() -> None:
    vol = _single_threaded()
    vol.set_role(Role.REPLICA, 1)
    assert vol.try_write(0, block_of(1)) is None
    vol.close()
    assert vol.try_write(0, block_of(1)) is None


def test_a_slow_append_sends_writes_off_the_caller_for_a_while() -> None:
    fs = FaultFS()
    vol = _single_threaded(fs)
    assert vol.try_write(0, block_of(1)) is not None
    # Every file write now takes longer than the slow-append threshold. One slow append is no
    # sign (a preempted thread makes one); slow ones in a row are.
    fs.on_op = lambda _n: time.sleep(2 * SLOW_APPEND_NS / 1e9)
    vol.write(SECTORS_PER_BLOCK, block_of(2))  # off the loop, where waiting is fine
    fs.on_op = None
    assert vol.try_write(2 * SECTORS_PER_BLOCK, block_of(3)) is not None
    fs.on_op = lambda _n: time.sleep(2 * SLOW_APPEND_NS / 1e9)
    for i in range(SLOW_APPENDS_IN_A_ROW):
        vol.write((4 + i) * SECTORS_PER_BLOCK, block_of(2))
    fs.on_op = None
    assert vol.try_write(10 * SECTORS_PER_BLOCK, block_of(3)) is None
    assert vol.read(10 * SECTORS_PER_BLOCK, SECTORS_PER_BLOCK) == bytes(4096)
    # Quick appends again, and the hold has passed: inline writes come back.
    vol.write(3 * SECTORS_PER_BLOCK, block_of(4))
    time.sleep(SLOW_APPEND_HOLD_NS / 1e9)
    assert vol.try_write(10 * SECTORS_PER_BLOCK, block_of(3)) is not None


def test_try_read_serves_dirty_and_cached_data() -> None:
    vol = _single_threaded()
    vol.write(0, block_of(5, 2))
    got = vol.try_read(0, 3 * SECTORS_PER_BLOCK)  # two dirty blocks and a clean one
    assert got is not None and bytes(got) == block_of(5, 2) + bytes(4096)
    vol.checkpoint()
    got = vol.try_read(0, 2 * SECTORS_PER_BLOCK)  # from the data region (the model's cache)
    assert got is not None and bytes(got) == block_of(5, 2)
    with pytest.raises(OutOfRangeError):
        vol.try_read(vol.block_count, 1)


def test_try_read_declines_while_a_checkpoint_applies_underneath() -> None:
    vol = _single_threaded()
    vol.write(0, block_of(5))
    vol._apply_gen += 1  # what _apply_images does while it writes the data region
    try:
        assert vol.try_read(0, SECTORS_PER_BLOCK) is None
    finally:
        vol._apply_gen += 1
    assert vol.try_read(0, SECTORS_PER_BLOCK) == block_of(5)


def test_try_read_of_a_real_file_needs_the_page_cache(tmp_path: Path) -> None:
    """On a real filesystem: data evicted from the page cache is not read (None), read()
    brings it back, and then try_read serves it."""
    store = VolumeStore(str(tmp_path / "data"))
    try:
        vol = store.create("v", 4 * MIB)
        data = os.urandom(64 * 1024)
        vol.write(0, data)
        vol.flush()
        vol.checkpoint()
        file = vol._file
        assert isinstance(file, OsFile)
        probe = bytearray(4096)
        if file.preadv_nowait([probe], 0) is None and not file._nowait:
            pytest.skip(f"{tmp_path} is on a filesystem without RWF_NOWAIT reads")
        os.fdatasync(file.fd)
        os.posix_fadvise(file.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert vol.try_read(0, len(data) // 512) is None
        assert vol.read(0, len(data) // 512) == data
        got = vol.try_read(0, len(data) // 512)
        assert got is not None and bytes(got) == data
    finally:
        store.close_all()


def test_faultfs_reads_never_wait() -> None:
    fs = FaultFS()
    f = fs.open("/x", create=True)
    f.pwritev([b"abc" * 512], 0)
    buf = bytearray(1536)
    assert f.preadv_nowait([buf], 0) == 1536 and bytes(buf) == b"abc" * 512


def test_read_buffers_have_the_length_asked_for() -> None:
    small = read_buffer(4096)
    assert isinstance(small, bytearray) and small == bytes(4096)  # zero-filled
    big = read_buffer(UNINITIALIZED_BUFFER_MIN_BYTES * 2)
    assert isinstance(big, bytearray) and len(big) == UNINITIALIZED_BUFFER_MIN_BYTES * 2
    big[:] = b"\x01" * len(big)  # writable, like any bytearray
