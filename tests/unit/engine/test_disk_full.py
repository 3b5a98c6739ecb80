"""The engine on a full disk and on a device whose write-back fails (fault file model).

Unit-level companions of tests/integration/engine/test_bug_disk_full_flushed_write.py (real
filesystems) and the crash suite's full-disk episodes.
"""

from __future__ import annotations

import pytest
from engine_helpers import block_of, wait_checkpointed

from blockyard.engine import VolumeStore
from blockyard.errors import NoSpaceError, StorageIOError, VolumeFailedError
from blockyard.testing.faultfs import FaultFS

MIB = 1 << 20
WAL = 256 << 10


def make(fs: FaultFS, *, background: bool = True) -> VolumeStore:
    fs.mkdir("/data")
    return VolumeStore("/data", fs=fs, background_flusher=background)


def test_full_disk_keeps_records_in_the_wal_and_resumes_when_space_returns() -> None:
    fs = FaultFS()
    store = make(fs)
    vol = store.create("v", 8 * MIB, wal_size_bytes=WAL)
    try:
        fs.full = True
        # The WAL is preallocated: appends need no new space, so writes and flushes succeed
        # until the WAL is full of records the flusher cannot apply.
        written = 0
        with pytest.raises(NoSpaceError):
            for i in range(200):
                vol.write(i * 8, block_of(i + 1))
                written += 1
                if i % 4 == 3:
                    vol.flush()
        assert written >= 4
        assert fs.enospc_count > 0
        for i in range(written):
            assert vol.read(i * 8, 8) == block_of(i + 1), i
        assert vol.checkpoint_lsn <= vol.last_lsn, "nothing could be applied"
        fs.full = False
        wait_checkpointed(vol)
        for i in range(written):
            assert vol.read(i * 8, 8) == block_of(i + 1), i
        vol.write(written * 8, block_of(250))
        vol.flush()
    finally:
        vol.close()
    vol = store.open("v")
    try:
        for i in range(written):
            assert vol.read(i * 8, 8) == block_of(i + 1), i
        assert vol.read(written * 8, 8) == block_of(250)
    finally:
        vol.close()


def test_open_on_a_full_disk_fails_with_no_space_then_recovers() -> None:
    fs = FaultFS()
    store = make(fs, background=False)
    vol = store.create("v", 8 * MIB, wal_size_bytes=WAL)
    vol.write(0, block_of(7, 4))
    vol.flush()
    # Leave the record in the WAL: the process dies, a new one opens the volume.
    del vol
    store = VolumeStore("/data", fs=fs, background_flusher=False)
    fs.full = True
    with pytest.raises(NoSpaceError):
        store.open("v")
    fs.full = False
    vol = store.open("v")
    try:
        assert vol.read(0, 32) == block_of(7, 4)
    finally:
        vol.close()


def test_failed_fdatasync_takes_the_volume_offline_until_reopened() -> None:
    """After a failed fdatasync the page cache may have dropped pages it never wrote; a later
    successful sync would not carry them, so no later flush may be acknowledged."""
    fs = FaultFS()
    store = make(fs)
    vol = store.create("v", 8 * MIB, wal_size_bytes=WAL)
    vol.write(0, block_of(1))
    vol.flush()
    vol.write(8, block_of(2))
    fs.sync_error = StorageIOError("model device: write-back failed")
    with pytest.raises(StorageIOError):
        vol.flush()
    fs.sync_error = None
    assert vol.offline
    with pytest.raises(VolumeFailedError, match="taken offline"):
        vol.write(16, block_of(3))
    with pytest.raises(VolumeFailedError):
        vol.flush()
    vol.close()
    vol = store.open("v")
    try:
        assert not vol.offline
        assert vol.read(0, 8) == block_of(1)
        vol.write(16, block_of(3))
        vol.flush()
    finally:
        vol.close()
