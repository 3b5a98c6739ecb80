"""SectorFile: byte-addressed file I/O over a BlockDevice, without FUSE."""

from __future__ import annotations

import errno
import os
import random
import threading

import pytest

from blockyard.attach.fusefile import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    SectorFile,
    errno_for,
)
from blockyard.errors import (
    CorruptionError,
    FlushTimeoutError,
    NoSpaceError,
    OutOfRangeError,
    StaleEpochError,
    StorageIOError,
    VolumeClosedError,
)
from blockyard.testing.memdev import MemoryBlockDevice

SIZE = 1 << 20


def _file(max_transfer_blocks: int = 64) -> tuple[SectorFile, MemoryBlockDevice]:
    dev = MemoryBlockDevice(SIZE // 512, max_transfer_blocks=max_transfer_blocks)
    return SectorFile(dev, name="t"), dev


def test_random_unaligned_io_matches_a_bytearray_model() -> None:
    f, _ = _file()
    model = bytearray(SIZE)
    rng = random.Random(7)
    for _ in range(400):
        off = rng.randrange(SIZE)
        n = rng.randint(1, 70_000)
        op = rng.random()
        if op < 0.5:
            data = rng.randbytes(n)
            written = f.write(off, data)
            assert written == min(n, SIZE - off)
            model[off : off + written] = data[:written]
        elif op < 0.6:
            f.punch_hole(off, n)
            end = min(off + n, SIZE)
            model[off:end] = bytes(end - off)
        elif op < 0.7:
            n = min(n, SIZE - off)
            f.zero_range(off, n)
            model[off : off + n] = bytes(n)
        else:
            assert f.read(off, n) == bytes(model[off : off + n])
    assert f.read(0, SIZE) == bytes(model)


def test_large_unaligned_write_spans_many_transfers() -> None:
    f, dev = _file(max_transfer_blocks=8)
    data = os.urandom(300_001)
    assert f.write(1001, data) == len(data)
    assert f.read(1001, len(data)) == data
    assert f.read(0, 1001) == bytes(1001)
    assert dev.read(0, 1)[: 1001 % 512] == bytes(1001 % 512)


def test_reads_and_writes_at_the_end() -> None:
    f, _ = _file()
    assert f.read(SIZE, 10) == b""
    assert f.read(SIZE - 3, 10) == bytes(3)
    assert f.write(SIZE - 3, b"abcdef") == 3
    assert f.read(SIZE - 3, 3) == b"abc"
    with pytest.raises(OSError) as exc:
        f.write(SIZE, b"x")
    assert exc.value.errno == errno.ENOSPC


def test_concurrent_unaligned_writes_to_one_sector_lose_nothing() -> None:
    """Each thread owns distinct bytes of the same sectors; RMW must not undo a neighbour."""
    f, _ = _file()
    threads = 8
    rounds = 200

    def writer(i: int) -> None:
        for r in range(rounds):
            f.write(i * 7 + (r % 3) * 512, bytes([i + 1]) * 7)

    ts = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=60)
        assert not t.is_alive()
    for row in range(3):
        got = f.read(row * 512, threads * 7)
        assert got == b"".join(bytes([i + 1]) * 7 for i in range(threads))


def test_fallocate_modes() -> None:
    f, dev = _file()
    f.write(0, b"\xff" * 8192)
    f.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 100, 5000)
    assert f.read(0, 8192) == b"\xff" * 100 + bytes(5000) + b"\xff" * 3092
    assert not dev.lba_status(1).mapped
    f.fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 6000, 10)
    assert f.read(6000, 12) == bytes(10) + b"\xff\xff"
    with pytest.raises(OSError) as exc:
        f.fallocate(FALLOC_FL_PUNCH_HOLE, 0, 512)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:
        f.fallocate(0, 0, 512)
    assert exc.value.errno == errno.EOPNOTSUPP


def test_sync_flushes_the_device() -> None:
    f, dev = _file()
    before = dev.flush_count
    f.sync()
    assert dev.flush_count == before + 1


def test_seek_data_and_hole_follow_provisioning() -> None:
    f, _ = _file()
    f.write(64 * 1024, b"x" * 4096)
    assert f.seek(0, os.SEEK_DATA) == 64 * 1024
    assert f.seek(64 * 1024, os.SEEK_HOLE) == 68 * 1024
    assert f.seek(0, os.SEEK_HOLE) == 0
    with pytest.raises(OSError) as exc:
        f.seek(68 * 1024, os.SEEK_DATA)
    assert exc.value.errno == errno.ENXIO


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (StorageIOError("disk"), errno.EIO),
        (NoSpaceError("full"), errno.ENOSPC),
        (FlushTimeoutError("slow"), errno.ETIMEDOUT),
        (StaleEpochError("old", volume_epoch=2, request_epoch=1), errno.EROFS),
        (VolumeClosedError("closed"), errno.ENXIO),
        (OutOfRangeError("far"), errno.EINVAL),
        (CorruptionError("bad", volume="v", path="p", offset=0), errno.EIO),
        (OSError(errno.ENOMEM, "mem"), errno.ENOMEM),
    ],
)
def test_errors_map_to_errno(error: Exception, code: int) -> None:
    assert errno_for(error) == code


class _FailingDevice(MemoryBlockDevice):
    def __init__(self, error: Exception) -> None:
        super().__init__(SIZE // 512)
        self.error = error

    def write(self, lba: int, data: object, *, fua: bool = False) -> None:
        raise self.error

    def flush(self) -> None:
        raise self.error


@pytest.mark.parametrize(
    ("error", "code"), [(StorageIOError("eio"), errno.EIO), (NoSpaceError("full"), errno.ENOSPC)]
)
def test_device_errors_surface_as_oserror_with_cause(error: Exception, code: int) -> None:
    f = SectorFile(_FailingDevice(error))
    for call in (lambda: f.write(0, b"x" * 512), lambda: f.write(3, b"x"), f.sync):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == code
        assert exc.value.__cause__ is error
